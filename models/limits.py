"""Input limits and checks shared by every face (app, CLI, tasks): one source for what a user may ask for.

Each check returns the cleaned value or raises ValueError with a one-line message meant for the user; the
app shows it as `gr.Error`, the CLI prints it on stderr and exits 2, so both say the same thing.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["validate_captions", "out_of_vocabulary"]


def validate_captions(captions: Sequence[str] | None, min_count: int = 2) -> list[str]:
    """Captions with whitespace collapsed, or ValueError ("no captions given", "caption 2 is empty", ...)."""
    if not captions:
        raise ValueError("no captions given")
    out = []
    for i, c in enumerate(captions):
        if c is None or not str(c).strip():
            raise ValueError(f"caption {i + 1} is empty")
        out.append(" ".join(str(c).split()))
    if len(out) < min_count:
        raise ValueError(f"ranking needs at least {min_count} captions, got {len(out)}")
    return out


def out_of_vocabulary(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` the tokenizer only spells letter by letter (unknown to its vocabulary)."""
    bad = []
    for w in prompt.split():
        toks = tokenizer.tokenize(w)
        if len(toks) > 1 and all(len(t.replace("</w>", "")) <= 1 for t in toks):
            bad.append(w)
    return bad
