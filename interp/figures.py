"""Figures over analysis tables (matplotlib for files, plotly for the app). No model is run here.

Head atlas (`interp.head_atlas.atlas_table`):

    >>> fig = atlas_figure(table, metric="energy")    # matplotlib Figure: layers x heads, hue = best class
    >>> fig.savefig("atlas.png")
    >>> atlas_plotly(table)                           # plotly Figure (heatmap with hover text) for the app

Figures are built on `matplotlib.figure.Figure` directly (no pyplot state, no GUI backend needed).
"""
from __future__ import annotations

from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import plotly.graph_objects as go
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from plotly.subplots import make_subplots

from .head_atlas import atlas_grid
from .heatmaps import overlay

__all__ = ["CLASS_COLORS", "class_color", "atlas_figure", "atlas_plotly", "breakdown_plotly", "fused_terms_plotly",
           "heads_plotly", "structure_plotly", "word_map_sheet", "sample_grid"]

# one hue per word class (colorblind-friendly Okabe-Ito)
CLASS_COLORS: dict[str, tuple[float, float, float]] = {
    "color": (0.835, 0.369, 0.0),    # vermillion
    "shape": (0.0, 0.447, 0.698),    # blue
    "count": (0.0, 0.62, 0.451),     # bluish green
    "size": (0.8, 0.475, 0.655),     # reddish purple
}
_EXTRA = [(0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.941, 0.894, 0.259), (0.3, 0.3, 0.3)]
_EMPTY = (0.93, 0.93, 0.93)


def class_color(cls: str, classes: Sequence[str] = ()) -> tuple[float, float, float]:
    """RGB in [0, 1] of a word class (classes outside CLASS_COLORS get further palette colors in order)."""
    if cls in CLASS_COLORS:
        return CLASS_COLORS[cls]
    extra = [c for c in classes if c not in CLASS_COLORS]
    return _EXTRA[(extra.index(cls) if cls in extra else 0) % len(_EXTRA)]


def _tint(rgb, intensity: float) -> np.ndarray:
    """White blended toward `rgb` by `intensity` in [0, 1]."""
    a = float(np.clip(intensity, 0.0, 1.0))
    return (1 - a) * np.ones(3) + a * np.asarray(rgb, float)


def _short(caption: str) -> str:
    """A caption cut to 39 characters for a figure's titles and axes."""
    return caption if len(caption) < 40 else caption[:37] + "..."


def _classes_of(cells) -> list[str]:
    return list(dict.fromkeys(c["class"] for row in cells for c in row if c is not None))


def atlas_figure(table: Sequence[dict], metric: str = "energy", timestep: float | None = None,
                 vmax: float = 1.0, annotate: bool = True, cell_inches: float = 0.55):
    """The head atlas as a layers (rows) x heads (columns) grid.

    Each cell is colored by its best word class (one hue per class, legend below) with intensity
    score / vmax (the metrics are in [0, 1], so vmax 1 keeps intensities comparable across figures), and
    shows the score as text; cells without rows are light gray. `timestep` shows that timestep's best.
    Returns a matplotlib Figure with one image (`ax.images[0]`, `[layers, heads, 3]`) and one text per
    filled cell.
    """
    layers, heads, cells = atlas_grid(table, metric, timestep)
    if not layers:
        raise ValueError("the atlas table is empty")
    classes = _classes_of(cells)
    rgb = np.empty((len(layers), len(heads), 3))
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            rgb[i, j] = _EMPTY if c is None else _tint(class_color(c["class"], classes), c["score"] / vmax)
    w = max(4.0, 1.6 + cell_inches * len(heads))
    h = max(2.5, 1.4 + cell_inches * len(layers))
    fig = Figure(figsize=(w, h), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(heads)), [str(x) for x in heads])
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(-0.5, len(heads)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(layers)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    if annotate:
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                if c is not None:
                    dark = c["score"] / vmax > 0.6
                    ax.text(j, i, f"{c['score']:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if dark else "black")
    when = f" at t={timestep:g}" if timestep is not None else ""
    ax.set_title(f"head atlas: best word class by {metric}{when}")
    handles = [Patch(color=class_color(c, classes), label=c) for c in classes]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return fig


def atlas_plotly(table: Sequence[dict], metric: str = "energy", timestep: float | None = None):
    """The head atlas as a plotly heatmap (layers x heads) for the app.

    The cell value is class index + score (clipped to [0, 0.999]) on a colorscale with one block per class
    that runs from white to the class's hue, so hue = best class and intensity = score; the cell text is
    the score and the hover text lists every class's mean. Cells without rows are empty (NaN).
    """
    layers, heads, cells = atlas_grid(table, metric, timestep)
    if not layers:
        raise ValueError("the atlas table is empty")
    classes = _classes_of(cells) or ["-"]
    k = len(classes)
    z = np.full((len(layers), len(heads)), np.nan)
    text = [["" for _ in heads] for _ in layers]
    hover = [["" for _ in heads] for _ in layers]
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            if c is None:
                hover[i][j] = f"layer {layers[i]}, head {heads[j]}: no rows"
                continue
            z[i, j] = classes.index(c["class"]) + float(np.clip(c["score"], 0.0, 0.999))
            text[i][j] = f"{c['score']:.2f}"
            parts = "<br>".join(f"{cls}: {v:.3f}" for cls, v in c["by_class"].items())
            hover[i][j] = (f"layer {layers[i]}, head {heads[j]}<br><b>best: {c['class']} "
                           f"{c['score']:.3f}</b> ({metric})<br>{parts}")
    scale = []
    for n, cls in enumerate(classes):
        r, g, b = (int(round(255 * v)) for v in class_color(cls, classes))
        scale.append([n / k, "rgb(255,255,255)"])
        scale.append([(n + 1) / k - (1e-9 if n + 1 < k else 0), f"rgb({r},{g},{b})"])
    when = f" at t={timestep:g}" if timestep is not None else ""
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(h) for h in heads], y=[str(l) for l in layers], zmin=0, zmax=k, colorscale=scale,
        text=text, texttemplate="%{text}", customdata=hover, hovertemplate="%{customdata}<extra></extra>",
        xgap=1, ygap=1,
        colorbar=dict(title="best class", tickvals=[n + 0.5 for n in range(k)], ticktext=classes)))
    fig.update_layout(title=f"Head atlas: best word class by {metric}{when}", xaxis_title="head",
                      yaxis_title="layer", yaxis=dict(autorange="reversed", type="category"),
                      xaxis=dict(type="category"), plot_bgcolor="rgb(238,238,238)")
    return fig


def breakdown_plotly(breakdowns: dict, captions: Sequence[str] | None = None):
    """Plotly heat maps of LSE score breakdowns, one panel per caption: layers x timesteps.

    Args:
        breakdowns: {caption: ScoreBreakdown} (from `interp.tasks.matching.score_image_captions`).
        captions: which captions, in order (default: all).
    """
    caps = list(captions or breakdowns)
    if not caps:
        raise ValueError("no breakdowns to plot")
    fig = make_subplots(rows=1, cols=len(caps), subplot_titles=[_short(c) for c in caps],
                        shared_yaxes=True)
    lo = min(float(np.min(breakdowns[c].table)) for c in caps)
    hi = max(float(np.max(breakdowns[c].table)) for c in caps)
    for i, c in enumerate(caps, start=1):
        b = breakdowns[c]
        fig.add_trace(go.Heatmap(z=b.table, x=[f"t={int(t)}" for t in b.timesteps], y=b.layers, zmin=lo, zmax=hi,
                                 colorscale="Viridis", showscale=i == len(caps),
                                 hovertemplate="%{y} %{x}: %{z:.4f}<extra>" + c + "</extra>"), row=1, col=i)
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), title="LSE score by layer and timestep")
    return fig


def sample_grid(images: Sequence, captions: Sequence[str], verdicts: Sequence[bool] | None = None,
                cols: int = 6, scale: float = 1.6):
    """A matplotlib Figure of images with each prompt under its image (and the checker's verdict)."""
    matplotlib.use("Agg")

    n = len(images)
    if n == 0 or n != len(captions):
        raise ValueError("need as many captions as images, at least one")
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale, rows * (scale + 0.45)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, cap) in enumerate(zip(images, captions)):
        ax = axes.flat[i]
        ax.imshow(np.asarray(img), interpolation="nearest")
        words = cap.split()
        text = " ".join(words[:4]) + ("\n" + " ".join(words[4:]) if len(words) > 4 else "")
        mark = "" if verdicts is None else (" ✓" if verdicts[i] else " ✗")
        ax.set_title(text + mark, fontsize=7, y=-0.32 if len(words) > 4 else -0.2)
    fig.tight_layout()
    return fig


def heads_plotly(heads: dict, captions: Sequence[str] | None = None):
    """The head-weighted scorer's attributions as layers x heads heat maps, one panel per caption.

    Args:
        heads: `ScoreResult.heads` ({"layers": [layers], "tables": {caption: [layers, heads]}}; NaN = no such head).
        captions: which captions, in order (default: all).
    """
    caps = list(captions or heads["tables"])
    if not caps:
        raise ValueError("no head attributions to plot")
    tables = {c: np.asarray(heads["tables"][c], dtype=float) for c in caps}
    finite = np.concatenate([t[np.isfinite(t)] for t in tables.values()] or [np.zeros(1)])
    lim = float(np.max(np.abs(finite))) if finite.size else 1.0
    fig = make_subplots(rows=1, cols=len(caps), shared_yaxes=True,
                        subplot_titles=[_short(c) for c in caps])
    for i, c in enumerate(caps, start=1):
        t = tables[c]
        fig.add_trace(go.Heatmap(z=t, x=[str(h) for h in range(t.shape[1])], y=list(heads["layers"]),
                                 zmin=-lim, zmax=lim, colorscale="RdBu", reversescale=True, showscale=i == len(caps),
                                 hovertemplate="%{y} head %{x}: %{z:.4g}<extra>" + c + "</extra>"), row=1, col=i)
        fig.update_xaxes(title_text="head", type="category", row=1, col=i)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_layout(height=340, margin=dict(l=10, r=10, t=60, b=10),
                      title="Head attributions (A x dScore/dA, summed over positions and words): red helps the caption")
    return fig


def structure_plotly(structure: dict, captions: Sequence[str] | None = None):
    """The structure scorer's terms per caption (binding, relation) as grouped bars; LSE fallbacks are marked."""
    caps = list(captions or structure)
    if not caps:
        raise ValueError("no structure terms to plot")
    short = [_short(c) for c in caps]
    binding = [structure[c].binding if structure[c].method == "structure" else None for c in caps]
    relation = [structure[c].relation if structure[c].method == "structure" else None for c in caps]
    fig = go.Figure([go.Bar(name="binding", x=short, y=binding),
                     go.Bar(name="relation direction", x=short, y=relation)])
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=40, b=10),
                      title="Structure terms per caption (empty bars: the caption fell back to LSE)")
    return fig


def fused_terms_plotly(terms: dict, captions: Sequence[str] | None = None):
    """The dpt_fused score's two readings per caption as grouped bars: the adapter's match score and the denoising
    term (-w x relative error), with their sum marked; `terms`: {caption: {"adapter", "denoise"}}."""
    caps = list(captions or terms)
    if not caps:
        raise ValueError("no fused terms to plot")
    short = [_short(c) for c in caps]
    adapter = [terms[c]["adapter"] for c in caps]
    denoise = [terms[c]["denoise"] for c in caps]
    fig = go.Figure([go.Bar(name="adapter match score", x=short, y=adapter),
                     go.Bar(name="- w x relative denoising error", x=short, y=denoise),
                     go.Scatter(name="fused score (sum)", x=short, y=[a + d for a, d in zip(adapter, denoise)],
                                mode="markers", marker=dict(size=12, symbol="diamond", color="black"))])
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=40, b=10),
                      title="Two readings of one UNet call per caption (higher = better match)")
    return fig


def word_map_sheet(image, words: Sequence[str], maps, cols: int = 8, scale: float = 1.6, cmap: str = "jet"):
    """A matplotlib Figure of word maps over the image, each labelled, with a colour bar: each map is min-max
    normalised on its own (0 = its least attended pixel, 1 = its most attended one)."""
    n = len(words)
    if n == 0 or n != len(maps):
        raise ValueError("need one map per word, at least one")
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(cols * scale + 0.8, rows * (scale + 0.35)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (w, m) in enumerate(zip(words, maps)):
        ax = axes.flat[i]
        ax.imshow(np.asarray(overlay(image, m, cmap=cmap)), interpolation="nearest")
        ax.set_title(str(w), fontsize=9)
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormaps[cmap]), ax=axes, shrink=0.8,
                 label="attention, each map scaled to its own min..max")
    return fig
