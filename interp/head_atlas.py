"""Head atlas: which word class does each (layer, head) ground best, overall and per timestep?

Built from `interp.grounding.grounding_table` rows (one per layer x head x step x word); pure functions over
rows. The figures live in `interp.figures` (`atlas_figure`, `atlas_plotly`).

For every (layer, head): per word class (color, shape, count, size) the mean energy / pointing / iou over
the rows, the best class per metric (highest mean; ties go to the first class in `classes` order) and its
score, and the same per timestep.

Caveat: energy and iou are not chance-corrected. A count word's mask is the union of 2-3 objects, so a
diffuse head scores a higher count energy than color / shape energy by area alone; color and shape words of
one phrase share one mask, so these two compare fairly.

    >>> rows = [r for tr, sc in zip(traces, scenes) for r in grounding_table(tr, sc)]
    >>> table = atlas_table(rows)
    >>> table[0]["best"]["energy"]            # {"class": "color", "score": 0.41}
    >>> interp.tasks.faithfulness.save_atlas(table, "out/atlas")   # atlas.json + atlas.png
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

from .grounding import METRICS

__all__ = ["CLASSES", "atlas_table", "atlas_grid"]

CLASSES: tuple[str, ...] = ("color", "shape", "count", "size")


def _stats(rows: Sequence[dict], classes: Sequence[str]) -> dict:
    """{class: {metric means, "n"}} for the classes present in the rows."""
    acc: dict = defaultdict(lambda: {m: 0.0 for m in METRICS} | {"n": 0})
    for r in rows:
        a = acc[r["word_class"]]
        for m in METRICS:
            a[m] += float(r[m])
        a["n"] += 1
    out = {}
    for c in classes:
        if c in acc and acc[c]["n"]:
            n = acc[c]["n"]
            out[c] = {m: acc[c][m] / n for m in METRICS} | {"n": n}
    return out


def _best(by_class: dict, classes: Sequence[str]) -> dict:
    """{metric: {"class", "score"}}: the class with the highest mean (first in `classes` on ties)."""
    out = {}
    for m in METRICS:
        best_c, best_s = None, -math.inf
        for c in classes:
            if c in by_class and by_class[c][m] > best_s:
                best_c, best_s = c, by_class[c][m]
        out[m] = {"class": best_c, "score": best_s if best_c is not None else None}
    return out


def _time_key(r: dict):
    t = r.get("timestep")
    return ("t", float(t)) if t is not None else ("s", int(r.get("step", 0)))


def atlas_table(rows: Iterable[dict], classes: Sequence[str] = CLASSES, metric: str = "energy") -> list[dict]:
    """The atlas: one entry per (layer, head), layers in first-seen order (UNet order for grounding_table
    rows), heads ascending.

    Each entry: {"layer", "head", "n" (rows), "by_class": {class: {"energy", "pointing", "iou", "n"}},
    "best": {metric: {"class", "score"}} (every metric), "best_class" / "best_score" (for `metric`),
    "by_timestep": [{"timestep" (None if the rows have none),
    "step", "by_class", "best"}, ...] ascending in timestep (in step without timesteps)}.
    Rows of other word classes (e.g. relation) are ignored; a (layer, head) without rows of the classes
    is left out.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    classes = tuple(classes)
    groups: dict = {}
    layer_order: dict = {}
    for r in rows:
        if r.get("word_class") not in classes:
            continue
        layer_order.setdefault(r["layer"], len(layer_order))
        groups.setdefault((r["layer"], int(r["head"])), []).append(r)
    table = []
    for (layer, head) in sorted(groups, key=lambda k: (layer_order[k[0]], k[1])):
        rs = groups[(layer, head)]
        by_class = _stats(rs, classes)
        per_t: dict = {}
        for r in rs:
            per_t.setdefault(_time_key(r), []).append(r)
        by_t = []
        for key in sorted(per_t):
            trs = per_t[key]
            bc = _stats(trs, classes)
            by_t.append({"timestep": trs[0].get("timestep"), "step": trs[0].get("step"), "by_class": bc,
                         "best": _best(bc, classes)})
        best = _best(by_class, classes)
        table.append({"layer": layer, "head": head, "n": len(rs), "by_class": by_class, "best": best,
                      "best_class": best[metric]["class"], "best_score": best[metric]["score"],
                      "by_timestep": by_t})
    return table


def atlas_grid(table: Sequence[dict], metric: str = "energy", timestep: float | None = None):
    """The atlas as a layers x heads grid for figures.

    Returns (layers, heads, cells) with `cells[i][j]` the entry's {"class", "score", "by_class"} for
    layer i and head j, or None where the table has no such (layer, head) (or no rows at `timestep`).
    timestep: use that timestep's best class instead of the overall one.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    layers = list(dict.fromkeys(e["layer"] for e in table))
    heads = sorted({int(e["head"]) for e in table})
    cells: list[list] = [[None] * len(heads) for _ in layers]
    for e in table:
        src = e
        if timestep is not None:
            src = next((t for t in e["by_timestep"] if t["timestep"] is not None
                        and float(t["timestep"]) == float(timestep)), None)
            if src is None:
                continue
        b = src["best"][metric]
        if b["class"] is None:
            continue
        cells[layers.index(e["layer"])][heads.index(int(e["head"]))] = {
            "class": b["class"], "score": float(b["score"]),
            "by_class": {c: float(v[metric]) for c, v in src["by_class"].items()}}
    return layers, heads, cells
