"""Grounding: are cross-attention maps faithful to the shapes world's exact object masks?

Pure functions over maps, traces and scenes; no model is run here.

Metrics on one map (2-D, non-negative, any resolution; bilinearly resized to the mask's size) against
one mask (2-D, binary or soft, binarised at > 0.5):

    pointing_game(m, mask)   the map's argmax lies inside the mask
    energy_inside(m, mask)   share of the map's mass inside the mask (a uniform map: the mask's area fraction)
    best_iou(m, mask)        best IoU of (min-max normalised map >= thr) with the mask, over thresholds

Per slice: `grounding_table(trace, scene)` scores every (layer, head, step, word) of a trace, vectorised.
Aggregates: `aggregate_maps(trace, "mean" | "daam" | "best_layer" | "best_head" | "weighted", ...)`, scored
with `score_maps`; `rank_slices(rows)` picks layers / heads on a calibration set; `summarize(rows)` groups.

Example:
    >>> rows = grounding_table(tr.trace, scene)                      # one dict per layer x head x step x word
    >>> summarize(rows, by=("word_class",))["color"]["energy"]
    >>> ranked = rank_slices(calibration_rows)                       # {"layers": [...], "heads": [...]}
    >>> (layer, head), _ = ranked["heads"][0]
    >>> maps = aggregate_maps(trace, "best_head", layer=layer, head=head)
    >>> score_maps(maps, trace, scene)
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.shapes import world
from models.trace import AttentionTrace

from .heatmaps import SPECIAL, merge_subwords, token_heatmaps

__all__ = ["DEFAULT_THRESHOLDS", "METRICS", "AGGREGATES", "pointing_game", "energy_inside", "best_iou",
           "batch_metrics", "word_mask_pairs", "grounding_table", "aggregate_maps", "score_maps",
           "rank_slices", "summarize"]

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 .. 0.95
METRICS = ("pointing", "energy", "iou")
AGGREGATES = ("mean", "daam", "best_layer", "best_head", "weighted")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def _as_tensor(x) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().float().cpu()
    return torch.as_tensor(np.asarray(x, dtype=np.float32))


def _resize(maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """`[..., h, w]` -> `[..., H, W]` bilinearly (align_corners=False, as token_heatmaps)."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:])
    x = F.interpolate(x, size=tuple(hw), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *hw)


def batch_metrics(maps: torch.Tensor, masks: torch.Tensor,
                  thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, torch.Tensor]:
    """The three metrics for a batch of maps against masks of the same size (broadcast over leading dims).

    Args:
        maps: `[..., H, W]` non-negative maps at the masks' resolution (negative values count as 0).
        masks: `[..., H, W]` binary or soft masks (binarised at > 0.5), broadcastable against `maps`.
        thresholds: IoU thresholds on the min-max normalised map.
    Returns:
        dict of tensors of the broadcast leading shape: pointing (bool), energy, iou, iou_threshold.
        iou_threshold is the lowest threshold reaching the best IoU. A map with no mass has energy 0;
        a constant map predicts nothing (IoU 0).
    """
    if not thresholds:
        raise ValueError("thresholds must not be empty")
    m = maps.float().clamp(min=0)
    b = (masks.float() > 0.5)
    m, b = torch.broadcast_tensors(m, b)
    lead = m.shape[:-2]
    m, b = m.reshape(*lead, -1), b.reshape(*lead, -1)
    bf = b.float()

    arg = m.argmax(-1, keepdim=True)
    pointing = b.gather(-1, arg).squeeze(-1)

    mass = m.sum(-1)
    inside = (m * bf).sum(-1)
    energy = torch.where(mass > 0, inside / mass.clamp(min=1e-30), torch.zeros_like(mass))

    # IoU at every threshold in one pass: bucket each pixel by how many thresholds it reaches, count
    # pixels (all / inside the mask) per bucket, then the predicted region at threshold k is buckets > k.
    thr_values = sorted(float(t) for t in thresholds)
    thr, k = torch.tensor(thr_values, dtype=torch.float32), len(thr_values)
    lo, hi = m.amin(-1, keepdim=True), m.amax(-1, keepdim=True)
    span = hi - lo
    norm = (m - lo) / span.clamp(min=1e-12)
    bucket = torch.bucketize(norm.contiguous(), thr, right=True)  # number of thresholds <= norm, 0..k
    bucket = torch.where(span > 1e-12, bucket, torch.zeros_like(bucket))  # a constant map predicts nothing
    n = bucket[..., 0].numel()
    flat = (bucket.reshape(n, -1) + (k + 1) * torch.arange(n)[:, None]).reshape(-1)
    all_c = torch.bincount(flat, minlength=n * (k + 1)).reshape(n, k + 1).float()
    in_c = torch.bincount(flat, weights=bf.reshape(-1), minlength=n * (k + 1)).reshape(n, k + 1).float()
    pred = all_c.flip(-1).cumsum(-1).flip(-1)[:, 1:]  # [n, k]: pixels with norm >= thr[j]
    inter = in_c.flip(-1).cumsum(-1).flip(-1)[:, 1:]
    union = bf.sum(-1).reshape(n, 1) + pred - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    best, j = iou.max(-1)
    best, best_thr = best.reshape(lead), torch.tensor(thr_values, dtype=torch.float64)[j].reshape(lead)
    return {"pointing": pointing, "energy": energy, "iou": best, "iou_threshold": best_thr}


def _single(m, mask, thresholds=DEFAULT_THRESHOLDS) -> dict[str, torch.Tensor]:
    mt, kt = _as_tensor(m), _as_tensor(mask)
    if mt.ndim != 2 or kt.ndim != 2:
        raise ValueError(f"expected 2-D map and mask, got shapes {tuple(mt.shape)} and {tuple(kt.shape)}")
    return batch_metrics(_resize(mt, tuple(kt.shape)), kt, thresholds)


def pointing_game(m, mask) -> bool:
    """Whether the map's argmax (after resizing to the mask's size) lies inside the mask (> 0.5)."""
    return bool(_single(m, mask, (0.5,))["pointing"])


def energy_inside(m, mask) -> float:
    """Share of the map's mass inside the binarised mask: sum(m * (mask > 0.5)) / sum(m); 0 for an empty map."""
    return float(_single(m, mask, (0.5,))["energy"])


def best_iou(m, mask, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> tuple[float, float]:
    """Best IoU of (min-max normalised map >= thr) with the binarised mask, and the lowest threshold reaching it."""
    r = _single(m, mask, thresholds)
    return float(r["iou"]), float(r["iou_threshold"])


# ----------------------------------------------------------------------------------------------
# Words and masks
# ----------------------------------------------------------------------------------------------
def word_mask_pairs(scene: world.Scene, size: int = world.IMAGE_SIZE) -> list[tuple[int, str, str, np.ndarray]]:
    """`(word_index, word, word_class, mask [size, size])` for each caption word that refers to objects.

    Color, shape and size words get their phrase's object mask; the words of a count phrase (number,
    color, plural shape) the union of its objects; relation words and "a" are left out.
    """
    words = scene.caption.split()
    classes = world.word_classes(scene.caption)
    masks = world.word_masks(scene, size)
    return [(i, words[i], classes[i], masks[i]) for i in range(len(words)) if masks[i] is not None]


def _word_groups(trace: AttentionTrace, caption: str) -> list[list[int]]:
    words = caption.split()
    spelled = "".join(t for t in trace.tokens if t not in SPECIAL)
    if spelled != "".join(words):
        raise ValueError(f"trace tokens {trace.tokens} do not spell the caption {caption!r}")
    return merge_subwords(trace.tokens, words)


def _pairs_and_groups(trace: AttentionTrace, scene: world.Scene, size: int):
    pairs = word_mask_pairs(scene, size)
    groups = _word_groups(trace, scene.caption)
    masks = torch.stack([torch.from_numpy(np.asarray(p[3], np.float32)) for p in pairs]) if pairs else None
    return pairs, groups, masks


def _word_sum(x: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum token columns (last dim) into word columns: `[..., tokens]` -> `[..., words]`."""
    sel = torch.zeros(x.shape[-1], len(groups), dtype=x.dtype)
    for j, g in enumerate(groups):
        sel[list(g), j] = 1
    return x @ sel


# ----------------------------------------------------------------------------------------------
# Per-slice table
# ----------------------------------------------------------------------------------------------
def grounding_table(trace: AttentionTrace, scene: world.Scene, size: int = world.IMAGE_SIZE,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    layers: Sequence[int | str] | None = None) -> list[dict]:
    """Score every (layer, head, step, masked word) slice of a trace against the scene's masks.

    Word maps are the sums of the word's sub-token maps (`merge_subwords`), bilinearly upsampled to
    `size` (the masks' resolution).

    Returns:
        one dict per slice: layer (alias), head (model head index), step (index into the trace's UNet
        calls), timestep, word_index (into `caption.split()`), word, word_class, caption, kind,
        pointing (bool), energy, iou, iou_threshold.
    """
    pairs, groups, masks = _pairs_and_groups(trace, scene, size)
    if not pairs:
        return []
    wgroups = [groups[p[0]] for p in pairs]
    names = trace.layer_names if layers is None else [trace.layer(l).alias for l in layers]
    rows: list[dict] = []
    for alias in names:
        info = trace.layer(alias)
        x = _word_sum(trace.probs[alias].float(), wgroups)  # [steps, heads, h, w, words]
        x = _resize(x.permute(0, 1, 4, 2, 3), (size, size))  # [steps, heads, words, size, size]
        r = {k: v.tolist() for k, v in batch_metrics(x, masks, thresholds).items()}
        head_ids = trace.heads if trace.heads is not None else list(range(info.heads))
        for s in range(x.shape[0]):
            t = trace.timesteps[s] if s < len(trace.timesteps) else None
            for h in range(x.shape[1]):
                for j, (wi, word, cls, _) in enumerate(pairs):
                    rows.append({
                        "layer": alias, "head": int(head_ids[h]), "step": s, "timestep": t,
                        "word_index": wi, "word": word, "word_class": cls,
                        "caption": scene.caption, "kind": scene.kind,
                        "pointing": bool(r["pointing"][s][h][j]), "energy": r["energy"][s][h][j],
                        "iou": r["iou"][s][h][j], "iou_threshold": r["iou_threshold"][s][h][j],
                    })
    return rows


# ----------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------
def _head_pos(trace: AttentionTrace, head: int) -> int:
    """Position in the stored heads of a model head index."""
    if trace.heads is None:
        return int(head)
    if head not in trace.heads:
        raise KeyError(f"head {head} was not traced; traced heads: {trace.heads}")
    return trace.heads.index(head)


def _weighted_maps(trace: AttentionTrace, weights: Mapping[tuple[str, int], float], size: int,
                   steps: Sequence[int] | None) -> torch.Tensor:
    w = {(trace.layer(l).alias, int(h)): float(v) for (l, h), v in weights.items()}
    if any(v < 0 or not np.isfinite(v) for v in w.values()):
        raise ValueError("weights must be non-negative and finite")
    total = sum(v for (l, h), v in w.items() if v > 0)
    if total <= 0:
        raise ValueError("weights are all zero")
    out = None
    for info in trace.layers:
        vec = torch.zeros(trace.probs[info.alias].shape[1])
        for (l, h), v in w.items():
            if l == info.alias and v > 0:
                vec[_head_pos(trace, h)] = v / total
        if not vec.any():
            continue
        x = trace.probs[info.alias].float()
        if steps is not None:
            x = x[list(steps)]
        m = torch.einsum("shyxt,h->tyx", x, vec) / x.shape[0]  # mean over steps, weighted sum over heads
        up = _resize(m, (size, size))
        out = up if out is None else out + up
    return out


def aggregate_maps(trace: AttentionTrace, name: str, size: int = world.IMAGE_SIZE, *,
                   layer: int | str | None = None, head: int | None = None,
                   weights: Mapping[tuple[str, int], float] | None = None,
                   steps: Sequence[int] | None = None) -> torch.Tensor:
    """Per-token maps float32 `[tokens, size, size]` of a named aggregate.

    Args:
        name: "mean" (all layers, heads and steps averaged: `token_heatmaps` default); "daam" (the sum
            over layers, `layer_reduce="sum"`); "best_layer" (`layer`'s maps, heads and steps averaged);
            "best_head" (`layer`'s `head`, steps averaged); "weighted" (sum over (layer, head) of
            weight x that head's step-averaged map, with `weights` a {(layer alias, head): weight}
            table, non-negative, normalised here to sum 1; missing pairs weigh 0).
        layer, head: the chosen layer / head (e.g. from `rank_slices` on a calibration set); `head` is
            the model's head index.
        steps: UNet-call indices to average over (default all).
    """
    if name == "mean":
        return token_heatmaps(trace, steps=steps, size=size)
    if name == "daam":
        return token_heatmaps(trace, steps=steps, size=size, layer_reduce="sum")
    if name == "best_layer":
        if layer is None:
            raise ValueError("best_layer needs layer=")
        return token_heatmaps(trace, layers=[layer], steps=steps, size=size)
    if name == "best_head":
        if layer is None or head is None:
            raise ValueError("best_head needs layer= and head=")
        return token_heatmaps(trace, layers=[layer], heads=[_head_pos(trace, head)], steps=steps, size=size)
    if name == "weighted":
        if not weights:
            raise ValueError("weighted needs weights={(layer, head): weight}")
        return _weighted_maps(trace, weights, size, steps)
    raise ValueError(f"unknown aggregate {name!r}; expected one of {AGGREGATES}")


def score_maps(maps: torch.Tensor, trace: AttentionTrace, scene: world.Scene,
               thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[dict]:
    """Score per-token maps `[tokens, H, W]` (e.g. from `aggregate_maps`) for each masked word of the scene.

    Word maps are sums of sub-token maps; masks are taken at the maps' resolution H (square).
    Returns one dict per masked word: word_index, word, word_class, caption, kind, pointing, energy,
    iou, iou_threshold.
    """
    size = maps.shape[-1]
    if maps.shape[-2] != size:
        raise ValueError(f"square maps expected, got {tuple(maps.shape[-2:])}")
    pairs, groups, masks = _pairs_and_groups(trace, scene, size)
    if not pairs:
        return []
    wm = torch.stack([maps[groups[p[0]]].float().sum(0) for p in pairs])
    r = {k: v.tolist() for k, v in batch_metrics(wm, masks, thresholds).items()}
    return [{"word_index": wi, "word": word, "word_class": cls, "caption": scene.caption, "kind": scene.kind,
             "pointing": bool(r["pointing"][j]), "energy": r["energy"][j], "iou": r["iou"][j],
             "iou_threshold": r["iou_threshold"][j]}
            for j, (wi, word, cls, _) in enumerate(pairs)]


# ----------------------------------------------------------------------------------------------
# Ranking and summaries
# ----------------------------------------------------------------------------------------------
def _means(rows: Iterable[dict], key, metric: str) -> dict:
    acc: dict = defaultdict(lambda: [0.0, 0])
    for r in rows:
        a = acc[key(r)]
        a[0] += float(r[metric])
        a[1] += 1
    return {k: s / n for k, (s, n) in acc.items()}


def rank_slices(rows: Sequence[dict], by: str = "energy") -> dict[str, list]:
    """Rank layers and (layer, head) pairs by the mean of a metric over `grounding_table` rows.

    Returns:
        {"layers": [(layer, score), ...], "heads": [((layer, head), score), ...]}, best first (ties keep
        first-seen order). `dict(ranked["heads"])` is a weight table for `aggregate_maps(..., "weighted")`.
    """
    if by not in METRICS:
        raise ValueError(f"unknown metric {by!r}; expected one of {METRICS}")
    layers = _means(rows, lambda r: r["layer"], by)
    heads = _means(rows, lambda r: (r["layer"], r["head"]), by)
    order = lambda d: sorted(d.items(), key=lambda kv: -kv[1])  # noqa: E731  (stable sort)
    return {"layers": order(layers), "heads": order(heads)}


def summarize(rows: Sequence[dict], by: Sequence[str] = ("word_class",)) -> dict:
    """Mean pointing / energy / iou and the count n of rows, grouped by the given keys.

    Keys of the result: the group value when `by` names one key, the tuple of values otherwise
    (`by=()` gives one group, key `()`).
    """
    by = tuple(by)
    key = (lambda r: r[by[0]]) if len(by) == 1 else (lambda r: tuple(r[k] for k in by))
    groups: dict = defaultdict(list)
    for r in rows:
        groups[key(r)].append(r)
    out = {}
    for k, rs in groups.items():
        d = {m: float(np.mean([float(r[m]) for r in rs])) for m in METRICS}
        d["n"] = len(rs)
        out[k] = d
    return out
