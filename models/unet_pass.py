"""One noised UNet pass per timestep for image-text matching (Discffusion / Diffusion Classifier). Runs
the model; no analysis (the scores live in interp.lse).

    z = encode_image(pipe, image)                                    # [1, 4, h, w]
    res = noised_unet_pass(pipe, z, ["a red circle", "a blue square"], timesteps=[200, 500], uncond=True)
    res.traces[0].logits["mid.attn.0"]   # [steps, heads, h, w, tokens] of caption 0
                                         # (.cosine: same layout, with cosine=True)
    res.errors_eps                       # [K, steps] noise-prediction error in epsilon space

The image latent is noised with one noise draw per timestep, shared by every caption
(z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps_s, the scheduler's `add_noise`), and the K captions
(plus "" when `uncond=True`) go through the UNet as ONE batch per timestep, so the captions differ
only in the text they attend to.

Prediction spaces. `errors` is the MSE in the model's own prediction space (epsilon, v or x0);
`errors_eps` converts the prediction to epsilon first and compares it with the true noise:
    v-prediction:  eps_hat = sqrt(abar) v_hat + sqrt(1 - abar) z_t
                   => ||eps_hat - eps||^2 = abar ||v_hat - v||^2  (and the x0 error is (1 - abar) times it)
    x0-prediction: eps_hat = (z_t - sqrt(abar) x0_hat) / sqrt(1 - abar)
So for v-prediction the epsilon error is the v error weighted by abar_t: with a zero-terminal-SNR schedule
(the bundled model) abar_999 = 0 and the epsilon error at t = 999 is 0 for every caption (z_t is pure
noise, eps is known exactly), i.e. that timestep carries no signal in epsilon space.

This is the one way into the UNet for scoring, attribution and training; the options of `noised_unet_pass`:
    rows:      a latent `[K, C, h, w]` reads caption k against latent k ((image, caption) rows, e.g. prompt learning's
               batches of several images); a latent `[1, C, h, w]` is shared by every caption
    grad=True: runs with autograd on; the traced maps (and `features`) keep their graph, so a score of them can
               be differentiated w.r.t. anything upstream (an applied prompt's parameters, probes)
    padded:    each trace keeps all `tokenizer.model_max_length` key columns (BOS, words, EOS, padding)
    traced:    False runs the UNet without capture processors (errors and features only)
    layers:    trace (and capture-process) only these cross-attention layers
    probes:    a `models.attention_capture.ProbeSet`: the traced maps pass its identity modules (captum's layers)
    features:  UNet block names (e.g. "up_blocks.1"): their outputs, via forward hooks removed on exit
    noise:     an explicit noise `[S, C, h, w]` instead of the seeded draw
`prepare_pass` is the tokenise / encode / noise part alone (`PassInputs.noised(s)` gives a step's noised rows).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import torch
from PIL import Image

from models.attention_capture import ProbeSet
from models.trace import AttentionTrace, trace

__all__ = ["PassInputs", "PassResult", "check_pass_args", "draw_noise", "encode_image", "noised_unet_pass",
           "native_size", "prepare_pass", "to_epsilon"]


@dataclasses.dataclass
class PassResult:
    """What `noised_unet_pass` returns (K captions, S timesteps).

    Attributes:
        captions: the captions, in batch order                                          [K]
        timesteps: the timesteps, in call order                                         [S]
        traces: per caption, its AttentionTrace (steps = the timesteps)                 [K]
        errors: MSE of the prediction vs the true target, in the model's prediction
            space (`prediction_type`), float32                                          [K, S]
        errors_eps: the same after converting the prediction to epsilon, float32        [K, S]
        uncond_errors / uncond_errors_eps: the "" prompt's errors (uncond=True only)    [S]
        uncond_trace: the "" prompt's AttentionTrace (uncond=True only)
        features: per UNet block name asked for, its output per caption row and step (`features=`),
            float32; on the UNet's device with grad=True (with graph), else on the CPU   [K, S, C_b, h_b, w_b]
        uncond_features: the same for the "" row (uncond=True only)                     [S, C_b, h_b, w_b]
        noise: the noise of each timestep, shared by all captions, float32              [S, C, h, w]
        prediction_type: "epsilon" | "v_prediction" | "sample"
        unet_calls: UNet forward calls (one per timestep)                               S
        unet_evals: sample-forwards, i.e. batch rows through the UNet                   S * (K + uncond)
        noise_seed: the seed of the noise
    """

    captions: list[str]
    timesteps: list[int]
    traces: list[AttentionTrace]
    errors: torch.Tensor
    errors_eps: torch.Tensor
    noise: torch.Tensor
    prediction_type: str
    unet_calls: int
    unet_evals: int
    noise_seed: int
    uncond_errors: torch.Tensor | None = None
    uncond_errors_eps: torch.Tensor | None = None
    uncond_trace: AttentionTrace | None = None
    features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    uncond_features: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def trace_of(self, caption: str) -> AttentionTrace:
        """The trace of a caption (the first one if it occurs several times)."""
        return self.traces[self.captions.index(caption)]


def native_size(pipe) -> tuple[int, int]:
    """The model's native image size (height, width): UNet sample size times the VAE scale factor."""
    s = pipe.unet.config.sample_size
    f = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    return h * f, w * f


@torch.no_grad()
def encode_image(pipe, image) -> torch.Tensor:
    """Encode a PIL image to a scaled latent `[1, C, h, w]` (float32, on the UNet's device).

    The image is converted to RGB, resized to the model's native size (no crop) and mapped to [-1, 1];
    the latent is the mean of the VAE posterior (deterministic, as the bundled training caches it)
    times `vae.config.scaling_factor`.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"encode_image expects a PIL image, got {type(image).__name__}")
    h, w = native_size(pipe)
    img = image.convert("RGB").resize((w, h), Image.BICUBIC)
    x = pipe.image_processor.preprocess(img, height=h, width=w)  # [1, 3, h, w] in [-1, 1]
    vae = pipe.vae
    x = x.to(vae.device, vae.dtype)
    z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.float().to(pipe.unet.device)


def to_epsilon(pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Convert a UNet prediction to an epsilon prediction (`abar` broadcastable to `pred`)."""
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return abar.sqrt() * pred + (1 - abar).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - abar.sqrt() * pred) / (1 - abar).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def check_pass_args(captions, timesteps, n_train: int) -> tuple[list[str], list[int]]:
    """Validate the captions and timesteps of a noised pass; returns them as lists.

    Raises:
        ValueError: not a list of strings, no captions, an empty caption, no timesteps, a non-integer timestep or
            one outside [0, n_train).
    """
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise ValueError("captions must be a list of strings")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty: give at least one caption")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise ValueError(f"caption {i} is not a string: {c!r}")
        if not c.strip():
            raise ValueError(f"caption {i} is empty; use uncond=True for the unconditional (\"\") branch")
    if isinstance(timesteps, (int, float, str)) or not (isinstance(timesteps, Sequence) or torch.is_tensor(timesteps)):
        raise ValueError("timesteps must be a list of integers")
    ts = timesteps.tolist() if torch.is_tensor(timesteps) else list(timesteps)
    if not ts:
        raise ValueError("timesteps is empty: give at least one timestep")
    out = []
    for t in ts:
        if isinstance(t, bool) or int(t) != t:
            raise ValueError(f"timestep {t!r} is not an integer")
        if not 0 <= int(t) < n_train:
            raise ValueError(f"timestep {int(t)} is out of range [0, {n_train}) (num_train_timesteps={n_train})")
        out.append(int(t))
    return captions, out


def draw_noise(noise_seed: int, n_steps: int, shape: Sequence[int], device=None) -> torch.Tensor:
    """The pass's noise: S draws from `torch.Generator().manual_seed(noise_seed)`, float32 `[S, *shape]`
    (`shape` = `[C, h, w]` of one latent), moved to `device`."""
    g = torch.Generator().manual_seed(int(noise_seed))
    return torch.randn((n_steps, *shape), generator=g).to(device)  # [S, C, h, w]


@dataclasses.dataclass
class PassInputs:
    """The tokenised, encoded and noised inputs of a pass (B rows = K captions, plus "" with uncond).

    Attributes:
        captions: the captions                                                          [K]
        prompts: the batch's texts: the captions, then "" with uncond                   [B]
        timesteps: the timesteps                                                        [S]
        ids: padded token ids, on the CPU                                               [B, L]
        emb: text-encoder output (no graph), UNet device and dtype                      [B, L, D]
        latents: each row's clean latent x0, float32, UNet device                       [B, C, h, w]
        noise: each timestep's noise, shared by every row, float32, UNet device         [S, C, h, w]
        prediction_type: the scheduler's "epsilon" | "v_prediction" | "sample"
        uncond: whether the last row is the "" prompt
        noise_seed: the seed of the noise (-1 for explicit noise)
    """

    captions: list[str]
    prompts: list[str]
    timesteps: list[int]
    ids: torch.Tensor
    emb: torch.Tensor
    latents: torch.Tensor
    noise: torch.Tensor
    prediction_type: str
    uncond: bool
    noise_seed: int

    def noised(self, sched, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step s: (t `[B]` long, x_t `[B, C, h, w]` float32, eps `[B, C, h, w]`), x_t = scheduler.add_noise."""
        B = self.latents.shape[0]
        dev = self.latents.device
        tt = torch.full((B,), self.timesteps[s], dtype=torch.long, device=dev)
        eps = self.noise[s : s + 1].expand(B, -1, -1, -1)
        return tt, sched.add_noise(self.latents, eps, tt), eps


def prepare_pass(pipe, latent: torch.Tensor, captions: Sequence[str], timesteps: Sequence[int], noise_seed: int = 0,
                 uncond: bool = False, noise: torch.Tensor | None = None) -> PassInputs:
    """Validate, tokenise and encode the captions (no graph), broadcast the latent and draw the noise.

    Args: as `noised_unet_pass`.
    Raises:
        ValueError: see `check_pass_args`; a bad latent (not `[1 or K, C, h, w]` / `[C, h, w]`; K rows with
            uncond); a noise of the wrong shape.
    """
    sched = pipe.scheduler
    n_train = int(sched.config.num_train_timesteps)
    captions, ts = check_pass_args(captions, timesteps, n_train)
    K, S = len(captions), len(ts)
    if not torch.is_tensor(latent) or latent.dim() not in (3, 4) or (latent.dim() == 4 and latent.shape[0] not in (1, K)):
        raise ValueError(f"latent must be [1, C, h, w], [C, h, w] or one row per caption [{K}, C, h, w], got "
                         f"{tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__}")
    rows = latent.dim() == 4 and latent.shape[0] == K and K > 1
    if rows and uncond:
        raise ValueError("uncond=True needs one latent shared by all captions, not one per caption")
    unet = pipe.unet
    dev, dt = unet.device, unet.dtype
    z = latent.reshape(-1, *latent.shape[-3:]).float().to(dev)  # [1 or K, C, h, w]
    prompts = captions + ([""] if uncond else [])
    B = len(prompts)
    if noise is None:
        noise = draw_noise(noise_seed, S, z.shape[1:], dev)  # [S, C, h, w], shared by all rows
    else:
        if not torch.is_tensor(noise) or tuple(noise.shape) != (S, *z.shape[1:]):
            raise ValueError(f"noise must be [S={S}, {', '.join(map(str, z.shape[1:]))}], got "
                             f"{tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__}")
        noise, noise_seed = noise.float().to(dev), -1
    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids  # [B, L]
    with torch.no_grad():  # the text encoder is never differentiated here
        emb = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(dev, dt)  # [B, L, D]
    return PassInputs(captions, prompts, ts, ids, emb, z if rows else z.expand(B, -1, -1, -1), noise,
                      sched.config.get("prediction_type", "epsilon"), bool(uncond), int(noise_seed))


@contextlib.contextmanager
def _block_features(unet: torch.nn.Module, names: Sequence[str], grad: bool) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Forward hooks on UNet blocks recording each call's output `[B, C, h, w]` (first element of a tuple output);
    removed on exit, also after an exception."""
    mods = dict(unet.named_modules())
    unknown = [n for n in names if n not in mods or n == ""]
    if unknown:
        blocks = [n for n in mods if n.count(".") <= 1 and ("blocks" in n or n == "mid_block")]
        raise ValueError(f"unknown UNet blocks {unknown}; e.g. {blocks}")
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def hook_for(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            got[name].append(out.float() if grad else out.detach().float().cpu())
        return hook

    handles = []
    try:
        for n in names:
            handles.append(mods[n].register_forward_hook(hook_for(n)))
        yield got
    finally:
        for h in handles:
            h.remove()


def noised_unet_pass(pipe, latent: torch.Tensor, captions: Sequence[str], timesteps: Sequence[int],
                     noise_seed: int = 0, logits: bool = True, uncond: bool = False,
                     store_dtype: torch.dtype = torch.float32, cosine: bool = False, *, grad: bool = False,
                     padded: bool = False, traced: bool = True, layers: Sequence[str] | None = None,
                     probes: ProbeSet | None = None, features: Sequence[str] = (),
                     noise: torch.Tensor | None = None) -> PassResult:
    """Noise `latent` at each timestep and run the UNet on all captions in one batch per timestep, traced.

    Args:
        pipe: a Stable-Diffusion-family pipeline (unet, vae, tokenizer, text_encoder, scheduler).
        latent: the scaled image latent, `[1, C, h, w]` (or `[C, h, w]`), e.g. from `encode_image`, shared by
            every caption; or `[K, C, h, w]`: row k (caption k) is noised from latent k.
        captions: K non-empty captions.
        timesteps: S training timesteps in [0, num_train_timesteps); one UNet call each.
        noise_seed: seeds the noise; noise s (for the s-th timestep) is the s-th of S draws from
            `torch.Generator().manual_seed(noise_seed)` (`draw_noise`), and is the same for every row.
        logits: also trace the pre-softmax logits.
        uncond: add one batch row with the "" prompt and report its errors (Diffusion-Classifier
            normalisation); its trace is `uncond_trace`.
        store_dtype: dtype of the stored attention; float32 by default, since caption scores often
            differ by less than fp16 resolution.
        cosine: also trace the cosine maps of projected query / key features (`AttentionTrace.cosine`,
            `[steps, heads, h, w, tokens]`; `interp.lse` pooling "cosine").
        grad: run with autograd on: traced maps and features keep their graph (on the UNet's device); errors
            are detached. Without it the pass runs under `torch.no_grad()`.
        padded: trace all `tokenizer.model_max_length` key columns (BOS, words, EOS, padding), caption and ""
            rows alike (`AttentionTrace.n_real` says how many are real).
        traced: False: no capture processors, `traces` is empty (errors and features only).
        layers: trace only these cross-attention layers (aliases or module paths; the others keep their
            processors).
        probes: route each traced map through this ProbeSet's probes (`ProbeSet.source` is the map probed).
        features: UNet block names (e.g. ["up_blocks.1"]) whose outputs to keep (`PassResult.features`).
        noise: explicit noise `[S, C, h, w]` instead of the seeded draw (`noise_seed` is then reported as -1).
    Returns:
        PassResult (see there for the shapes).
    Raises:
        ValueError: no captions, an empty caption, no timesteps, a timestep out of range, a bad latent or noise,
            an unknown block.

    Example:
        >>> res = noised_unet_pass(pipe, encode_image(pipe, image), ["a red circle"], [300], grad=True)
        >>> f = res.traces[0].logits["mid.attn.0"].logsumexp(-1).mean()     # differentiable
        >>> f.backward()
    """
    inp = prepare_pass(pipe, latent, captions, timesteps, noise_seed, uncond, noise)
    sched, unet = pipe.scheduler, pipe.unet
    dev, dt = unet.device, unet.dtype
    captions, ts, ptype = inp.captions, inp.timesteps, inp.prediction_type
    B, K, S = len(inp.prompts), len(captions), len(ts)
    if ptype not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported prediction_type {ptype!r}")
    acp = sched.alphas_cumprod.to(dev, torch.float32)
    err = torch.zeros(B, S)
    err_eps = torch.zeros(B, S)
    opts = dict(prompts=inp.prompts, logits=logits or (probes is not None and probes.source == "logits"),
                cosine=cosine, dtype=store_dtype, padded=padded, grad=grad, layers=layers)
    if probes is not None:
        opts["processor_factory"] = probes.factory
        opts["layers"] = probes.names if layers is None else layers
    with torch.set_grad_enabled(grad), _block_features(unet, list(features), grad) as feats, \
            (trace(pipe, **opts) if traced else contextlib.nullcontext()) as tr:
        for s in range(S):
            tt, x_t, eps = inp.noised(sched, s)
            x0 = inp.latents
            target = eps if ptype == "epsilon" else sched.get_velocity(x0, eps, tt) if ptype == "v_prediction" else x0
            pred = unet(x_t.to(dt), tt, encoder_hidden_states=inp.emb).sample.float()
            with torch.no_grad():
                err[:, s] = ((pred - target) ** 2).mean(dim=(1, 2, 3)).cpu()
                eps_hat = to_epsilon(pred, x_t, acp[ts[s]], ptype)
                err_eps[:, s] = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)).cpu()
    traces = tr.traces if traced else []
    feat = {n: torch.stack(v, dim=1) for n, v in feats.items()}  # [B, S, C_b, h_b, w_b]
    return PassResult(
        captions=captions, timesteps=ts, traces=traces[:K], errors=err[:K], errors_eps=err_eps[:K],
        noise=inp.noise.cpu(), prediction_type=ptype, unet_calls=S, unet_evals=S * B, noise_seed=inp.noise_seed,
        uncond_errors=err[K] if uncond else None, uncond_errors_eps=err_eps[K] if uncond else None,
        uncond_trace=traces[K] if uncond and traced else None,
        features={n: v[:K] for n, v in feat.items()},
        uncond_features={n: v[K] for n, v in feat.items()} if uncond else {},
    )
