"""Scene-parsing auxiliary loss for the text encoder (training only; the head is not exported).

Why: the bundled text encoder is trained from scratch through the denoising loss alone, and at
step 2.5k it had not separated "left of" from "right of" (relative distance of the final token
states 0.02, against 1.5 for a color change), so the UNet had no relation signal to learn from
and placed the two objects of a relation caption at chance. Stable Diffusion gets distinct
states from a pretrained CLIP encoder; this head plays that pretraining's part, inside training:
linear probes on the encoder's final states (the very states the UNet cross-attends to) must
recover the caption's structure.

Targets, per caption (`caption_labels`), `[tokens, GROUPS]` with -100 where a position can't know:
  relation   5 classes (none + world.RELATIONS) at every position from where the caption's kind is
             decided on (the relation word; EOS for a single object; the number word for a count):
             the causal encoder's later tokens (object words, EOS, padding) must all carry it.
  subject color / shape, object color / shape (+ none), number (1-3): at the EOS position.

Example:
    >>> labels = caption_labels(["a red circle left of a blue square"], tokenizer)   # [1, 77, 6]
    >>> head = TextAuxHead(hidden=64)
    >>> loss = text_aux_loss(head, text_encoder(ids)[0], torch.from_numpy(labels))
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.shapes import world

IGNORE = -100
GROUPS: dict[str, int] = {
    "relation": 1 + len(world.RELATIONS),
    "subject_color": len(world.COLORS),
    "subject_shape": len(world.SHAPES),
    "object_color": 1 + len(world.COLORS),
    "object_shape": 1 + len(world.SHAPES),
    "number": 3,
}


def caption_labels(captions: Sequence[str], tokenizer, length: int | None = None) -> np.ndarray:
    """`[n, tokens, len(GROUPS)]` int64 targets (IGNORE where undefined) for captions of the world.

    Token positions follow the tokenizer (BOS at 0, word i at i + 1, EOS after the last word): the
    world's vocabulary has one token per word, which this checks.
    """
    length = length or tokenizer.model_max_length
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    out = np.full((len(captions), length, len(GROUPS)), IGNORE, np.int64)
    n_tokens = [len(ids) for ids in tokenizer(list(captions)).input_ids]  # BOS + words + EOS
    for n, (cap, n_tok) in enumerate(zip(captions, n_tokens)):
        p = world.parse_caption(cap)
        if n_tok != len(p.words) + 2:
            raise ValueError(f"caption {cap!r} does not tokenize one token per word")
        eos = len(p.words) + 1
        if p.kind == "relation":
            decided, rel = p.relation_idx[0] + 1, 1 + world.RELATIONS.index(p.relation)
        elif p.kind == "count":
            decided, rel = 1, 0
        else:
            decided, rel = eos, 0
        if decided < length:
            out[n, decided:, 0] = rel
        if eos >= length:
            continue
        s = p.phrases[0]
        o = p.phrases[1] if len(p.phrases) > 1 else None
        out[n, eos, 1:] = (colors.index(s.color), shapes.index(s.shape),
                           0 if o is None else 1 + colors.index(o.color),
                           0 if o is None else 1 + shapes.index(o.shape), s.count - 1)
    return out


class TextAuxHead(nn.Module):
    """One linear probe per label group over the text encoder's final states."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.probes = nn.Linear(hidden, sum(GROUPS.values()))

    def forward(self, states: torch.Tensor) -> list[torch.Tensor]:
        """`[b, tokens, hidden]` -> one `[b, tokens, classes]` logits tensor per group (GROUPS order)."""
        return list(self.probes(states).split(list(GROUPS.values()), dim=-1))


def text_aux_loss(head: TextAuxHead, states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over groups of the cross-entropy over each group's labelled positions.

    Args:
        states: `[b, tokens, hidden]` text-encoder final states.
        labels: `[b, tokens, len(GROUPS)]` from `caption_labels` (IGNORE rows are skipped; a batch row
            whose caption was dropped for classifier-free guidance should be set to IGNORE).
    """
    losses = []
    for g, logits in enumerate(head(states)):
        y = labels[..., g]
        if (y != IGNORE).any():
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE))
    return torch.stack(losses).mean() if losses else states.sum() * 0.0


def aux_accuracy(head: TextAuxHead, states: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per group, the fraction of labelled positions the probes get right (a diagnostic)."""
    out = {}
    with torch.no_grad():
        for (name, _), logits in zip(GROUPS.items(), head(states)):
            y = labels[..., list(GROUPS).index(name)]
            m = y != IGNORE
            if m.any():
                out[name] = float((logits.argmax(-1)[m] == y[m]).float().mean())
    return out
