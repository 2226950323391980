"""Dynamic attention-head weighting (Discffusion Eq. 7) with captum, and a head-weighted matching scorer.

For each cross-attention layer, every head's attention map A_h (`[positions, tokens]`) is weighted by the
gradient of the matching score f (Eq. 4, the pooled maps averaged over heads and layers):

    "eq7": Attr_h = A_h ⊙ Σ_h' ∂f/∂A_h'      (Eq. 7: the gradient summed over the layer's heads, detached)
    "gxa": Attr_h = A_h ⊙ ∂f/∂A_h            (captum's plain gradient x activation, per head)

and the attributed maps are pooled with Eq. 4 instead of the plain maps. The two agree for a one-head layer.

How the gradient is taken: each cross-attention layer gets a `ProbeProcessor` (explicit attention as in
`models.attention_capture.CaptureProcessor`) whose map passes through an identity module, an
`AttentionProbe`, and the rest of the attention (softmax, values) uses what comes out of the probe.
captum's `LayerGradientXActivation(forward_fn, layer=[probes], multiply_by_inputs=False)` then gives
∂f/∂A for every probe in one forward and one backward. `forward_fn(x_t)` runs the UNet on the noised
latent rows (one row per caption) and returns f per row, computed from the maps that left the probes.
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

import contextlib
import dataclasses
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
import torch
from captum.attr import LayerGradientXActivation
from diffusers.models.attention_processor import Attention

from models.attention_capture import CaptureProcessor, CrossAttnLayer, capture_cross_attention, select_layer_names
from models.unet_pass import _validate, encode_image
from models.limits import validate_captions
from models.trace import real_token_count

from interp.lse import SPECIAL, pool
from interp.scorers.base import MatchOptions, ScoreResult, Scorer

__all__ = ["VARIANTS", "AttentionProbe", "ProbeProcessor", "ProbeSet", "probed_attention", "select_layer_names",
           "matching_objective", "probe_gradients", "attribute_maps", "head_weighted_score",
           "HeadWeightedScorer"]

Variant = Literal["eq7", "gxa"]
VARIANTS = ("eq7", "gxa")
GradNorm = Literal["none", "mean_abs"]


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------
class AttentionProbe(torch.nn.Identity):
    """Identity through which one layer's attention map `[batch, heads, queries, keys]` passes (captum's layer)."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return repr(self.name)


class ProbeProcessor(CaptureProcessor):
    """`CaptureProcessor` maths with the attention map routed through an `AttentionProbe`.

    `probe_logits=True`: the pre-softmax scores pass the probe and the softmax reads its output;
    otherwise the probabilities pass it and the value product reads its output. Either way the rest of
    the UNet sees the probe's output, so a gradient at the probe is the total derivative. The sink gets
    the probe's output (with its graph): `probs`, and `logits` when `want_logits`.
    """

    def __init__(self, name: str, sink, want_logits: bool = False, probe_logits: bool = True,
                 want_cosine: bool = False) -> None:
        super().__init__(name, sink, want_logits, want_cosine)
        self.probe = AttentionProbe(name)
        self.probe_logits = probe_logits

    def maps(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """CaptureProcessor's maths with the logits (or the probabilities) passing the probe."""
        if self.probe_logits:
            logits = self.probe(logits)
        probs = logits.softmax(dim=-1).to(dtype)
        if not self.probe_logits:
            probs = self.probe(probs)
        return logits, probs


@dataclasses.dataclass
class ProbeSet:
    """The probed layers of a UNet while `probed_attention` is active.

    Attributes:
        layers: the cross-attention layers, UNet order                                  [layers]
        probes: their AttentionProbe modules, same order (captum's `layer=` list)       [layers]
        maps: per layer module path, the map of the latest UNet call as it left the probe (with its
            graph), `[batch, heads, queries, keys]`; "logits" or "probs" as `source`
        source: "logits" | "probs"
    """

    layers: list[CrossAttnLayer]
    probes: list[AttentionProbe]
    maps: dict[str, torch.Tensor]
    source: str

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def aliases(self) -> list[str]:
        return [l.alias for l in self.layers]


@contextlib.contextmanager
def probed_attention(unet: torch.nn.Module, source: Literal["probs", "logits"] = "logits",
                     layers: Sequence[str] | None = None) -> Iterator[ProbeSet]:
    """Install `ProbeProcessor`s on the cross-attention layers (all, or those named); restore on exit,
    also after an exception (via `capture_cross_attention`)."""
    if source not in ("probs", "logits"):
        raise ValueError(f"unknown source {source!r}; use 'probs' or 'logits'")
    maps: dict[str, torch.Tensor] = {}
    procs: dict[str, ProbeProcessor] = {}

    def sink(name, probs, logits):
        maps[name] = logits if source == "logits" else probs

    def factory(name, sink_, want_logits):
        procs[name] = ProbeProcessor(name, sink_, want_logits, probe_logits=source == "logits")
        return procs[name]

    with capture_cross_attention(unet, sink, want_logits=source == "logits", layers=layers,
                                 processor_factory=factory) as lays:
        yield ProbeSet(lays, [procs[l.name].probe for l in lays], maps, source)


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
def _token_columns(tokenizer, ids: torch.Tensor, tokens: str) -> list[list[int]]:
    """Per row: real token positions (BOS ... EOS), or those that are words (as `interp.lse`)."""
    if tokens not in ("all", "words"):
        raise ValueError(f"unknown tokens option {tokens!r}; use 'all' or 'words'")
    out = []
    for row in ids:
        keep = list(range(real_token_count(row.tolist(), tokenizer.eos_token_id)))
        if tokens == "words":
            toks = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(row[keep].tolist())]
            keep = [j for j, t in zip(keep, toks) if t not in SPECIAL]
            if not keep:
                raise ValueError("tokens='words': a caption has no word tokens")
        out.append(keep)
    return out


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
    caps = validate_captions(captions, min_count=1)
    sched, unet, tok = pipe.scheduler, pipe.unet, pipe.tokenizer
    _, ts = _validate(caps, list(options.timesteps), int(sched.config.num_train_timesteps))
    dev, dt = unet.device, unet.dtype
    K, S = len(caps), len(ts)

    with torch.no_grad():
        z = encode_image(pipe, image)
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(dev, dt).detach()
    cols = _token_columns(tok, ids, options.tokens)
    g = torch.Generator().manual_seed(int(options.noise_seed))
    noise = torch.randn((S, *z.shape[1:]), generator=g).to(dev)  # as noised_unet_pass: shared by all rows

    plain = torch.zeros(K, S, dtype=torch.float64)
    weighted = torch.zeros(K, S, dtype=torch.float64)
    tables: np.ndarray | None = None
    with probed_attention(unet, options.source) as ps, torch.enable_grad():
        sel = select_layer_names(ps.layers, options.layers)
        max_heads = max(l.heads for l in ps.layers)
        tables = np.full((K, S, len(ps.layers), max_heads), np.nan)
        for s, t in enumerate(ts):
            tt = torch.full((K,), t, dtype=torch.long, device=dev)
            x_t = sched.add_noise(z.expand(K, -1, -1, -1), noise[s:s + 1].expand(K, -1, -1, -1), tt).to(dt)
            f_rows: list[torch.Tensor] = []

            def forward_fn(x):
                ps.maps.clear()
                unet(x, tt, encoder_hidden_states=emb)
                f = matching_objective(ps.maps, cols, sel, options.pooling, options.lam)
                f_rows.append(f.detach())
                return f

            grads = probe_gradients(forward_fn, ps.probes, x_t)
            maps = {n: m.detach() for n, m in ps.maps.items()}
            ps.maps.clear()
            plain[:, s] = f_rows[-1].cpu()
            attr = {}
            for li, (layer, gr) in enumerate(zip(ps.layers, grads)):
                A = maps[layer.name]
                G = _head_grad(gr, variant)
                if grad_norm == "mean_abs":
                    scale = torch.stack([G[k][..., c].abs().mean() for k, c in enumerate(cols)])
                    G = G / scale.clamp_min(torch.finfo(G.dtype).tiny).view(-1, 1, 1, 1)
                attr[layer.name] = A * G
                for k, c in enumerate(cols):
                    tables[k, s, li, :layer.heads] = attr[layer.name][k][..., c].double().sum(dim=(-2, -1)).cpu().numpy()
            weighted[:, s] = matching_objective(attr, cols, sel, options.pooling, options.lam).cpu()

    aliases = [l.alias for l in ps.layers]
    by_name = {l.name: l.alias for l in ps.layers}
    per_caption, scores, plain_scores = {}, {}, {}
    for k, c in enumerate(caps):
        scores[c] = float(weighted[k].mean())
        plain_scores[c] = float(plain[k].mean())
        per_caption[c] = {"score": scores[c], "plain_score": plain_scores[c],
                          "by_step": weighted[k].tolist(), "plain_by_step": plain[k].tolist(),
                          "table": tables[k].mean(axis=0), "table_per_step": tables[k]}
    return {"scores": scores, "plain_scores": plain_scores, "per_caption": per_caption, "layers": aliases,
            "score_layers": [by_name[n] for n in sel], "heads": max_heads, "timesteps": list(ts),
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
