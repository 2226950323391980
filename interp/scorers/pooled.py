"""Pooled-attention scorer: Discffusion's Eq. 4 (LSE and its pooling variants) over the traced maps."""
from __future__ import annotations

from typing import Sequence

from models.unet_pass import PassResult

from interp.lse import lse_score
from interp.scorers.base import MatchOptions, PassSpec, ScoreResult, Scorer

__all__ = ["PooledAttentionScorer"]


class PooledAttentionScorer(Scorer):
    """f(x, y) = mean over layers, heads and timesteps of the pooled cross-attention map (`interp.lse`)."""

    name = "lse"
    label = "lse — pooled cross-attention (Discffusion Eq. 4)"
    description = ("Pools each caption's cross-attention maps (LogSumExp by default). Tells apart captions that "
                   "name different things only weakly; cannot read word order, roles or relations (a caption "
                   "and its role swap attend to the same words).")

    def needs(self, options: MatchOptions, captions: Sequence[str] = ()) -> PassSpec:
        cos = options.pooling == "cosine"
        return PassSpec(logits=not cos and options.source == "logits", cosine=cos)

    def score_pass(self, res: PassResult, options: MatchOptions) -> ScoreResult:
        br = {c: lse_score(tr, source=options.source, layers=options.layers, pooling=options.pooling,
                           lam=options.lam, tokens=options.tokens) for c, tr in zip(res.captions, res.traces)}
        return ScoreResult(self.name, list(res.captions), [float(br[c].score) for c in res.captions],
                           unet_calls=res.unet_calls, unet_evals=res.unet_calls * len(res.captions),
                           breakdown=br, pass_result=res)
