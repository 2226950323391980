"""Image-text matching with a diffusion model: rank captions for an image, and word maps of one pass.

Orchestration over `models.scoring_pass` (one batched, traced UNet call per timestep) and the pure
scorers of `interp.lse`. The pipe is passed in; nothing is loaded here.

Example:
    >>> ranked = rank_image_captions(pipe, image, ["a red circle", "a blue square"])
    >>> ranked[0]["caption"], ranked[0]["score"]
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import torch
from PIL import Image

from models.scoring_pass import encode_image, noised_unet_pass

from .heatmaps import word_heatmaps
from .lse import denoising_score, lse_score, rank_captions

Scorer = Literal["lse", "denoise", "denoise_norm"]
DEFAULT_TIMESTEPS = (200, 400, 600, 800)
DEFAULT_MAP_TIMESTEP = 300


@dataclasses.dataclass(frozen=True)
class MatchOptions:
    """Scoring options. Defaults are provisional until the benchmark report picks the best ones."""

    scorer: Scorer = "lse"
    source: Literal["probs", "logits"] = "logits"
    layers: str | None = None  # None = all layers; "last_per_stage" = the authors' code
    pooling: str = "lse"  # interp.lse.POOLINGS; "cosine" reads the cosine maps (source ignored)
    lam: float = 1.0
    tokens: Literal["all", "words"] = "words"
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noise_seed: int = 0


def needs_logits(options: MatchOptions) -> bool:
    """Whether an option set reads the traced pre-softmax logits."""
    return options.scorer == "lse" and options.pooling != "cosine" and options.source == "logits"


def needs_cosine(options: MatchOptions) -> bool:
    """Whether an option set reads the traced cosine maps (pooling="cosine")."""
    return options.scorer == "lse" and options.pooling == "cosine"


def validate_captions(captions: Sequence[str] | None, min_count: int = 2) -> list[str]:
    """Clean captions, or ValueError with a message for the user."""
    if not captions:
        raise ValueError("no captions given")
    out = []
    for i, c in enumerate(captions):
        if c is None or not str(c).strip():
            raise ValueError(f"caption {i + 1} is empty")
        out.append(" ".join(str(c).split()))
    if len(out) < min_count:
        raise ValueError(f"ranking needs at least {min_count} captions, got {len(out)}")
    return out


def out_of_vocabulary(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` the tokenizer only spells letter by letter (unknown to its vocabulary)."""
    bad = []
    for w in prompt.split():
        toks = tokenizer.tokenize(w)
        if len(toks) > 1 and all(len(t.replace("</w>", "")) <= 1 for t in toks):
            bad.append(w)
    return bad


@torch.no_grad()
def score_image_captions(pipe, image: Image.Image, captions: Sequence[str],
                         options: MatchOptions = MatchOptions()) -> dict:
    """Score every caption against the image. Returns {"scores": {caption: float}, "breakdowns", "unet_evals"}."""
    caps = validate_captions(captions, min_count=1)
    if options.scorer not in ("lse", "denoise", "denoise_norm"):
        raise ValueError(f"unknown scorer {options.scorer!r}; expected lse, denoise or denoise_norm")
    latent = encode_image(pipe, image)
    need_uncond = options.scorer == "denoise_norm"
    res = noised_unet_pass(pipe, latent, caps, list(options.timesteps), noise_seed=options.noise_seed,
                           logits=needs_logits(options), cosine=needs_cosine(options), uncond=need_uncond)
    breakdowns = {}
    if options.scorer == "lse":
        for c, tr in zip(caps, res.traces):
            b = lse_score(tr, source=options.source, layers=options.layers, pooling=options.pooling,
                          lam=options.lam, tokens=options.tokens)
            breakdowns[c] = b
        scores = {c: float(b.score) for c, b in breakdowns.items()}
    else:
        errs = res.errors
        s = denoising_score(errs, res.uncond_errors if need_uncond else None)
        scores = {c: float(v) for c, v in zip(caps, s)}
    return {"scores": scores, "breakdowns": breakdowns, "unet_evals": res.unet_evals, "pass": res}


def rank_image_captions(pipe, image: Image.Image, captions: Sequence[str],
                        options: MatchOptions = MatchOptions()) -> list[dict]:
    """Captions sorted best first: [{"caption", "score"}]."""
    validate_captions(captions, min_count=2)
    return rank_captions(score_image_captions(pipe, image, captions, options)["scores"])


@torch.no_grad()
def word_maps_for_image(pipe, image: Image.Image, prompt: str, timestep: int = DEFAULT_MAP_TIMESTEP,
                        noise_seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """The app's default aggregate word maps for a real image: one noised UNet call at `timestep`,
    all layers and heads averaged, upsampled to the image's size. Returns (words, `[words, H, W]`)."""
    [prompt] = validate_captions([prompt], min_count=1)
    latent = encode_image(pipe, image)
    res = noised_unet_pass(pipe, latent, [prompt], [int(timestep)], noise_seed=noise_seed, logits=False)
    return word_heatmaps(res.traces[0], words=prompt.split(), size=image.height)
