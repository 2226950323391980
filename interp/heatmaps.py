"""Heat maps from an AttentionTrace: aggregation over any subset of layers / heads / steps, word merges,
slices and overlays. Pure functions over traces and tensors; no model is run here.

Example:
    >>> maps = token_heatmaps(tr.trace, size=64)            # [tokens, 64, 64]
    >>> words, wmaps = word_heatmaps(tr.trace, size=64)     # sub-word tokens merged, BOS/EOS dropped
    >>> overlay(image, wmaps[1])                             # PIL image
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image

from models.trace import AttentionTrace

Reduce = Literal["mean", "sum"]
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _select_layers(trace: AttentionTrace, layers: Sequence[int | str] | None) -> list[str]:
    if layers is None:
        return trace.layer_names
    return [trace.layer(l).alias for l in layers]


def layer_maps(trace: AttentionTrace, layer: int | str, steps: Sequence[int] | None = None,
               heads: Sequence[int] | None = None, source: Literal["probs", "logits"] = "probs") -> torch.Tensor:
    """One layer's maps averaged over the chosen steps and heads: float32 `[tokens, h, w]`."""
    alias = trace.layer(layer).alias
    x = (trace.probs if source == "probs" else trace.logits)[alias].float()  # [steps, heads, h, w, tokens]
    if steps is not None:
        x = x[list(steps)]
    if heads is not None:
        x = x[:, list(heads)]
    return x.mean((0, 1)).permute(2, 0, 1)


def token_heatmaps(trace: AttentionTrace, layers: Sequence[int | str] | None = None,
                   heads: Sequence[int] | None = None, steps: Sequence[int] | None = None, size: int = 64,
                   layer_reduce: Reduce = "mean", source: Literal["probs", "logits"] = "probs") -> torch.Tensor:
    """Per-token heat maps at `size`x`size`: per layer the mean over steps and heads, bilinearly
    upsampled, then the mean (or DAAM's sum) over layers. Returns float32 `[tokens, size, size]`."""
    out = None
    names = _select_layers(trace, layers)
    if not names:
        raise ValueError("no layers selected")
    for name in names:
        m = layer_maps(trace, name, steps, heads, source)[None]  # [1, tokens, h, w]
        up = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0]
        out = up if out is None else out + up
    return out / len(names) if layer_reduce == "mean" else out


def merge_subwords(tokens: Sequence[str], words: Sequence[str]) -> list[list[int]]:
    """Group token indices (BOS/EOS excluded) into the given words, in order.

    Tokens are concatenated until they spell the next word; raises ValueError if they do not.
    """
    groups: list[list[int]] = []
    ti = [i for i, t in enumerate(tokens) if t not in SPECIAL]
    k = 0
    for w in words:
        acc, idx = "", []
        while k < len(ti) and len(acc) < len(w):
            acc += tokens[ti[k]]
            idx.append(ti[k])
            k += 1
        if acc != w:
            raise ValueError(f"tokens {tokens} do not spell the words {list(words)}")
        groups.append(idx)
    return groups


def word_heatmaps(trace: AttentionTrace, words: Sequence[str] | None = None, **kw) -> tuple[list[str], torch.Tensor]:
    """Word-level maps: sub-word token maps summed per word. Returns (words, float32 `[words, size, size]`)."""
    words = list(words) if words is not None else trace.prompt.split()
    maps = token_heatmaps(trace, **kw)
    groups = merge_subwords(trace.tokens, words)
    return words, torch.stack([maps[g].sum(0) for g in groups])


def normalize(m: torch.Tensor | np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] (min-max); a constant map becomes zeros."""
    a = np.asarray(m, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo < 1e-12 else (a - lo) / (hi - lo)


def overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, alpha: float = 0.55, cmap: str = "jet") -> Image.Image:
    """The heat map (min-max normalised, colour-mapped) blended over the image, at the image's size."""
    img = image.convert("RGB")
    h = normalize(heat)
    if h.shape != (img.height, img.width):
        h = np.asarray(Image.fromarray((h * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR), np.float32) / 255
    rgb = (colormaps[cmap](h)[..., :3] * 255).astype(np.uint8)
    return Image.blend(img, Image.fromarray(rgb), alpha)


def colorbar(width: int = 256, height: int = 14, cmap: str = "jet") -> Image.Image:
    """The overlays' colour scale as a horizontal strip (left: a map's lowest value, right: its highest)."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return Image.fromarray((colormaps[cmap](ramp)[..., :3] * 255).astype(np.uint8))
