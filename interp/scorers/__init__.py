"""One registry of image-text matching scorers: the list the app's dropdown, the CLI's choices, `eval-matching`
and the matching report all read.

    >>> from interp.scorers import get_scorer, scorer_names
    >>> scorer_names()                     # ('auto', 'dpt_fused', 'dpt_lora', 'dpt', 'structure', 'denoise', ...)
    >>> res = get_scorer("auto").score(pipe, image, captions, MatchOptions())   # a ScoreResult

Adding a scorer: a file in this folder with a `Scorer` subclass (see `base.py`), and one line in `_REGISTRY`.
"""
from __future__ import annotations

from interp.scorers.base import DEFAULT_TIMESTEPS, MatchOptions, PassSpec, ScoreResult, Scorer
from interp.scorers.denoise import DenoiseNormScorer, DenoiseScorer
from interp.scorers.discffusion import DiscffusionScorer
from interp.scorers.dpt import DPTScorer, DPTTunedScorer
from interp.scorers.dpt_fused import DPTFusedScorer
from interp.scorers.head_weighted import HeadWeightedScorer
from interp.scorers.pooled import PooledAttentionScorer
from interp.scorers.routed import RoutedScorer
from interp.scorers.structure import StructureScorer

__all__ = ["DEFAULT_SCORER", "DEFAULT_TIMESTEPS", "MatchOptions", "PassSpec", "ScoreResult", "Scorer", "get_scorer",
           "scorer_names", "scorers"]

# name -> factory; the order is the order users see (auto first: it serves any model; then best measured first:
# docs/dpt.md, docs/measurements/matching_scorers_*)
_REGISTRY = {
    "auto": RoutedScorer,
    "dpt_fused": DPTFusedScorer,  # dpt_lora + the same call's denoising error (weight chosen on validation)
    "dpt_lora": DPTTunedScorer,  # stage 2: adapter + LoRA (assets/adapters/<model>-dpt-lora; docs/dpt.md)
    "dpt": DPTScorer,  # needs a trained adapter (assets/adapters/<model>-dpt; docs/dpt.md)
    "structure": StructureScorer,
    "denoise": DenoiseScorer,
    "denoise_norm": DenoiseNormScorer,
    "lse": PooledAttentionScorer,
    "discffusion": DiscffusionScorer,
    "head_weighted": HeadWeightedScorer,
}
DEFAULT_SCORER = "auto"


def scorer_names() -> tuple[str, ...]:
    """Every registered scorer's name, in display order."""
    return tuple(_REGISTRY)


def get_scorer(name: str | Scorer, **kwargs) -> Scorer:
    """The scorer registered as `name` (built with `kwargs`, e.g. `variant="gxa"` for head_weighted); a Scorer
    instance is returned as it is. ValueError for an unknown name, listing the known ones."""
    if isinstance(name, Scorer):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def scorers() -> list[Scorer]:
    """One default instance of every registered scorer, in display order."""
    return [get_scorer(n) for n in _REGISTRY]
