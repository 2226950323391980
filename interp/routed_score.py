"""Routed matching score: the structure-aware score where the captions share their content words, the
denoising-error (Diffusion Classifier) score elsewhere; the route is decided from the captions alone, so one
batched noised UNet pass is run, by the scorer routed to.

Why (docs/measurements/matching_report_step1807): on the shapes benchmarks the structure-aware score decides
between captions made of the same colors, shapes and counts in a different arrangement (role swaps,
attribute swaps, flipped relations: Winoground group 0.94, ComVG predicate 1.00), where every pooled-attention
and denoising score stays near or below chance; the denoising error decides between captions that name
different things (ComVG subject / object 0.76 / 0.84, counting 0.82, RefCOCOg top-1 0.43), where the
structure score, which has no count term and compares captions of different kinds badly, is weaker.

Rule (`route`): "structure" when every caption binds in the world's grammar and all captions have the same
multiset of content words (the caption's words without "a" and the relation words); else "denoise".

    >>> res = routed_scorer_fn(pipe, image, ["a red circle left of a blue square",
    ...                                      "a blue square left of a red circle"], MatchOptions())
    >>> res["routed_to"], res["scores"]
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

from models import world

from .structure_score import bind_caption, structure_scorer_fn

__all__ = ["content_words", "route", "routed_scorer_fn"]

_FUNCTION_WORDS = {"a"} | {w for r in world.RELATIONS for w in r.split()}


def content_words(caption: str) -> Counter:
    """The caption's words without "a" and the relation words, as a multiset."""
    return Counter(w for w in caption.lower().split() if w not in _FUNCTION_WORDS)


def route(captions: Sequence[str]) -> str:
    """"structure" if every caption binds and all share one multiset of content words, else "denoise"."""
    caps = list(captions)
    if not caps:
        raise ValueError("no captions to route")
    if not all(bind_caption(c).scoreable for c in caps):
        return "denoise"
    first = content_words(caps[0])
    return "structure" if all(content_words(c) == first for c in caps[1:]) else "denoise"


def routed_scorer_fn(pipe, image, captions: Sequence[str], options) -> dict[str, Any]:
    """Scorer hook (`interp.matching_eval`): the routed scorer's result ({"scores", "breakdowns", "unet_evals",
    "unet_calls", "pass"}) plus "routed_to"; one noised pass at `options.timesteps` with `options.noise_seed`."""
    from .matching import score_image_captions, validate_captions

    caps = validate_captions(captions, min_count=1)
    choice = route(caps)
    if choice == "structure":
        res = structure_scorer_fn(pipe, image, caps, options)
    else:
        res = score_image_captions(pipe, image, caps, dataclasses.replace(options, scorer="denoise"))
        res["unet_calls"] = res["pass"].unet_calls
    return {**res, "routed_to": choice}


routed_scorer_fn.__name__ = "auto"
