"""DPT self-correction (Qu et al., CVPR 2024, Eq. 9): guided DDIM sampling where, at each step of a chosen range,
the latent is first pushed up the gradient of the DPT matching score, z_t <- z_t + eta * d s(z_t, y) / d z_t, and
the usual classifier-free-guided DDIM step follows.

Two readings of Eq. 9 (`reading`):
    "noise_only" (default; the authors' txt2img.py `generate_with_correction`): the corrected latent only feeds
        the noise prediction; the DDIM step then starts from the uncorrected latent.
    "latent": the corrected latent replaces z_t, for the noise prediction and the DDIM step alike.
The default follows the published code because that is what produced the paper's numbers; "latent" is the
literal reading of the equation. With eta = 0 both are exactly the plain sampler (`models.sampling`).

Two objectives (`objective`):
    "score" (default, Eq. 9): s(z_t, y), the adapter's matching score of the prompt (one UNet row a step).
    "contrast" (this project's variant): log p(y | z_t) among y and its hard negatives (`world.negatives` of a
        shapes-world prompt, e.g. "three red circles" for "two red circles", or given): the log-softmax of the
        adapter's scores at its learned temperature, i.e. the objective it was trained with; pushes the latent away
        from what the negatives describe (1 + negatives rows a step, one UNet call).

Two places the adapter reads (`read`):
    "z_t" (default, Eq. 9): the sampler's noised latent at the sampler's own t (the adapter was trained across t).
    "x0" (this project's variant, after the forward guidance of Bansal et al., "Universal Guidance for Diffusion
        Models", 2023): the step's guided prediction of the clean latent, noised again to the adapter's own t
        (250, where it discriminates best) with a fixed noise; the gradient flows back through the noise
        prediction to z_t. At early steps z_t is nearly all noise and the adapter reads it poorly, while the
        prediction already shows the layout (how many objects). Costs one more UNet call (the guided prediction,
        with its graph) and its backward per corrected step.

    >>> img, traj = generate_self_corrected(pipe, "two red circles", seed=0, eta=0.5)
    >>> traj.s_before[-1], traj.s_after[-1], traj.grad_norm
    >>> traj.save("/tmp/traj"); Trajectory.load("/tmp/traj") == traj      # identical round trip
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from PIL import Image
from safetensors.numpy import load_file, save_file

from models.limits import check_choice, check_guidance, check_prompt, check_seed, check_steps
from models.sampling import _defaults, generate_images
from models.shapes import world
from models.training.dpt import (
    DPTAdapter,
    contrast_log_prob,
    find_adapter,
    itm_scores,
    itm_scores_at,
    itm_scores_clean,
)
from models.unet_pass import encode_image

__all__ = ["READINGS", "OBJECTIVES", "READS", "Trajectory", "generate_self_corrected", "best_of_seeds", "best_of_n",
           "prompt_negatives"]

READINGS: tuple[str, ...] = ("noise_only", "latent")
Reading = Literal["noise_only", "latent"]
OBJECTIVES: tuple[str, ...] = ("score", "contrast")
READS: tuple[str, ...] = ("z_t", "x0")


@dataclasses.dataclass
class Trajectory:
    """What one self-corrected generation did, step by step (plain data; `save` / `load`: safetensors + JSON).

    Per-step lists have one entry per sampling step; at steps outside the correction range the score, gradient
    and change entries are NaN (not computed: no UNet call spent) and the gradient map is zeros.

    Attributes:
        prompt, seed, steps, guidance, eta, reading, step_range ([start, stop) step indices), t (the adapter's
            timestep is the sampler's own t at each step)
        timesteps: the sampler's timesteps                                           [steps]
        s_before / s_after: the objective before / after the correction: s(z_t, y) ("score") or
            log p(y | z_t) among y and `negatives` ("contrast")                      [steps]
        grad_norm: L2 norm of d objective / d z_t                                    [steps]
        latent_change: L2 norm of the applied change eta * grad                      [steps]
        grad_map: per-latent-pixel gradient magnitude (L2 over channels), float32   [steps, h, w]
        previews: the predicted x0 of each step, decoded, uint8                      [steps, H, W, 3]
        image: the final image, uint8                                                [H, W, 3]
        unet_calls: UNet forward calls (CFG step = 1, correction = 1, s_after = 1; read "x0": 2 each for the
            correction and s_after); unet_backwards: backward passes
        objective: "score" or "contrast"; negatives: the captions contrasted against (contrast; each correction
            call has 1 + len(negatives) rows)
        read: where the adapter reads, "z_t" (Eq. 9) or "x0" (the predicted clean latent at the adapter's t; each
            objective reading is 2 UNet calls: the guided prediction and the adapter's pass)
    """

    prompt: str
    seed: int
    steps: int
    guidance: float
    eta: float
    reading: str
    step_range: list[int]
    timesteps: list[int]
    s_before: list[float]
    s_after: list[float]
    grad_norm: list[float]
    latent_change: list[float]
    grad_map: np.ndarray
    previews: np.ndarray
    image: np.ndarray
    unet_calls: int = 0
    unet_backwards: int = 0
    objective: str = "score"
    negatives: list[str] = dataclasses.field(default_factory=list)
    read: str = "z_t"

    _ARRAYS = ("grad_map", "previews", "image")

    def save(self, folder: str | Path) -> Path:
        """Write `trajectory.safetensors` (arrays) and `trajectory.json` (everything else) to `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: np.ascontiguousarray(getattr(self, k)) for k in self._ARRAYS}, folder / "trajectory.safetensors")
        meta = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._ARRAYS}
        meta = {k: ([None if isinstance(x, float) and np.isnan(x) else x for x in v] if isinstance(v, list) else v)
                for k, v in meta.items()}
        (folder / "trajectory.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Trajectory":
        folder = Path(folder)
        arrays = load_file(folder / "trajectory.safetensors")
        meta = json.loads((folder / "trajectory.json").read_text())
        for k in ("s_before", "s_after", "grad_norm", "latent_change"):
            meta[k] = [float("nan") if x is None else float(x) for x in meta[k]]
        return cls(**meta, **arrays)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trajectory):
            return NotImplemented
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in self._ARRAYS:
                if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
                    return False
            elif isinstance(a, list) and a and isinstance(a[0], float):
                if not np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True):
                    return False
            elif a != b:
                return False
        return True

    def summary(self) -> dict:
        """Scalars for a table: mean s gain, grad norms where corrected, calls."""
        sb, sa = np.asarray(self.s_before), np.asarray(self.s_after)
        m = ~np.isnan(sb)
        return {"corrected_steps": int(m.sum()), "mean_s_gain": float(np.nanmean(sa - sb)) if m.any() else 0.0,
                "final_s": float(sa[m][-1]) if m.any() else float("nan"), "unet_calls": self.unet_calls,
                "unet_backwards": self.unet_backwards}


def _to_uint8(decoded: torch.Tensor, pipe) -> np.ndarray:
    img = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * decoded.shape[0])
    return (np.clip(img[0], 0, 1) * 255).round().astype(np.uint8)


def _x0(pipe, z: torch.Tensor, model_out: torch.Tensor, t: int) -> torch.Tensor:
    abar = pipe.scheduler.alphas_cumprod[int(t)].to(z.device, torch.float32)
    ptype = pipe.scheduler.config.get("prediction_type", "epsilon")
    if ptype == "v_prediction":
        return abar.sqrt() * z - (1 - abar).sqrt() * model_out
    if ptype == "epsilon":
        return (z - (1 - abar).sqrt() * model_out) / abar.sqrt().clamp(min=1e-4)
    return model_out


def prompt_negatives(prompt: str) -> list[str]:
    """The hard negatives of a shapes-world prompt (`world.negatives`: count, color, shape, role and relation
    changes), in a fixed order; ValueError (one line) for a prompt outside the world's grammar."""
    try:
        scene = world.scene_from_caption(prompt, np.random.default_rng(0))
    except (ValueError, KeyError, IndexError, RuntimeError):
        raise ValueError(f"the contrast objective needs negatives: {prompt!r} is not a shapes-world caption, so give "
                         "them (negatives=[...])") from None
    return list(world.negatives(scene, np.random.default_rng(0)).values())


def generate_self_corrected(pipe, prompt: str, seed: int = 0, eta: float = 0.5, steps: int | None = None,
                            guidance: float | None = None, reading: Reading = "noise_only",
                            step_range: Sequence[int | None] = (0, None), adapter: DPTAdapter | None = None,
                            record_after: bool = True, previews: bool = True, callback=None,
                            objective: str = "score", negatives: Sequence[str] | None = None, read: str = "z_t"
                            ) -> tuple[Image.Image, Trajectory]:
    """Generate one image with DPT self-correction; with eta = 0 (or an empty range) exactly `generate_images`.

    Args:
        pipe: a StableDiffusionPipeline with a shipped DPT adapter (or pass `adapter`).
        prompt / seed / steps / guidance: as `models.sampling.generate_images` (defaults: the model's).
        eta: step size of the correction (0: none). Default 0.5 (the authors' `--correction_factor`).
        reading: "noise_only" (default, the authors' code) or "latent" (see the module docstring).
        step_range: [start, stop) sampling-step indices to correct (None: to the end).
        record_after: also read s after the correction (one more UNet call per corrected step).
        previews: decode each step's predicted x0 (VAE decodes only, no UNet call).
        callback: called with (step index, steps) after each step.
        objective: "score" (Eq. 9) or "contrast" (log p(y | z_t) among y and `negatives`; see the module docstring).
        negatives: the captions "contrast" pushes away from (default: `prompt_negatives(prompt)`).
        read: "z_t" (Eq. 9, default) or "x0" (the adapter reads the step's predicted clean latent; see the module
            docstring).
    Returns:
        (the image, its Trajectory).
    Raises:
        ValueError: a bad prompt / seed / steps / guidance / reading / objective / read / eta < 0; no negatives for
            "contrast"; no adapter for the model.
    """
    prompt = check_prompt(prompt, "prompt")
    seed = check_seed(seed)
    check_choice(reading, READINGS, "reading")
    eta = float(eta)
    if not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a number >= 0, got {eta}")
    check_choice(objective, OBJECTIVES, "objective")
    check_choice(read, READS, "read")
    negs: list[str] = []
    if objective == "contrast":
        negs = [check_prompt(n, "negative") for n in negatives] if negatives is not None else prompt_negatives(prompt)
        if not negs:
            raise ValueError("the contrast objective needs at least one negative caption")
    d = _defaults(pipe)
    steps = check_steps(steps or d.steps)
    guidance = check_guidance(d.guidance if guidance is None else guidance)
    start, stop = int(step_range[0] or 0), steps if step_range[1] is None else int(step_range[1])
    if eta > 0 and adapter is None:
        adapter = find_adapter(pipe)
    size = d.size
    dev = pipe._execution_device
    gen = [torch.Generator("cpu").manual_seed(seed)]
    cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
    unet_calls = unet_backwards = 0
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt, dev, 1, cfg, None)
        emb = torch.cat([ne, pe]) if cfg else pe

        timesteps, steps = retrieve_timesteps(pipe.scheduler, steps, dev)
        vs = pipe.vae_scale_factor
        height = width = size or pipe.unet.config.sample_size * vs
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width, emb.dtype, dev, gen, None)
        extra = pipe.prepare_extra_step_kwargs(gen, 0.0)
    n = len(timesteps)
    h, w = latents.shape[-2:]
    nan = float("nan")
    s_b, s_a, gn, ch = [nan] * n, [nan] * n, [nan] * n, [nan] * n
    gmap = np.zeros((n, h, w), np.float32)
    prev = []
    for i, t in enumerate(timesteps):
        z_in = latents
        if eta > 0 and start <= i < stop:
            objective_of = _ObjectiveAt(pipe, adapter, prompt, negs, t, read, emb, guidance if cfg else None)
            with torch.enable_grad():
                z = latents.detach().float().requires_grad_(True)
                s = objective_of(z)
                g = torch.autograd.grad(s, z)[0]
            unet_calls += objective_of.calls
            unet_backwards += objective_of.calls
            delta = eta * g
            z_in = (latents.float() + delta).to(latents.dtype)
            s_b[i], gn[i], ch[i] = float(s.detach()), float(g.norm()), float(delta.norm())
            gmap[i] = g[0].norm(dim=0).cpu().numpy()
            if record_after:
                with torch.no_grad():
                    s_a[i] = float(objective_of(z_in.float()))
                unet_calls += objective_of.calls
            if reading == "latent":
                latents = z_in
        with torch.no_grad():
            out = _guided_output(pipe, z_in, t, emb, guidance if cfg else None)
            unet_calls += 1
            if previews:
                x0 = _x0(pipe, latents.float(), out.float(), int(t))
                prev.append(_to_uint8(pipe.vae.decode(x0 / pipe.vae.config.scaling_factor, return_dict=False)[0], pipe))
            latents = pipe.scheduler.step(out, t, latents, **extra, return_dict=False)[0]
        if callback:
            callback(i + 1, n)
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=gen)[0]
        pil = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True])[0]
    H, W = pil.size[1], pil.size[0]
    traj = Trajectory(prompt=prompt, seed=seed, steps=n, guidance=float(guidance), eta=eta, reading=reading,
                      step_range=[start, stop], timesteps=[int(t) for t in timesteps], s_before=s_b, s_after=s_a,
                      grad_norm=gn, latent_change=ch, grad_map=gmap,
                      previews=np.stack(prev) if prev else np.zeros((0, H, W, 3), np.uint8),
                      image=np.asarray(pil, np.uint8).copy(), unet_calls=unet_calls, unet_backwards=unet_backwards,
                      objective=objective, negatives=negs, read=read)
    return pil, traj


def _guided_output(pipe, z: torch.Tensor, t, emb: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """The model output at z_t `[1, C, h, w]`, classifier-free guided when `guidance` is given (`emb` then holds the
    unconditional and the prompt's embeddings): one UNet call."""
    inp = torch.cat([z] * 2) if guidance is not None else z
    inp = pipe.scheduler.scale_model_input(inp, t)
    out = pipe.unet(inp.to(pipe.unet.dtype), t, encoder_hidden_states=emb, return_dict=False)[0]
    if guidance is not None:
        u, c = out.chunk(2)
        out = u + guidance * (c - u)
    return out


class _ObjectiveAt:
    """The scalar self-correction ascends at one sampling step (timestep t), as a function of z_t: s(., y), or
    log p(y | .) among y and `negatives` when given; read at z_t (Eq. 9) or at the guided x0 prediction ("x0").
    `calls`: UNet calls of one evaluation."""

    def __init__(self, pipe, adapter: DPTAdapter, prompt: str, negatives: Sequence[str], t, read: str,
                 emb: torch.Tensor, guidance: float | None) -> None:
        self.pipe, self.adapter, self.captions, self.t, self.read = pipe, adapter, [prompt, *negatives], t, read
        self.contrast = bool(negatives)
        self.emb, self.guidance = emb, guidance
        self.calls = 2 if read == "x0" else 1

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        pipe, adapter, ti = self.pipe, self.adapter, int(self.t)
        if self.read == "x0":
            out = _guided_output(pipe, z, self.t, self.emb, self.guidance).float()
            s = itm_scores_clean(pipe, adapter, _x0(pipe, z, out, ti), self.captions)
        else:
            s = itm_scores_at(pipe, adapter, z, self.captions, ti)
        return contrast_log_prob(adapter, s) if self.contrast else s[0]


def best_of_seeds(seed: int, n: int) -> list[int]:
    """The N seeds of a best-of-N draw: the plain sampler's own seed first, then seed + j x 1 000 003 (mod 2^32), so
    best of N is paired with the plain image of the same seed."""
    return [(int(seed) + j * 1_000_003) % 2**32 for j in range(int(n))]


def best_of_n(pipe, prompt: str, seeds: Sequence[int], steps: int | None = None, guidance: float | None = None,
              adapter: DPTAdapter | None = None, noise_seed: int = 0) -> tuple[Image.Image, dict]:
    """Generate one image per seed with the plain sampler and keep the one the DPT adapter scores highest.

    Returns: (the chosen image, {"seed", "index" (of the chosen one), "seeds" [N], "scores" [N], "images" [N] (PIL),
    "unet_calls" = N * steps + N}).
    """
    adapter = adapter or find_adapter(pipe)
    seeds = list(seeds)
    imgs = generate_images(pipe, [prompt] * len(seeds), seeds, steps=steps, guidance=guidance)
    scores = [float(itm_scores(pipe, adapter, encode_image(pipe, im), [prompt], noise_seed=noise_seed)[0])
              for im in imgs]
    k = int(np.argmax(scores))
    st = steps or _defaults(pipe).steps
    return imgs[k], {"seed": seeds[k], "index": k, "seeds": seeds, "scores": scores, "images": imgs,
                     "unet_calls": len(seeds) * st + len(seeds)}
