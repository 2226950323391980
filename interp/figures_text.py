"""Figures of image -> text by masked diffusion (`interp.tasks.text_diffusion.TextSample`, read duck-typed: this
module sits below `interp.tasks` with `interp.figures`).

    >>> fig = timeline_plotly(sample)                 # rows = reverse steps, cells = words / greyed [MASK]
    >>> fig = candidates_plotly(sample, position=3)   # top-k candidates of one position over the steps
    >>> img = token_attention_overlay(image, sample, step=2, position=3)   # where that token looks

Dimension names: step (reverse step), position (text position), N image tokens.
"""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from .heatmaps import overlay

__all__ = ["timeline_plotly", "candidates_plotly", "token_attention_map", "token_attention_overlay"]

MASK_WORD = "[MASK]"


def timeline_plotly(sample, title: str | None = None):
    """The unmasking timeline: one row per reverse step (top = first), one column per text position; a cell shows
    its word (bold at the step it was committed) colored by the probability it was committed with, or a greyed
    `[MASK]`; the prefix (question) is grey-blue. Hover: the position's top candidates at that step."""
    K, L = len(sample.steps), sample.length
    z = np.full((K, L), np.nan)
    text = [["" for _ in range(L)] for _ in range(K)]
    hover = [["" for _ in range(L)] for _ in range(K)]
    for k, st in enumerate(sample.steps):
        for i in range(L):
            w = st.tokens[i]
            cands = ", ".join(f"{c} {p:.2f}" for c, p in zip(st.top_words[i], st.top_probs[i]))
            hover[k][i] = f"step {k + 1}, position {i}<br>{cands}"
            if w == MASK_WORD:
                text[k][i] = f"<span style='color:#aaa'>{MASK_WORD}</span>"
                continue
            if i < sample.prefix_len:
                text[k][i] = f"<span style='color:#557'>{w}</span>"
                continue
            z[k, i] = sample.confidence[i]
            text[k][i] = f"<b>{w}</b>" if sample.committed_at[i] == k else w
    fig = go.Figure(go.Heatmap(z=z, x=list(range(L)), y=[f"step {k + 1}" for k in range(K)], colorscale="Viridis",
                               zmin=0, zmax=1, text=text, texttemplate="%{text}", hovertext=hover,
                               hoverinfo="text", colorbar={"title": "p(commit)"}))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title or f"unmasking timeline ({sample.order} order, {K} steps)",
                      xaxis_title="text position", height=120 + 36 * K, margin={"l": 70, "r": 20, "t": 50, "b": 40},
                      plot_bgcolor="#eee")
    return fig


def candidates_plotly(sample, position: int):
    """The top-k candidates of one text position over the reverse steps (probability per step; a word absent from
    a step's top-k is drawn at 0), with the commit step marked."""
    if not 0 <= position < sample.length:
        raise ValueError(f"position must be in 0..{sample.length - 1}, got {position}")
    words: list[str] = []
    for st in sample.steps:
        for w in st.top_words[position]:
            if w not in words:
                words.append(w)
    steps = list(range(1, len(sample.steps) + 1))
    fig = go.Figure()
    for w in words:
        ys = [dict(zip(st.top_words[position], st.top_probs[position])).get(w, 0.0) for st in sample.steps]
        fig.add_trace(go.Scatter(x=steps, y=ys, mode="lines+markers", name=w))
    k = sample.committed_at[position]
    if k >= 0:
        fig.add_vline(x=k + 1, line_dash="dash", annotation_text=f"committed: {sample.words[position]}")
    fig.update_layout(title=f"candidates at position {position}", xaxis_title="reverse step",
                      yaxis_title="probability", yaxis_range=[0, 1.02], height=320)
    return fig


def token_attention_map(sample, step: int, position: int, size: int = 64) -> np.ndarray:
    """One text token's joint attention over the image at a step, `[size, size]`: each UNet block's share (its
    tokens' attention, on its grid) upsampled to `size` and summed. Needs a sample recorded with
    `record_attention=True`."""
    if not 0 <= step < len(sample.steps):
        raise ValueError(f"step must be in 0..{len(sample.steps) - 1}, got {step}")
    att = sample.steps[step].attention
    if att is None:
        raise ValueError("this sample has no attention: sample with record_attention=True")
    if not 0 <= position < sample.length:
        raise ValueError(f"position must be in 0..{sample.length - 1}, got {position}")
    row = np.asarray(att[position], np.float32)
    out = np.zeros((size, size), np.float32)
    o = 0
    for gh, gw in sample.grid:
        m = row[o: o + gh * gw].reshape(gh, gw)
        o += gh * gw
        out += np.asarray(Image.fromarray(m).resize((size, size), Image.BILINEAR), np.float32) * (gh * gw) / (size * size)
    return out


def token_attention_overlay(image, sample, step: int, position: int, alpha: float = 0.55):
    """`token_attention_map` blended over the image (PIL, at the image's size)."""
    return overlay(image, token_attention_map(sample, step, position, size=image.height), alpha=alpha)
