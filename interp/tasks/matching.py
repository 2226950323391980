"""Image-text matching with a diffusion model: rank captions for an image, and word maps of one pass.

Task functions over the scorer registry (`interp.scorers`) and `models.unet_pass`. The pipe is passed in;
nothing is loaded here.

Example:
    >>> ranked = rank_image_captions(pipe, image, ["a red circle", "a blue square"], MatchOptions(scorer="auto"))
    >>> ranked[0]["caption"], ranked[0]["score"]
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from models.limits import out_of_vocabulary, validate_captions
from models.unet_pass import encode_image, noised_unet_pass

from interp.heatmaps import word_heatmaps
from interp.scorers import MatchOptions, ScoreResult, Scorer, get_scorer

__all__ = ["DEFAULT_MAP_TIMESTEP", "MatchOptions", "score_image_captions", "rank_image_captions",
           "word_maps_for_image", "validate_captions", "out_of_vocabulary"]

DEFAULT_MAP_TIMESTEP = 300


def score_image_captions(pipe, image: Image.Image, captions: Sequence[str],
                         options: MatchOptions = MatchOptions(), scorer: Scorer | str | None = None) -> ScoreResult:
    """Score every caption against the image with `scorer` (default: the registry's `options.scorer`)."""
    return get_scorer(options.scorer if scorer is None else scorer).score(pipe, image, captions, options)


def rank_image_captions(pipe, image: Image.Image, captions: Sequence[str],
                        options: MatchOptions = MatchOptions(), scorer: Scorer | str | None = None) -> list[dict]:
    """Captions sorted best first: [{"caption", "score"}]."""
    validate_captions(captions, min_count=2)
    return [{"caption": c, "score": v} for c, v in score_image_captions(pipe, image, captions, options, scorer).ranking()]


@torch.no_grad()
def word_maps_for_image(pipe, image: Image.Image, prompt: str, timestep: int = DEFAULT_MAP_TIMESTEP,
                        noise_seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """The app's default aggregate word maps for a real image: one noised UNet call at `timestep`,
    all layers and heads averaged, upsampled to the image's size. Returns (words, `[words, H, W]`)."""
    [prompt] = validate_captions([prompt], min_count=1)
    latent = encode_image(pipe, image)
    res = noised_unet_pass(pipe, latent, [prompt], [int(timestep)], noise_seed=noise_seed, logits=False)
    return word_heatmaps(res.traces[0], words=prompt.split(), size=image.height)
