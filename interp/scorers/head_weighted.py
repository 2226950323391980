"""Dynamic attention-head weighting (Discffusion Eq. 7) with captum, and a head-weighted matching scorer.

For each cross-attention layer, every head's attention map A_h (`[positions, tokens]`) is weighted by the
gradient of the matching score f (Eq. 4, the pooled maps averaged over heads and layers):

    "eq7": Attr_h = A_h ⊙ Σ_h' ∂f/∂A_h'      (Eq. 7: the gradient summed over the layer's heads, detached)
    "gxa": Attr_h = A_h ⊙ ∂f/∂A_h            (captum's plain gradient x activation, per head)

and the attributed maps are pooled with Eq. 4 instead of the plain maps. The two agree for a one-head layer.

How the gradient is taken: the one noised pass (`models.unet_pass.noised_unet_pass`, `grad=True`) runs with a
`ProbeSet` (`models.attention_capture`): each cross-attention layer's map passes an identity module, an
`AttentionProbe`, and the rest of the attention (softmax, values) uses what comes out of the probe. captum's
`LayerGradientXActivation(forward_fn, layer=[probes], multiply_by_inputs=False)` then gives ∂f/∂A for every probe in
one forward and one backward, where `forward_fn(z)` runs that pass at one timestep on the image latent z and returns
f per caption row, pooled from the pass's differentiable traced maps (`trace_objective`, `interp.lse.pool`).
So the gradient is the TOTAL derivative of f with respect to A_h through the UNet: the direct pooling
term plus A_h's effect (through the hidden states) on the maps of the layers after it.

Conventions (documented choices):
    * f is the per-timestep score f_t (pooled maps of that UNet call, mean over heads and selected
      layers); the gradient at step t is ∂f_t/∂A (not ∂(mean_t f_t)/∂A = ∂f_t/∂A / S), so the attributed
      maps do not shrink with the number of timesteps. Scores are the mean over timesteps, as `lse_score`.
    * The map is what `options.source` names: "logits" (pre-softmax; the probe sits before the softmax)
      or "probs". Tokens, layers, pooling and lam follow `MatchOptions` as in `interp.lse.lse_score`;
      only the token columns the score pools (real tokens, or words) enter scores and tables.
    * The captions of an image go through the UNet as one batch per timestep (same noise for all, as
      `noised_unet_pass`), and one backward of Σ_k f_k gives every row's own gradient (rows do not
      interact in the UNet). Cost: S forward calls and S backward calls; `unet_evals` = S*K sample-
      forwards and `unet_backwards` = S*K sample-backwards (each backward costs about two forwards).
    * The attribution table of a caption is Σ over positions and kept tokens of Attr_h, `[layers, heads]`
      (all cross-attention layers, NaN-padded where a layer has fewer heads), mean over timesteps; for
      "gxa" it is the first-order (Taylor) contribution of the head's map to f_t.
    * Scale: ∂f/∂A is small (f averages over n positions, heads and layers), so the attributed maps
      are near 0 and Eq. 4 of them is about log(m)/lam + mean(Attr): captions with more tokens m get a
      higher score. `grad_norm="mean_abs"` divides the (summed) gradient of each row and layer by its mean
      absolute value over the pooled entries, which keeps the maps on A's scale; "none" is Eq. 7 as written.

Example:
    >>> res = head_weighted_score(pipe, image, ["a red circle", "a blue square"], MatchOptions())
    >>> res["scores"], res["plain_scores"], res["per_caption"]["a red circle"]["table"]  # [layers, heads]
    >>> HeadWeightedScorer(variant="gxa").score(pipe, image, captions, MatchOptions()).heads["tables"]
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch
from captum.attr import LayerGradientXActivation

from models.attention_capture import ProbeSet
from models.limits import validate_captions
from models.trace import AttentionTrace
from models.unet_pass import check_pass_args, draw_noise, encode_image, noised_unet_pass

from interp.lse import layer_step_scores, pool, select_layers, token_columns
from interp.scorers.base import MatchOptions, ScoreResult, Scorer

__all__ = ["VARIANTS", "trace_objective", "matching_objective", "probe_gradients", "attribute_maps",
           "head_weighted_score", "HeadWeightedScorer"]

Variant = Literal["eq7", "gxa"]
VARIANTS = ("eq7", "gxa")
GradNorm = Literal["none", "mean_abs"]


# ----------------------------------------------------------------------------------------------
# The matching score f on differentiable traced maps (the pooling of `interp.lse.lse_score`)
# ----------------------------------------------------------------------------------------------
def trace_objective(trace: AttentionTrace, options: MatchOptions,
                    maps: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """f per step of one traced caption, differentiable when the maps are (`noised_unet_pass(grad=True)`).

    The computation of `interp.lse.lse_score` (same layers, token columns, pooling and lam as `options`), kept as a
    tensor: per selected layer, pool each head's `[h*w, tokens]` map and average the heads; then average the layers.
    The score is the mean over steps (`lse_score(...).score` up to float rounding).

    Args:
        trace: an AttentionTrace.
        options: source, layers, pooling ("cosine": the trace's cosine maps, mean-pooled), lam, tokens.
        maps: alias -> `[steps, heads, h, w, tokens]` to pool instead of the trace's own (e.g. attributed maps).
    Returns:
        `[steps]` float64.
    """
    cos = options.pooling == "cosine"
    if maps is None:
        maps = trace.cosine if cos else (trace.logits if options.source == "logits" else trace.probs)
    if not maps:
        raise ValueError(f"the trace holds no {'cosine' if cos else options.source} maps")
    cols = token_columns(trace, options.tokens)
    return layer_step_scores(maps, select_layers(trace, options.layers), cols, options.pooling, options.lam).mean(dim=0)


# ----------------------------------------------------------------------------------------------
# Objective, gradients, attribution
# ----------------------------------------------------------------------------------------------
def matching_objective(maps: dict[str, torch.Tensor], columns: Sequence[Sequence[int]], layer_names: Sequence[str],
                       pooling: str = "lse", lam: float = 1.0) -> torch.Tensor:
    """f per batch row (float64, differentiable): per selected layer, pool each head's `[queries, columns]`
    map (`interp.lse.pool`, Eq. 4 for "lse"), mean over heads; then mean over the layers.

    Args:
        maps: layer -> `[batch, heads, queries, keys]`.
        columns: per batch row, the key (token) columns pooled over.
        layer_names: the layers averaged.
    Returns:
        `[batch]` float64.
    """
    if not layer_names:
        raise ValueError("no layers selected")
    rows = []
    for k, cols in enumerate(columns):
        c = list(cols)
        per_layer = [pool(maps[n][k][..., c], pooling, lam).mean() for n in layer_names]  # pool: [heads]
        rows.append(torch.stack(per_layer).mean())
    return torch.stack(rows)


def probe_gradients(forward_fn: Callable[[torch.Tensor], torch.Tensor], probes: Sequence[torch.nn.Module],
                    inputs: torch.Tensor, multiply_by_inputs: bool = False) -> list[torch.Tensor]:
    """captum `LayerGradientXActivation` at the probes' outputs: ∂(Σ_rows forward_fn)/∂(probe output), or
    with `multiply_by_inputs` captum's gradient x activation. One forward, one backward. Probes the
    output does not depend on get a zero gradient. Returns one tensor per probe (its output's shape)."""
    lga = LayerGradientXActivation(forward_fn, layer=list(probes), multiply_by_inputs=multiply_by_inputs)
    out = lga.attribute(inputs, grad_kwargs={"materialize_grads": True})
    return [o.detach() for o in out]


def attribute_maps(A: torch.Tensor, grad: torch.Tensor, variant: Variant = "eq7", head_dim: int = 1) -> torch.Tensor:
    """Attributed maps of one layer: "eq7" A_h ⊙ Σ_h' grad_h' (Eq. 7), "gxa" A_h ⊙ grad_h.

    A, grad: same shape, heads on `head_dim` (`[batch, heads, queries, keys]` by default). Detached.
    """
    if A.shape != grad.shape:
        raise ValueError(f"map and gradient shapes differ: {tuple(A.shape)} vs {tuple(grad.shape)}")
    A, grad = A.detach(), grad.detach()
    if variant == "eq7":
        return A * grad.sum(dim=head_dim, keepdim=True)
    if variant == "gxa":
        return A * grad
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")


def _head_grad(grad: torch.Tensor, variant: Variant) -> torch.Tensor:
    return grad.sum(dim=1, keepdim=True).expand_as(grad) if variant == "eq7" else grad


# ----------------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------------
def head_weighted_score(pipe, image, captions: Sequence[str], options=None, variant: Variant = "eq7",
                        grad_norm: GradNorm = "none") -> dict:
    """Head-weighted (Eq. 7) Discffusion score of each caption for an image; `scorer_fn`-compatible.

    Per timestep (the noise draw of `noised_unet_pass` with `options.noise_seed`): one UNet forward of
    the K caption rows through the probes, f_t per row (`matching_objective`), one backward (captum);
    the attributed maps (`attribute_maps`, `variant`) are pooled the same way as the plain ones.

    Args:
        pipe: a Stable-Diffusion-family pipeline (unet, vae, tokenizer, text_encoder, scheduler).
        image: a PIL image.
        captions: the captions (cleaned as `models.limits.validate_captions`; the keys of the result).
        options: `interp.scorers.MatchOptions` (source, layers, pooling, lam, tokens, timesteps,
            noise_seed; `scorer` is ignored). Default: MatchOptions().
        variant: "eq7" (A_h ⊙ Σ_h' ∂f/∂A_h') or "gxa" (A_h ⊙ ∂f/∂A_h).
        grad_norm: "none" (Eq. 7 as written) or "mean_abs" (see the module docstring).
    Returns:
        {"scores": {caption: head-weighted score}, "plain_scores": {caption: plain score},
         "per_caption": {caption: {"score", "plain_score", "by_step" [S], "plain_by_step" [S],
                                   "table" np [layers, heads], "table_per_step" np [S, layers, heads]}},
         "layers" (aliases of the table rows), "score_layers" (aliases pooled), "heads" (max heads),
         "timesteps", "variant", "grad_norm", "source",
         "unet_calls" S, "unet_evals" S*K, "unet_backward_calls" S, "unet_backwards" S*K}
    """
    options = MatchOptions() if options is None else options
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if grad_norm not in ("none", "mean_abs"):
        raise ValueError(f"unknown grad_norm {grad_norm!r}; use 'none' or 'mean_abs'")
    if options.pooling == "cosine":
        raise ValueError("head weighting attributes attention maps; pooling='cosine' pools cosine maps instead")
    caps = validate_captions(captions, min_count=1)
    unet = pipe.unet
    _, ts = check_pass_args(caps, list(options.timesteps), int(pipe.scheduler.config.num_train_timesteps))
    K, S = len(caps), len(ts)
    z = encode_image(pipe, image)  # [1, C, h, w]
    noise = draw_noise(options.noise_seed, S, z.shape[1:], unet.device)  # [S, C, h, w]: the pass's seeded draw
    ps = ProbeSet.for_unet(unet, options.source)
    max_heads = max(l.heads for l in ps.layers)
    plain = torch.zeros(K, S, dtype=torch.float64)
    weighted = torch.zeros(K, S, dtype=torch.float64)
    tables = np.full((K, S, len(ps.layers), max_heads), np.nan)
    sel: list[str] = []
    for s, t in enumerate(ts):
        runs: list = []

        def forward_fn(latent):
            res = noised_unet_pass(pipe, latent, caps, [t], noise=noise[s:s + 1], grad=True, probes=ps,
                                   logits=options.source == "logits")
            runs.append(res)
            return torch.stack([trace_objective(tr, options)[0] for tr in res.traces])  # [K]

        grads = probe_gradients(forward_fn, ps.probes, z)  # per layer [K, heads, queries, keys]
        traces = runs[-1].traces
        sel = select_layers(traces[0], options.layers)
        for k, tr in enumerate(traces):
            maps = tr.logits if options.source == "logits" else tr.probs  # [1, heads, h, w, tokens]
            cols = token_columns(tr, options.tokens)
            plain[k, s] = trace_objective(tr, options).detach()[0].cpu()
            attr = {}
            for li, (layer, gr) in enumerate(zip(ps.layers, grads)):
                info = tr.layer(layer.name)
                A = maps[info.alias].detach()
                G = _head_grad(gr[k:k + 1], variant)  # [1, heads, queries, keys]
                G = G.reshape(1, G.shape[1], info.h, info.w, G.shape[-1])[..., tr.token_index].to(A)
                if grad_norm == "mean_abs":
                    G = G / G[..., cols].abs().mean().clamp_min(torch.finfo(G.dtype).tiny)
                attr[info.alias] = A * G  # [1, heads, h, w, tokens]
                tables[k, s, li, :layer.heads] = attr[info.alias][0][..., cols].double().sum(dim=(-3, -2, -1)).cpu().numpy()
            weighted[k, s] = trace_objective(tr, options, attr)[0].cpu()

    per_caption, scores, plain_scores = {}, {}, {}
    for k, c in enumerate(caps):
        scores[c] = float(weighted[k].mean())
        plain_scores[c] = float(plain[k].mean())
        per_caption[c] = {"score": scores[c], "plain_score": plain_scores[c],
                          "by_step": weighted[k].tolist(), "plain_by_step": plain[k].tolist(),
                          "table": tables[k].mean(axis=0), "table_per_step": tables[k]}
    return {"scores": scores, "plain_scores": plain_scores, "per_caption": per_caption, "layers": ps.aliases,
            "score_layers": sel, "heads": max_heads, "timesteps": list(ts),
            "variant": variant, "grad_norm": grad_norm, "source": options.source,
            "unet_calls": S, "unet_evals": S * K, "unet_backward_calls": S, "unet_backwards": S * K}


@dataclasses.dataclass(repr=False)
class HeadWeightedScorer(Scorer):
    """Eq. 7 head-weighted LSE: `head_weighted_score` with `variant` and `grad_norm` (S forwards + S backwards)."""

    variant: Variant = "eq7"
    grad_norm: GradNorm = "none"
    name: str = "head_weighted"
    shares_pass: bool = False
    label: str = "head_weighted — gradient-weighted heads (Discffusion Eq. 7, captum)"
    description: str = ("LSE over head maps weighted by the score's gradient (one backward pass per timestep). "
                        "Shows which heads drive the score; reads word order and relations no better than LSE.")

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {VARIANTS}")
        if self.grad_norm not in ("none", "mean_abs"):
            raise ValueError(f"unknown grad_norm {self.grad_norm!r}; use 'none' or 'mean_abs'")

    def score(self, pipe, image, captions: Sequence[str], options: MatchOptions = MatchOptions()) -> ScoreResult:
        r = head_weighted_score(pipe, image, captions, options, variant=self.variant, grad_norm=self.grad_norm)
        caps = list(r["scores"])
        heads = {"layers": r["layers"], "score_layers": r["score_layers"], "heads": r["heads"],
                 "timesteps": r["timesteps"], "variant": r["variant"], "grad_norm": r["grad_norm"],
                 "source": r["source"], "tables": {c: r["per_caption"][c]["table"] for c in caps},
                 "per_caption": r["per_caption"]}
        return ScoreResult(self.name, caps, [r["scores"][c] for c in caps], unet_calls=r["unet_calls"],
                           unet_evals=r["unet_evals"], unet_backwards=r["unet_backwards"], heads=heads,
                           extra={"plain_scores": r["plain_scores"], "unet_backward_calls": r["unet_backward_calls"]})
