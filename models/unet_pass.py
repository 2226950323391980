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
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from models.trace import AttentionTrace, trace

__all__ = ["PassResult", "encode_image", "noised_unet_pass", "native_size", "to_epsilon"]


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
    from PIL import Image

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


def _validate(captions, timesteps, n_train: int) -> tuple[list[str], list[int]]:
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


@torch.no_grad()
def noised_unet_pass(pipe, latent: torch.Tensor, captions: Sequence[str], timesteps: Sequence[int],
                     noise_seed: int = 0, logits: bool = True, uncond: bool = False,
                     store_dtype: torch.dtype = torch.float32, cosine: bool = False) -> PassResult:
    """Noise `latent` at each timestep and run the UNet on all captions in one batch per timestep, traced.

    Args:
        pipe: a Stable-Diffusion-family pipeline (unet, vae, tokenizer, text_encoder, scheduler).
        latent: the scaled image latent, `[1, C, h, w]` (or `[C, h, w]`), e.g. from `encode_image`.
        captions: K non-empty captions.
        timesteps: S training timesteps in [0, num_train_timesteps); one UNet call each.
        noise_seed: seeds the noise; noise s (for the s-th timestep) is the s-th of S draws from
            `torch.Generator().manual_seed(noise_seed)`, and is the same for every caption.
        logits: also trace the pre-softmax logits.
        uncond: add one batch row with the "" prompt and report its errors (Diffusion-Classifier
            normalisation); its trace is `uncond_trace`.
        store_dtype: dtype of the stored attention; float32 by default, since caption scores often
            differ by less than fp16 resolution.
        cosine: also trace the cosine maps of projected query / key features (`AttentionTrace.cosine`,
            `[steps, heads, h, w, tokens]`; `interp.lse` pooling "cosine").
    Returns:
        PassResult (see there for the shapes).
    Raises:
        ValueError: no captions, an empty caption, no timesteps, a timestep out of range, a bad latent.
    """
    sched = pipe.scheduler
    n_train = int(sched.config.num_train_timesteps)
    captions, ts = _validate(captions, timesteps, n_train)
    if not torch.is_tensor(latent) or latent.dim() not in (3, 4) or (latent.dim() == 4 and latent.shape[0] != 1):
        raise ValueError(f"latent must be [1, C, h, w] or [C, h, w], got "
                         f"{tuple(latent.shape) if torch.is_tensor(latent) else type(latent).__name__}")
    unet = pipe.unet
    dev, dt = unet.device, unet.dtype
    z = latent.reshape(1, *latent.shape[-3:]).float().to(dev)
    prompts = captions + ([""] if uncond else [])
    B, K, S = len(prompts), len(captions), len(ts)
    ptype = sched.config.get("prediction_type", "epsilon")

    g = torch.Generator().manual_seed(int(noise_seed))
    noise = torch.randn((S, *z.shape[1:]), generator=g).to(dev)  # [S, C, h, w], shared by all rows

    tok = pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(pipe.text_encoder.device)
    emb = pipe.text_encoder(ids)[0].to(dev, dt)  # encoded once, outside the trace

    acp = sched.alphas_cumprod.to(dev, torch.float32)
    err = torch.zeros(B, S)
    err_eps = torch.zeros(B, S)
    with trace(pipe, prompts=prompts, logits=logits, cosine=cosine, dtype=store_dtype) as tr:
        for s, t in enumerate(ts):
            tt = torch.full((B,), t, dtype=torch.long, device=dev)
            eps = noise[s : s + 1].expand(B, -1, -1, -1)
            x0 = z.expand(B, -1, -1, -1)
            x_t = sched.add_noise(x0, eps, tt)
            if ptype == "epsilon":
                target = eps
            elif ptype == "v_prediction":
                target = sched.get_velocity(x0, eps, tt)
            elif ptype == "sample":
                target = x0
            else:
                raise ValueError(f"unsupported prediction_type {ptype!r}")
            pred = unet(x_t.to(dt), tt, encoder_hidden_states=emb).sample.float()
            err[:, s] = ((pred - target) ** 2).mean(dim=(1, 2, 3)).cpu()
            eps_hat = to_epsilon(pred, x_t, acp[t], ptype)
            err_eps[:, s] = ((eps_hat - eps) ** 2).mean(dim=(1, 2, 3)).cpu()
    traces = tr.traces
    return PassResult(
        captions=captions, timesteps=ts, traces=traces[:K], errors=err[:K], errors_eps=err_eps[:K],
        noise=noise.cpu(), prediction_type=ptype, unet_calls=S, unet_evals=S * B, noise_seed=int(noise_seed),
        uncond_errors=err[K] if uncond else None, uncond_errors_eps=err_eps[K] if uncond else None,
        uncond_trace=traces[K] if uncond else None,
    )
