"""What the app's generation view shows: a traced generation and its word maps, as plain data.

Example:
    >>> res = traced_generation(load_pipeline(), "a red circle left of a blue square", seed=0)
    >>> res.image, res.words, res.word_maps.shape   # PIL, list[str], [words, 64, 64]
"""
from __future__ import annotations

import dataclasses

import torch
from PIL import Image

from models.loading import ModelDefaults
from models.trace import AttentionTrace, trace

from interp.heatmaps import overlay, word_heatmaps


@dataclasses.dataclass
class TracedGeneration:
    image: Image.Image
    trace: AttentionTrace
    words: list[str]
    word_maps: torch.Tensor  # [words, H, W] (all layers, heads and steps averaged)

    def overlays(self) -> list[tuple[Image.Image, str]]:
        """(overlay image, word) pairs for a gallery."""
        return [(overlay(self.image, m), w) for w, m in zip(self.words, self.word_maps)]


def validate_prompt(prompt: str | None, tokenizer) -> str:
    """A clean prompt, or ValueError with a message for the user."""
    if prompt is None or not prompt.strip():
        raise ValueError("the prompt is empty")
    p = " ".join(prompt.strip().split())
    n = len(tokenizer(p).input_ids)
    if n > tokenizer.model_max_length:
        raise ValueError(f"the prompt is too long for this model ({n} tokens > {tokenizer.model_max_length})")
    return p


@torch.inference_mode()
def traced_generation(pipe, prompt: str, seed: int = 0, steps: int | None = None,
                      guidance: float | None = None) -> TracedGeneration:
    """Generate one image with every cross-attention layer, head and step traced."""
    d: ModelDefaults = getattr(pipe, "discolens_defaults", ModelDefaults())
    prompt = validate_prompt(prompt, pipe.tokenizer)
    kw = {"height": d.size, "width": d.size} if d.size else {}
    gen = torch.Generator("cpu").manual_seed(int(seed))
    with trace(pipe) as tr:
        img = pipe(prompt, num_inference_steps=steps or d.steps, guidance_scale=d.guidance if guidance is None else guidance,
                   generator=gen, **kw).images[0]
    t = tr.trace
    words, maps = word_heatmaps(t, size=img.height)
    return TracedGeneration(img, t, words, maps)


ALL = "all"


def slice_choices(tr: AttentionTrace) -> dict[str, list[str]]:
    """Dropdown choices for a trace: layers (aliases), heads and steps (with their timesteps), each with 'all'."""
    heads = max(l.heads for l in tr.layers)
    return {"layers": [ALL, *tr.layer_names], "heads": [ALL, *[str(h) for h in range(heads)]],
            "steps": [ALL, *[f"{i} (t={int(t)})" for i, t in enumerate(tr.timesteps)]]}


def slice_overlays(image: Image.Image, tr: AttentionTrace, layer: str = ALL, head: str = ALL,
                   step: str = ALL) -> list[tuple[Image.Image, str]]:
    """Word-map overlays for one slice of the trace ('all' averages that axis)."""
    layers = None if layer in (None, ALL) else [layer]
    heads = None if head in (None, ALL) else [int(head)]
    steps = None if step in (None, ALL) else [int(str(step).split()[0])]
    if heads is not None and layers is not None and heads[0] >= tr.layer(layer).heads:
        raise ValueError(f"layer {layer} has {tr.layer(layer).heads} heads")
    words, maps = word_heatmaps(tr, layers=layers, heads=heads, steps=steps, size=image.height)
    return [(overlay(image, m), w) for w, m in zip(words, maps)]
