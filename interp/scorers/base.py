"""What a scorer is: options, the pass it needs, the typed result it returns (shaped like captum's classes).

A `Scorer` declares the noised UNet pass it needs (`PassSpec`: traced logits / cosine maps, the unconditional
row, gradients) and turns that pass's result into a `ScoreResult`. `Scorer.score(pipe, image, captions,
options)` runs the one pass (`models.unet_pass.noised_unet_pass`) and calls `score_pass`; scorers that need
more than one plain pass (gradients, routing) override `score`.

    >>> from interp.scorers import get_scorer
    >>> res = get_scorer("auto").score(pipe, image, ["a red circle", "a blue square"], MatchOptions())
    >>> res.ranking()[0], res.unet_evals

Adding a scorer: one file in `interp/scorers/` with a `Scorer` subclass, and one line in
`interp/scorers/__init__.py`'s `_REGISTRY`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Sequence

from models.limits import validate_captions
from models.unet_pass import PassResult, encode_image, noised_unet_pass

__all__ = ["DEFAULT_TIMESTEPS", "MatchOptions", "PassSpec", "ScoreResult", "Scorer"]

DEFAULT_TIMESTEPS = (200, 400, 600, 800)


@dataclasses.dataclass(frozen=True)
class MatchOptions:
    """Scoring options shared by every scorer (each reads the fields it uses).

    Attributes:
        scorer: the registry name of the scorer (`interp.scorers.scorer_names()`).
        source: "probs" or "logits": which attention the pooled scores read.
        layers: None = all cross-attention layers; "last_per_stage"; or aliases / indices.
        pooling: `interp.lse.POOLINGS`; "cosine" reads the cosine maps (source ignored).
        lam: the LSE temperature (Eq. 4).
        tokens: "all" real tokens (BOS, words, EOS) or "words".
        timesteps: the training timesteps of the noised pass (one UNet call each).
        noise_seed: seeds the noise draw shared by all captions.
    """

    scorer: str = "lse"
    source: Literal["probs", "logits"] = "logits"
    layers: str | None = None
    pooling: str = "lse"
    lam: float = 1.0
    tokens: Literal["all", "words"] = "words"
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS
    noise_seed: int = 0


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """What a scorer needs from the noised pass (several scorers can share one pass: `merge`)."""

    logits: bool = False
    cosine: bool = False
    uncond: bool = False
    grad: bool = False
    padded: bool = False  # trace all key columns of the padded text (BOS, words, EOS, padding), not real tokens only

    def merge(self, other: "PassSpec") -> "PassSpec":
        """The pass serving both specs."""
        return PassSpec(*(a or b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class ScoreResult:
    """One scorer's scores of K captions for one image (higher = better match).

    Attributes:
        scorer: the scorer's registry name.
        captions: the captions, in input order                                            [K]
        scores: one float per caption                                                      [K]
        unet_calls: UNet forward calls; unet_evals: sample-forwards (batch rows)
        unet_backwards: sample-backwards (gradient scorers), else 0
        breakdown: per caption, `interp.lse.ScoreBreakdown` (layer x timestep table), when the scorer has one
        heads: per-head attribution (head-weighted scorer): {"layers", "tables": {caption: [layers, heads]}, ...}
        structure: per caption, `interp.structure.StructureScore` (structure terms), when the scorer has them
        routed_to: the scorer a routing scorer delegated to
        extra: scorer-specific plain data (e.g. plain scores beside head-weighted ones)
        pass_result: the noised pass the scores were read from (None for gradient scorers)
    """

    scorer: str
    captions: list[str]
    scores: list[float]
    unet_calls: int
    unet_evals: int
    unet_backwards: int = 0
    breakdown: dict[str, Any] | None = None
    heads: dict[str, Any] | None = None
    structure: dict[str, Any] | None = None
    routed_to: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    pass_result: PassResult | None = None

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.captions):
            raise ValueError(f"{self.scorer}: {len(self.scores)} scores for {len(self.captions)} captions")
        bad = [c for c, s in zip(self.captions, self.scores) if not math.isfinite(s)]
        if bad:
            raise ValueError(f"{self.scorer}: non-finite score for {bad}")

    @property
    def by_caption(self) -> dict[str, float]:
        """{caption: score} (the first occurrence of a repeated caption)."""
        out: dict[str, float] = {}
        for c, s in zip(self.captions, self.scores):
            out.setdefault(c, float(s))
        return out

    def ranking(self) -> list[tuple[str, float]]:
        """(caption, score) pairs, best first (ties keep input order)."""
        order = sorted(range(len(self.scores)), key=lambda i: -self.scores[i])
        return [(self.captions[i], float(self.scores[i])) for i in order]


class Scorer:
    """A matching score over noised-pass results. Subclasses set `name`, `label`, `description` and implement
    `needs` and `score_pass` (or override `score` when one plain pass is not enough)."""

    name: str = ""
    label: str = ""
    description: str = ""  # what it can and cannot tell apart (shown beside the app's dropdown)
    shares_pass: bool = True  # `score_pass` reads one plain noised pass (False: `score` runs its own passes)

    def needs(self, options: MatchOptions, captions: Sequence[str] = ()) -> PassSpec:
        """The pass this scorer reads for these captions."""
        return PassSpec()

    def score_pass(self, res: PassResult, options: MatchOptions) -> ScoreResult:
        """Scores from a pass result (pure: runs no model)."""
        raise NotImplementedError(f"{type(self).__name__} scores with its own passes: call .score()")

    def score(self, pipe, image, captions: Sequence[str], options: MatchOptions = MatchOptions()) -> ScoreResult:
        """Run the pass this scorer needs on `image` and score `captions` (cleaned: `validate_captions`)."""
        caps = validate_captions(captions, min_count=1)
        spec = self.needs(options, caps)
        res = noised_unet_pass(pipe, encode_image(pipe, image), caps, list(options.timesteps),
                               noise_seed=options.noise_seed, logits=spec.logits, cosine=spec.cosine,
                               uncond=spec.uncond, grad=spec.grad, padded=spec.padded)
        return self.score_pass(res, options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
