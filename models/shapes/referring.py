"""Referring expressions over shapes-world scenes, with the referred object's exact box (for DPT's REC).

Expression kinds (every one refers to exactly one object of its scene):

    attribute := "the" COLOR SHAPE                              "the red circle"      (its color-shape is unique)
    relation  := "the" SHAPE RELATION "the" COLOR SHAPE         "the square left of the blue circle"
    size      := "the" (biggest | smallest) SHAPE               "the biggest circle"  (objects of that shape differ
                                                                                      in size)

Scenes have 2-3 objects of random color, shape and size (`sample_referring_scene`). A relation holds as in the
captions ("X left of Y": X's center is left of Y's, the horizontal displacement dominant), here with a margin
(dominant axis at least 1.5x the other and 4 px) so that no expression is borderline.

The bundled tokenizer knows only the caption words (`world.WORDS`): `model_text` maps "the" -> "a",
"biggest" -> "big", "smallest" -> "small" before an expression reaches the text encoder; `check_expression`
refuses any other word with a message listing the words it knows.

Example:
    >>> ex = sample_referring(np.random.default_rng(0), "relation")
    >>> ex.text, ex.model_text, ex.box          # "the square left of the blue circle", "a square left of a ...", (x0, y0, x1, y1)
    >>> image = render_objects(ex.objects)
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from models.shapes import world

__all__ = ["REF_KINDS", "REFERRING_WORDS", "WORD_MAP", "ReferringExpression", "check_expression", "model_text",
           "relation_between", "expressions_of", "sample_referring_scene", "sample_referring", "referring_dataset",
           "render_objects"]

RefKind = Literal["attribute", "relation", "size"]
REF_KINDS: tuple[str, ...] = ("attribute", "relation", "size")
WORD_MAP = {"the": "a", "biggest": "big", "smallest": "small"}
REFERRING_WORDS: tuple[str, ...] = tuple(dict.fromkeys(world.WORDS + tuple(WORD_MAP)))


@dataclasses.dataclass(frozen=True)
class ReferringExpression:
    """One referring expression and its referent.

    Attributes:
        text: the expression as a user writes it ("the red circle")
        kind: "attribute" | "relation" | "size"
        objects: the scene's objects (boxes in pixels of the 64x64 image)
        target: index of the referred object in `objects`
        positive: word indices (of `text.split()`) that name the referred object
    """

    text: str
    kind: str
    objects: tuple[world.Obj, ...]
    target: int
    positive: tuple[int, ...]

    @property
    def model_text(self) -> str:
        return model_text(self.text)

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The referred object's box (x0, y0, x1, y1) in pixels of the 64x64 image."""
        return self.objects[self.target].box

    def box_cxcywh(self, size: float = world.IMAGE_SIZE) -> tuple[float, float, float, float]:
        """The box as (cx, cy, w, h) in [0, 1]."""
        x0, y0, x1, y1 = self.box
        return ((x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size)


def check_expression(text: str) -> str:
    """The expression with whitespace collapsed and lower-cased; ValueError for an empty one or a word outside
    `REFERRING_WORDS`."""
    words = str(text).strip().lower().split()
    if not words:
        raise ValueError("the referring expression is empty; e.g. 'the red circle'")
    bad = [w for w in words if w not in REFERRING_WORDS]
    if bad:
        raise ValueError(f"words outside the referring vocabulary: {', '.join(dict.fromkeys(bad))}; it knows: "
                         f"{', '.join(REFERRING_WORDS)} (e.g. 'the red circle', 'the square left of the blue "
                         "circle', 'the biggest circle')")
    return " ".join(words)


def model_text(text: str) -> str:
    """The words the text encoder sees: "the" -> "a", "biggest" -> "big", "smallest" -> "small"."""
    return " ".join(WORD_MAP.get(w, w) for w in text.lower().split())


def relation_between(a: world.Obj, b: world.Obj, ratio: float = 1.5, min_px: float = 4.0) -> str | None:
    """The relation word R with "a R b" clearly true, or None when the displacement is ambiguous."""
    (ax, ay), (bx, by) = a.center, b.center
    dx, dy = ax - bx, ay - by
    if abs(dx) >= ratio * abs(dy) and abs(dx) >= min_px:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= ratio * abs(dx) and abs(dy) >= min_px:
        return "above" if dy < 0 else "below"
    return None


def _extent(o: world.Obj) -> float:
    return o.box[2] - o.box[0]


def expressions_of(objects: Sequence[world.Obj]) -> list[ReferringExpression]:
    """Every unambiguous expression of the three kinds for a scene's objects (fixed order)."""
    objs = tuple(objects)
    out: list[ReferringExpression] = []
    cs = [(o.color, o.shape) for o in objs]
    for i, o in enumerate(objs):
        if cs.count(cs[i]) == 1:
            out.append(ReferringExpression(f"the {o.color} {o.shape}", "attribute", objs, i, (1, 2)))
    for i, o in enumerate(objs):
        for j, anchor in enumerate(objs):
            if i == j or cs.count(cs[j]) != 1:
                continue
            rel = relation_between(o, anchor)
            if rel is None:
                continue
            # the target's shape + the relation must single it out among objects of its shape
            rivals = [k for k, p in enumerate(objs) if k not in (i, j) and p.shape == o.shape
                      and relation_between(p, anchor) == rel]
            if rivals:
                continue
            out.append(ReferringExpression(f"the {o.shape} {rel} the {anchor.color} {anchor.shape}", "relation",
                                           objs, i, (1,)))
    for shape in world.SHAPES:
        idx = [k for k, o in enumerate(objs) if o.shape == shape]
        if len(idx) < 2:
            continue
        ext = sorted((_extent(objs[k]), k) for k in idx)
        if len({objs[k].size for k in idx}) < 2 or ext[-1][0] - ext[-2][0] < 3 and ext[1][0] - ext[0][0] < 3:
            continue
        if ext[-1][0] - ext[-2][0] >= 3:
            out.append(ReferringExpression(f"the biggest {shape}", "size", objs, ext[-1][1], (1, 2)))
        if ext[1][0] - ext[0][0] >= 3:
            out.append(ReferringExpression(f"the smallest {shape}", "size", objs, ext[0][1], (1, 2)))
    return out


def sample_referring_scene(rng: np.random.Generator, n_objects: int | None = None,
                           same_shape_p: float = 0.4) -> tuple[world.Obj, ...]:
    """2-3 non-overlapping objects of random color, shape and size (with probability `same_shape_p` the second
    object copies the first's shape, so that size expressions occur)."""
    n = int(n_objects or rng.integers(2, 4))
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    while True:
        objs: list[world.Obj] = []
        boxes: list = []
        for k in range(n):
            size = world.SIZES[rng.integers(2)]
            shape = objs[0].shape if k == 1 and rng.random() < same_shape_p else shapes[rng.integers(3)]
            if k == 1 and shape == objs[0].shape and rng.random() < 0.7:
                size = "big" if objs[0].size == "small" else "small"
            box = world._random_box(rng, world._extent(rng, size), boxes)
            if box is None:
                break
            boxes.append(box)
            objs.append(world.Obj(colors[rng.integers(6)], shape, size, tuple(float(v) for v in box)))
        if len(objs) == n:
            return tuple(objs)


def sample_referring(rng: np.random.Generator, kind: str | None = None) -> ReferringExpression:
    """One expression of `kind` (default: a kind drawn uniformly) on a fresh scene."""
    kind = kind or REF_KINDS[rng.integers(len(REF_KINDS))]
    if kind not in REF_KINDS:
        raise ValueError(f"unknown referring kind {kind!r}; expected one of {REF_KINDS}")
    while True:
        cands = [e for e in expressions_of(sample_referring_scene(rng)) if e.kind == kind]
        if cands:
            return cands[rng.integers(len(cands))]


def referring_dataset(seed: int, n_per_kind: int) -> list[ReferringExpression]:
    """`n_per_kind` expressions of each kind (kinds in `REF_KINDS` order), from a seeded generator.
    Seeds: DPT training 50_000, validation 50_001, test 50_002."""
    rng = np.random.default_rng(seed)
    return [sample_referring(rng, k) for k in REF_KINDS for _ in range(n_per_kind)]


def render_objects(objects: Sequence[world.Obj], size: int = world.IMAGE_SIZE) -> Image.Image:
    """Render objects like `world.render`."""
    return world.render(world.Scene("single", tuple(objects), ""), size)
