"""Discffusion scores from cross-attention traces, and the Diffusion-Classifier baseline. Pure functions over
traces, tensors and numbers; no model is run here (models.unet_pass runs it).

Eq. 4 of Discffusion (TMLR): for a cross-attention map A in R^{n x m} (n image positions, m text tokens)

    f(A) = (1/n) sum_i (1/lam) log sum_j exp(lam * A_ij)

averaged over heads, layers and sampled timesteps. The authors' code applies it to the pre-softmax logits
(`source="logits"`) of the last cross-attention layer of the down stage, the mid layer and the last of
the up stage (`layers="last_per_stage"`); the paper averages all layers (`layers=None`).

    res = noised_unet_pass(pipe, z, captions, timesteps=[200, 500])
    scores = {c: lse_score(t, source="logits").score for c, t in zip(res.captions, res.traces)}
    rank_captions(scores)   # [{"caption": ..., "score": ...}, ...] best first

Cosine pooling (`pooling="cosine"`, the "cosine of projected features" row of Discffusion's Table 3):
instead of an attention map it reads the trace's cosine maps (traced with `cosine=True`),
C[i, j] = cos(q_i, k_j) with q_i = to_q(image position i) and k_j = to_k(token j) of one head, and pools

    f_cos(C) = (1/(n m)) sum_i sum_j C_ij        (mean over the n image positions and the m selected tokens)

averaged over heads, layers and steps like the other poolings; `source` is ignored, `lam` unused, and
`tokens="words"` / `"all"` pick the columns as for the others. Scores lie in [-1, 1].

Notes: a trace keeps only each prompt's real tokens (BOS ... EOS), so the token axis m is those tokens,
not the 77 padded positions; with `source="probs"` the kept probabilities do not sum to 1 (the padding
positions hold the rest). `tokens="words"` drops BOS and EOS (BOS usually takes most of the attention).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from models.attention_capture import select_layer_names
from models.trace import AttentionTrace

__all__ = ["POOLINGS", "SPECIAL", "ScoreBreakdown", "pool", "lse_pool", "select_layers", "token_columns",
           "layer_step_scores", "lse_score",
           "score_traces", "rank_captions", "denoising_score"]

Pooling = Literal["lse", "mean", "max_rows", "max_cols", "cosine"]
POOLINGS = ("lse", "mean", "max_rows", "max_cols", "cosine")
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _as_tensor(A) -> torch.Tensor:
    t = A if torch.is_tensor(A) else torch.as_tensor(np.asarray(A))
    if t.dim() < 2:
        raise ValueError(f"attention must be [..., n, m] (n positions, m tokens), got shape {tuple(t.shape)}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"attention has an empty axis: shape {tuple(t.shape)}")
    return t.double()


def _check_lam(lam: float) -> float:
    lam = float(lam)
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a positive finite number, got {lam}")
    return lam


def lse_pool(A, lam: float = 1.0) -> torch.Tensor:
    """Eq. 4: mean over positions (rows) of (1/lam) logsumexp(lam * A_row) over tokens.

    Args:
        A: `[n, m]` or batched `[..., n, m]` (tensor, array or nested lists); computed in float64.
        lam: the temperature lambda (> 0); large lam tends to the row max, small lam to mean + log(m)/lam.
    Returns:
        float64 tensor `[...]` (0-d for a single map).
    """
    lam = _check_lam(lam)
    A = _as_tensor(A)
    return (torch.logsumexp(lam * A, dim=-1) / lam).mean(dim=-1)


def pool(A, pooling: Pooling = "lse", lam: float = 1.0) -> torch.Tensor:
    """Pool `[..., n, m]` maps to `[...]` scores.

    "lse": Eq. 4 (`lse_pool`); "mean": mean over positions and tokens; "max_rows": max over tokens,
    mean over positions; "max_cols": max over positions for each token, mean over tokens.
    "cosine" is not a pooling of an attention map but of a trace's cosine maps (`lse_score` with
    pooling="cosine", i.e. "mean" over the cosine map); here it is a ValueError, so that an attention
    map is never pooled by mistake as if it were one.
    """
    if pooling == "lse":
        return lse_pool(A, lam)
    if pooling == "cosine":
        raise ValueError("pooling='cosine' pools a trace's cosine maps (lse_score on a trace with cosine=True), "
                         "not an attention map; pool a cosine map with pooling='mean'")
    A = _as_tensor(A)
    if pooling == "mean":
        return A.mean(dim=(-2, -1))
    if pooling == "max_rows":
        return A.amax(dim=-1).mean(dim=-1)
    if pooling == "max_cols":
        return A.amax(dim=-2).mean(dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def select_layers(trace: AttentionTrace, layers: Sequence[int | str] | str | None = None) -> list[str]:
    """Layer aliases for a selection: None (all traced), a list of indices / aliases / module paths,
    or "last_per_stage" (the last traced layer of the down stage, of the mid stage and of the up stage)."""
    names = select_layer_names(trace.layers, layers)
    return [trace.layer(n).alias for n in names]


def token_columns(trace: AttentionTrace, tokens: str) -> list[int]:
    """Indices into a trace's token axis that a score pools: "all" real tokens (BOS ... EOS, the first `n_real`
    columns), "words" (those without BOS and EOS), or "padded" (every column of a padded trace, padding included).
    """
    real = range(trace.n_real)
    if tokens == "all":
        return list(real)
    if tokens == "words":
        cols = [j for j in real if trace.tokens[j] not in SPECIAL]
        if not cols:
            raise ValueError(f"tokens='words': the trace has no word tokens (tokens: {trace.tokens})")
        return cols
    if tokens == "padded":
        return list(range(len(trace.tokens)))
    raise ValueError(f"unknown tokens option {tokens!r}; use 'all', 'words' or 'padded'")


def layer_step_scores(maps: Mapping[str, torch.Tensor], aliases: Sequence[str], cols: Sequence[int],
                      pooling: str = "lse", lam: float = 1.0) -> torch.Tensor:
    """The pooled score per layer and step, mean over heads: `[layers, steps]` (differentiable when the maps are).

    Args:
        maps: alias -> `[steps, heads, h, w, tokens]` (probabilities, logits or cosine maps).
        aliases: the layers, in row order.
        cols: the token columns pooled over.
        pooling, lam: `pool`'s ("cosine" maps are mean-pooled).
    """
    rows = []
    for alias in aliases:
        x = maps[alias][..., list(cols)]
        x = x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])  # [steps, heads, n, m]
        rows.append(pool(x, "mean" if pooling == "cosine" else pooling, lam).mean(dim=1))  # [steps]
    return torch.stack(rows)


@dataclasses.dataclass
class ScoreBreakdown:
    """A trace's score and where it comes from.

    Attributes:
        score: mean of `table` (equal weight per layer and per step)
        table: float64 numpy, pooled score per layer and step, mean over heads       [layers, steps]
        layers: layer aliases (rows)                                                 [layers]
        timesteps: timesteps of the steps used (columns)                             [steps]
        tokens: the tokens pooled over                                               [m]
        source, pooling, lam: how it was computed (source "cosine" for pooling="cosine")
    """

    score: float
    table: np.ndarray
    layers: list[str]
    timesteps: list[float]
    tokens: list[str]
    source: str
    pooling: str
    lam: float

    def by_layer(self) -> dict[str, float]:
        """Mean over steps, per layer."""
        return {l: float(v) for l, v in zip(self.layers, self.table.mean(axis=1))}

    def by_step(self) -> list[float]:
        """Mean over layers, per step."""
        return [float(v) for v in self.table.mean(axis=0)]

    def as_dict(self) -> dict:
        """Plain data (JSON-ready): score, layers, timesteps, tokens, table as nested lists, settings."""
        return {"score": self.score, "layers": list(self.layers), "timesteps": list(self.timesteps),
                "tokens": list(self.tokens), "table": self.table.tolist(), "by_layer": self.by_layer(),
                "by_step": self.by_step(), "source": self.source, "pooling": self.pooling, "lam": self.lam}


def lse_score(trace: AttentionTrace, source: Literal["probs", "logits"] = "probs",
              layers: Sequence[int | str] | str | None = None, steps: Sequence[int] | None = None,
              heads: Sequence[int] | None = None, pooling: Pooling = "lse", lam: float = 1.0,
              tokens: Literal["all", "words"] = "all") -> ScoreBreakdown:
    """Discffusion score of one traced caption.

    Per layer and step: pool each head's `[h*w, tokens]` map (`pool`), then mean over heads; the score is
    the mean over the chosen layers and steps. With pooling="cosine" the map is the trace's cosine map
    (`trace.cosine`, whatever `source` says) and is pooled by its mean (see the module docstring).

    Args:
        trace: an AttentionTrace (e.g. from models.unet_pass.noised_unet_pass).
        source: "probs" (post-softmax) or "logits" (pre-softmax; the trace needs logits=True).
        layers: None (all traced), indices / aliases / module paths, or "last_per_stage".
        steps: indices into the trace's steps (None: all).
        heads: indices into the trace's kept heads (None: all); applied to every layer.
        pooling: "lse" (Eq. 4), "mean", "max_rows", "max_cols", or "cosine" (mean of the cosine maps;
            the trace needs cosine=True).
        lam: lambda of Eq. 4 (lse only).
        tokens: "all" real tokens (BOS ... EOS), "words" (BOS and EOS dropped) or "padded" (every column of a
            padded trace).
    Raises:
        ValueError: unknown option, logits (or, for "cosine", cosine maps) not traced, an empty or
            out-of-range selection.
    """
    if source not in ("probs", "logits"):
        raise ValueError(f"unknown source {source!r}; use 'probs' or 'logits'")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
    lam = _check_lam(lam)
    if pooling == "cosine":
        maps = trace.cosine
        if not maps:
            raise ValueError("pooling='cosine' needs the trace's cosine maps, and this trace has none "
                             "(trace with cosine=True, e.g. noised_unet_pass(..., cosine=True))")
    else:
        maps = trace.probs if source == "probs" else trace.logits
        if not maps:
            raise ValueError(f"the trace holds no {source} (trace with logits=True for source='logits')")
    aliases = select_layers(trace, layers)
    n_steps = trace.n_steps
    st = list(range(n_steps)) if steps is None else [int(s) for s in steps]
    if not st or any(not -n_steps <= s < n_steps for s in st):
        raise ValueError(f"steps {steps} must be a non-empty list of indices into the {n_steps} traced steps")
    cols = token_columns(trace, tokens)
    sel = {}
    for alias in aliases:
        if alias not in maps:
            raise ValueError(f"the trace holds no {'cosine' if pooling == 'cosine' else source} map for layer {alias!r}")
        x = maps[alias][st]  # [steps, heads, h, w, tokens]
        if heads is not None:
            hs = [int(h) for h in heads]
            if not hs or any(not -x.shape[1] <= h < x.shape[1] for h in hs):
                raise ValueError(f"heads {heads} must be a non-empty list of indices into {x.shape[1]} heads ({alias})")
            x = x[:, hs]
        sel[alias] = x
    table = layer_step_scores(sel, aliases, cols, pooling, lam).numpy()
    return ScoreBreakdown(float(table.mean()), table, aliases, [float(trace.timesteps[s]) for s in st],
                          [trace.tokens[j] for j in cols], "cosine" if pooling == "cosine" else source, pooling, lam)


def score_traces(traces: Sequence[AttentionTrace], **kw) -> list[ScoreBreakdown]:
    """`lse_score` of each trace, same options."""
    return [lse_score(t, **kw) for t in traces]


def rank_captions(scores: Mapping[str, float]) -> list[dict]:
    """Captions sorted best (highest score) first: `[{"caption": ..., "score": ...}, ...]`; ties keep
    the input order. NaN scores are an error."""
    items = [(c, float(s)) for c, s in scores.items()]
    bad = [c for c, s in items if math.isnan(s)]
    if bad:
        raise ValueError(f"NaN score for caption(s) {bad}")
    return [{"caption": c, "score": s} for c, s in sorted(items, key=lambda cs: -cs[1])]


def denoising_score(errors, uncond_errors=None) -> np.ndarray | float:
    """Diffusion-Classifier score from noise-prediction errors (higher = better match).

    Args:
        errors: per-caption errors `[K, steps]` (or one caption's `[steps]`).
        uncond_errors: the unconditional ("") errors `[steps]` at the same timesteps and noise, or None.
    Returns:
        without `uncond_errors`: -mean over steps of the error; with it (normalised): the mean over steps of
        error(uncond) - error(cond). `[K]` float64 array, or a float for a `[steps]` input.
    """
    e = np.asarray(errors.cpu() if torch.is_tensor(errors) else errors, dtype=np.float64)
    if e.ndim not in (1, 2) or e.shape[-1] == 0:
        raise ValueError(f"errors must be [K, steps] or [steps] with steps > 0, got shape {e.shape}")
    if uncond_errors is None:
        out = -e.mean(axis=-1)
    else:
        u = np.asarray(uncond_errors.cpu() if torch.is_tensor(uncond_errors) else uncond_errors, dtype=np.float64)
        if u.shape != (e.shape[-1],):
            raise ValueError(f"uncond_errors must be [steps] = [{e.shape[-1]}], got shape {u.shape}")
        out = (u - e).mean(axis=-1)
    return float(out) if e.ndim == 1 else out
