"""Structure-aware scorer: phrase binding and relation direction read from the word maps (`interp.structure`).

What it assumes (relation ability that belongs to the scorer, not to the model): the caption is parsed with the
shapes world's grammar (`interp.structure.bind_caption`), and each relation word's direction is hard-coded
(`REL_DIRECTION`: "left of" = the subject's attention lies left of the object's, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from models.unet_pass import PassResult

from interp.scorers.base import MatchOptions, PassSpec, ScoreResult, Scorer
from interp.structure import StructureConfig, bind_caption, lse_kwargs, structure_scores

__all__ = ["StructureScorer"]


@dataclasses.dataclass(repr=False)
class StructureScorer(Scorer):
    """score = binding + w_rel * relation [+ w_lse * LSE] per caption (see `interp.structure`).

    Args:
        config: the structure terms' weights and map size.
        all_or_none: if any caption cannot be bound, every caption falls back to LSE (comparable scores).
    """

    config: StructureConfig = StructureConfig()
    all_or_none: bool = True
    name: str = "structure"
    label: str = "structure — phrase binding + relation direction from word maps"
    description: str = ("Reads whether each phrase's words attend to one place and whether the subject lies on the "
                        "relation's side of the object. Tells apart role swaps, attribute swaps and flipped "
                        "relations; blind to counts and to captions that name different things. Parses the "
                        "shapes grammar and hard-codes each relation's direction.")

    def needs(self, options: MatchOptions, captions: Sequence[str] = ()) -> PassSpec:
        # logits only when an LSE term is read (w_lse > 0, or a caption that cannot be bound) and asked for
        need_lse = bool(self.config.w_lse) or any(not bind_caption(c).scoreable for c in captions)
        return PassSpec(logits=need_lse and options.source == "logits")

    def score_pass(self, res: PassResult, options: MatchOptions) -> ScoreResult:
        caps = list(res.captions)
        br = structure_scores(res.traces, caps, self.config, lse_kwargs(options), self.all_or_none)
        return ScoreResult(self.name, caps, [float(br[c].score) for c in caps], unet_calls=res.unet_calls,
                           unet_evals=res.unet_calls * len(caps), structure=br, pass_result=res)
