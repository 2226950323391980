"""Sampling images from a pipeline with per-prompt seeds (deterministic on CPU).

Example:
    >>> pipe = load_pipeline()
    >>> [img] = generate_images(pipe, ["a red circle"], seeds=[0])
"""
from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .loading import ModelDefaults


def _defaults(pipe) -> ModelDefaults:
    return getattr(pipe, "discolens_defaults", ModelDefaults())


@torch.inference_mode()
def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
                    guidance: float | None = None, size: int | None = None, batch_size: int = 32,
                    callback=None) -> list[Image.Image]:
    """Generate one image per prompt, each with its own seeded generator.

    Args:
        pipe: a StableDiffusionPipeline (from `load_pipeline`).
        prompts / seeds: same length; image i uses `torch.Generator().manual_seed(seeds[i])`.
        steps, guidance, size: default to the model's defaults (`pipe.discolens_defaults`).
        batch_size: prompts per pipeline call.
        callback: called with the number of images done after each batch.
    Returns:
        PIL images, in prompt order.
    """
    if len(prompts) != len(seeds):
        raise ValueError("prompts and seeds must have the same length")
    d = _defaults(pipe)
    steps = steps or d.steps
    guidance = d.guidance if guidance is None else guidance
    size = size or d.size
    out: list[Image.Image] = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i : i + batch_size]), seeds[i : i + batch_size]
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in ss]
        kw = {"height": size, "width": size} if size else {}
        res = pipe(ps, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **kw)
        out.extend(res.images)
        if callback:
            callback(len(out))
    return out


def generate_image(pipe, prompt: str, seed: int = 0, steps: int | None = None,
                   guidance: float | None = None) -> Image.Image:
    """One image from one prompt."""
    return generate_images(pipe, [prompt], [seed], steps=steps, guidance=guidance)[0]
