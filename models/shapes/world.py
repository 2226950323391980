"""The shapes world: a procedural, compositional scene generator with exact ground truth.

Every image comes with its caption, a scene record (objects with color, shape, size, box) and a pixel
mask per object, so generation, matching and grounding can all be scored automatically.

Caption grammar (exactly these words; one word = one token of the bundled tokenizer):

    single    := "a" [SIZE] COLOR SHAPE                       e.g. "a small red circle"
    relation  := "a" COLOR SHAPE RELATION "a" COLOR SHAPE     e.g. "a red circle left of a blue square"
    count     := NUMBER COLOR SHAPE "s"                       e.g. "two red circles"
    SIZE      := small | big
    COLOR     := red | green | blue | yellow | purple | orange
    SHAPE     := circle | square | triangle
    RELATION  := left of | right of | above | below
    NUMBER    := two | three

"X left of Y" means X's center is left of Y's center, with the horizontal displacement dominant.

Compositional split (`HELD_OUT_COLOR_SHAPES`, `HELD_OUT_RELATION_PAIRS`, `is_compositional_holdout`): a
fixed set of color-shape pairs and ordered (subject, object) pairs of relations that training data drawn
with `sample_dataset` leaves out by default, so that a model trained on it can be read on combinations it
never saw (docs/protocol.md). The shipped model (assets/models/shapes-v1) predates the split: it saw them.

Example:
    >>> scene = sample_scene(np.random.default_rng(0), "relation")
    >>> image = render(scene)              # PIL.Image, 64x64 RGB
    >>> negatives(scene)["swap_roles"]     # "a blue square left of a red circle"
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Literal

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 3
BACKGROUND = (235, 235, 235)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "big")
SIZE_PX = {"small": (10.0, 13.0), "big": (18.0, 22.0)}  # object extent range in pixels at 64x64
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3}
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Unit direction of "subject REL object": subject - object points this way (image y grows downward).
REL_DIRECTION = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0), "below": (0.0, 1.0)}
KINDS = ("single", "relation", "count")
Kind = Literal["single", "relation", "count"]

WORDS: tuple[str, ...] = tuple(
    ["a", *SIZES, *COLORS, *SHAPES, *[s + "s" for s in SHAPES], *NUMBERS, "left", "right", "of", "above", "below"]
)


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: attributes and its box [x0, y0, x1, y1] in pixels of the 64x64 image."""

    color: str
    shape: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene record. `relation` holds the relation word of a relation scene (subject = objects[0])."""

    kind: Kind
    objects: tuple[Obj, ...]
    caption: str
    relation: str | None = None
    size_word: bool = False  # whether the caption names the size (single scenes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        objs = tuple(Obj(o["color"], o["shape"], o["size"], tuple(o["box"])) for o in d["objects"])
        return Scene(d["kind"], objs, d["caption"], d.get("relation"), d.get("size_word", False))


# ----------------------------------------------------------------------------------------------
# Captions: build and parse
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Phrase:
    """A noun phrase of a caption: word indices into `caption.split()` and its attributes."""

    color: str
    shape: str
    size: str | None
    count: int
    word_idx: tuple[int, ...]  # indices of the phrase's content words (number/size/color/shape)


@dataclasses.dataclass(frozen=True)
class ParsedCaption:
    kind: Kind
    words: tuple[str, ...]
    phrases: tuple[Phrase, ...]
    relation: str | None = None
    relation_idx: tuple[int, ...] = ()


class CaptionError(ValueError):
    """A caption outside the world's grammar."""


def caption_of(kind: Kind, objects: Iterable[Obj], relation: str | None = None, size_word: bool = False) -> str:
    objs = list(objects)
    if kind == "single":
        o = objs[0]
        return f"a {o.size} {o.color} {o.shape}" if size_word else f"a {o.color} {o.shape}"
    if kind == "relation":
        a, b = objs
        return f"a {a.color} {a.shape} {relation} a {b.color} {b.shape}"
    number = {v: k for k, v in NUMBERS.items()}[len(objs)]
    return f"{number} {objs[0].color} {objs[0].shape}s"


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_REL = "|".join(RELATIONS)
_SINGLE = re.compile(rf"^a (?:(small|big) )?({_COLOR}) ({_SHAPE})$")
_RELATION = re.compile(rf"^a ({_COLOR}) ({_SHAPE}) ({_REL}) a ({_COLOR}) ({_SHAPE})$")
_COUNT = re.compile(rf"^(two|three) ({_COLOR}) ({_SHAPE})s$")


def parse_caption(caption: str) -> ParsedCaption:
    """Parse a caption of the world's grammar; raises CaptionError otherwise."""
    text = " ".join(caption.strip().lower().split())
    words = tuple(text.split())
    if m := _SINGLE.match(text):
        size, color, shape = m.groups()
        idx = (1, 2, 3) if size else (1, 2)
        return ParsedCaption("single", words, (Phrase(color, shape, size, 1, idx),))
    if m := _RELATION.match(text):
        c1, s1, rel, c2, s2 = m.groups()
        n_rel = len(rel.split())
        p1 = Phrase(c1, s1, None, 1, (1, 2))
        rel_idx = tuple(range(3, 3 + n_rel))
        o = 3 + n_rel + 1
        p2 = Phrase(c2, s2, None, 1, (o, o + 1))
        return ParsedCaption("relation", words, (p1, p2), rel, rel_idx)
    if m := _COUNT.match(text):
        num, color, shape = m.groups()
        return ParsedCaption("count", words, (Phrase(color, shape, None, NUMBERS[num], (0, 1, 2)),))
    raise CaptionError(
        f"caption {caption!r} is outside the shapes-world grammar "
        "(e.g. 'a red circle', 'a small red circle', 'a red circle left of a blue square', 'two red circles')"
    )


def word_classes(caption: str) -> list[str | None]:
    """Class of each word: 'color', 'shape', 'size', 'count', 'relation', or None ('a')."""
    out: list[str | None] = []
    for w in caption.split():
        if w in COLORS:
            out.append("color")
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            out.append("shape")
        elif w in SIZES:
            out.append("size")
        elif w in NUMBERS:
            out.append("count")
        elif w in ("left", "right", "of", "above", "below"):
            out.append("relation")
        else:
            out.append(None)
    return out


def word_objects(scene: Scene) -> list[tuple[int, ...]]:
    """For each caption word, the indices of the objects it refers to (empty: none).

    Color, shape and size words refer to their phrase's object; in a count phrase every word
    (number, color, plural shape) refers to the union of the objects; relation words and "a" to none.
    """
    parsed = parse_caption(scene.caption)
    refs: list[tuple[int, ...]] = [() for _ in parsed.words]
    if parsed.kind == "count":
        for i in parsed.phrases[0].word_idx:
            refs[i] = tuple(range(len(scene.objects)))
    else:
        for k, ph in enumerate(parsed.phrases):
            for i in ph.word_idx:
                refs[i] = (k,)
    return refs


# ----------------------------------------------------------------------------------------------
# Sampling and rendering
# ----------------------------------------------------------------------------------------------
def _extent(rng: np.random.Generator, size: str) -> float:
    lo, hi = SIZE_PX[size]
    return float(rng.uniform(lo, hi))


def _box_at(cx: float, cy: float, ext: float) -> tuple[float, float, float, float]:
    h = ext / 2
    return (cx - h, cy - h, cx + h, cy + h)


def _fits(box, others, margin: float = 3.0) -> bool:
    x0, y0, x1, y1 = box
    if x0 < 1 or y0 < 1 or x1 > IMAGE_SIZE - 1 or y1 > IMAGE_SIZE - 1:
        return False
    for o in others:
        if not (x1 + margin <= o[0] or o[2] + margin <= x0 or y1 + margin <= o[1] or o[3] + margin <= y0):
            return False
    return True


def _random_box(rng, ext, others, tries=200):
    for _ in range(tries):
        cx, cy = rng.uniform(ext / 2 + 1, IMAGE_SIZE - ext / 2 - 1, size=2)
        box = _box_at(cx, cy, ext)
        if _fits(box, others):
            return box
    return None


def _relation_boxes(rng, rel, ext_a, ext_b, tries=500):
    dx, dy = REL_DIRECTION[rel]
    for _ in range(tries):
        cb = rng.uniform(ext_b / 2 + 1, IMAGE_SIZE - ext_b / 2 - 1, size=2)
        dist = rng.uniform((ext_a + ext_b) / 2 + 4, 46)
        perp = rng.uniform(-0.4, 0.4) * dist
        ca = cb + dist * np.array([dx, dy]) + perp * np.array([dy, dx])
        a, b = _box_at(*ca, ext_a), _box_at(*cb, ext_b)
        if _fits(a, []) and _fits(b, [a]):
            return a, b
    return None


def sample_scene(rng: np.random.Generator, kind: Kind, size_word_p: float = 0.5) -> Scene:
    """Draw a random scene of the given kind (deterministic given the generator state)."""
    colors, shapes = list(COLORS), list(SHAPES)
    while True:
        if kind == "single":
            size = SIZES[rng.integers(2)]
            o = Obj(colors[rng.integers(6)], shapes[rng.integers(3)], size, (0, 0, 0, 0))
            box = _random_box(rng, _extent(rng, size), [])
            o = dataclasses.replace(o, box=tuple(float(v) for v in box))
            sw = bool(rng.random() < size_word_p)
            return Scene("single", (o,), caption_of("single", [o], size_word=sw), None, sw)
        if kind == "relation":
            ca, cb = rng.integers(6, size=2)
            sa, sb = rng.integers(3, size=2)
            if ca == cb and sa == sb:
                continue
            rel = RELATIONS[rng.integers(4)]
            za, zb = SIZES[rng.integers(2)], SIZES[rng.integers(2)]
            boxes = _relation_boxes(rng, rel, _extent(rng, za), _extent(rng, zb))
            if boxes is None:
                continue
            a = Obj(colors[ca], shapes[sa], za, tuple(float(v) for v in boxes[0]))
            b = Obj(colors[cb], shapes[sb], zb, tuple(float(v) for v in boxes[1]))
            return Scene("relation", (a, b), caption_of("relation", [a, b], rel), rel)
        if kind == "count":
            n = int(rng.integers(2, 4))
            color, shape, size = colors[rng.integers(6)], shapes[rng.integers(3)], SIZES[rng.integers(2)]
            ext = _extent(rng, size)
            boxes: list = []
            for _ in range(n):
                b = _random_box(rng, ext, boxes)
                if b is None:
                    break
                boxes.append(b)
            if len(boxes) < n:
                continue
            objs = tuple(Obj(color, shape, size, tuple(float(v) for v in b)) for b in boxes)
            return Scene("count", objs, caption_of("count", objs))
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")


def scene_from_caption(caption: str, rng: np.random.Generator) -> Scene:
    """A random layout that satisfies a caption of the grammar (for renders of a given caption)."""
    p = parse_caption(caption)
    for _ in range(1000):
        s = sample_scene(rng, p.kind)
        ph = p.phrases
        if p.kind == "single":
            size = ph[0].size or s.objects[0].size
            if size != s.objects[0].size:
                continue
            o = dataclasses.replace(s.objects[0], color=ph[0].color, shape=ph[0].shape)
            return Scene("single", (o,), caption_of("single", [o], size_word=ph[0].size is not None), None,
                         ph[0].size is not None)
        if p.kind == "relation":
            if s.relation != p.relation:
                continue
            a = dataclasses.replace(s.objects[0], color=ph[0].color, shape=ph[0].shape)
            b = dataclasses.replace(s.objects[1], color=ph[1].color, shape=ph[1].shape)
            return Scene("relation", (a, b), caption_of("relation", [a, b], p.relation), p.relation)
        if len(s.objects) != ph[0].count:
            continue
        objs = tuple(dataclasses.replace(o, color=ph[0].color, shape=ph[0].shape) for o in s.objects)
        return Scene("count", objs, caption_of("count", objs))
    raise RuntimeError(f"could not lay out {caption!r}")


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    s = SUPERSAMPLE
    x0, y0, x1, y1 = (v * s for v in o.box)
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
        # squares are drawn a bit smaller so that their area matches a circle of the same extent
        m = (x1 - x0) * 0.06
        draw.rectangle((x0 + m, y0 + m, x1 - m, y1 - m), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render a scene as an RGB image (anti-aliased by supersampling)."""
    big = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, BACKGROUND)
    d = ImageDraw.Draw(big)
    for o in scene.objects:
        _draw(d, o, COLORS[o.color])
    return big.resize((size, size), Image.BOX)


def object_masks(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Per-object coverage masks, float32 `[objects, size, size]` in [0, 1] (area fraction per pixel)."""
    out = np.zeros((len(scene.objects), size, size), np.float32)
    for k, o in enumerate(scene.objects):
        big = Image.new("L", (IMAGE_SIZE * SUPERSAMPLE,) * 2, 0)
        _draw(ImageDraw.Draw(big), o, 255)
        out[k] = np.asarray(big.resize((size, size), Image.BOX), np.float32) / 255.0
    return out


def word_masks(scene: Scene, size: int = IMAGE_SIZE) -> list[np.ndarray | None]:
    """For each caption word, its mask `[size, size]` (union of its objects) or None."""
    masks = object_masks(scene, size)
    return [masks[list(refs)].max(0) if refs else None for refs in word_objects(scene)]


# ----------------------------------------------------------------------------------------------
# Hard negatives
# ----------------------------------------------------------------------------------------------
# the keys `negatives` may return (what a negative changes), in the order it builds them
NEGATIVE_TYPES = ("swap_attributes", "swap_roles", "flip_relation", "subject_color", "object_color", "subject_shape",
                  "object_shape", "change_count", "change_color", "change_shape", "change_size")


def negatives(scene: Scene, rng: np.random.Generator | None = None) -> dict[str, str]:
    """Hard-negative captions of a scene, keyed by type.

    relation scenes: swap_attributes (colors swapped between the objects: same words, other order),
    swap_roles (subject and object swapped), flip_relation, change_color / change_shape (subject and
    object variants: `subject_color`, `object_color`, `subject_shape`, `object_shape`, ComVG-style);
    count scenes: change_count, change_color, change_shape; single scenes: change_color, change_shape.
    Keys whose negative would equal the caption are left out.
    """
    rng = rng or np.random.default_rng(0)
    out: dict[str, str] = {}

    def other(options, current):
        choices = [c for c in options if c != current]
        return choices[rng.integers(len(choices))]

    objs = scene.objects
    if scene.kind == "relation":
        a, b = objs
        rel = scene.relation
        out["swap_attributes"] = caption_of("relation", [dataclasses.replace(a, color=b.color),
                                                         dataclasses.replace(b, color=a.color)], rel)
        out["swap_roles"] = caption_of("relation", [b, a], rel)
        out["flip_relation"] = caption_of("relation", [a, b], OPPOSITE[rel])
        out["subject_color"] = caption_of("relation", [dataclasses.replace(a, color=other(COLORS, a.color)), b], rel)
        out["object_color"] = caption_of("relation", [a, dataclasses.replace(b, color=other(COLORS, b.color))], rel)
        out["subject_shape"] = caption_of("relation", [dataclasses.replace(a, shape=other(SHAPES, a.shape)), b], rel)
        out["object_shape"] = caption_of("relation", [a, dataclasses.replace(b, shape=other(SHAPES, b.shape))], rel)
    elif scene.kind == "count":
        n = len(objs)
        changed = tuple(objs[:1]) * (5 - n)  # 2 <-> 3
        out["change_count"] = caption_of("count", changed)
        out["change_color"] = caption_of("count", [dataclasses.replace(o, color=other(COLORS, objs[0].color)) for o in objs[:1]] * n)
        out["change_shape"] = caption_of("count", [dataclasses.replace(o, shape=other(SHAPES, objs[0].shape)) for o in objs[:1]] * n)
    else:
        o = objs[0]
        out["change_color"] = caption_of("single", [dataclasses.replace(o, color=other(COLORS, o.color))], size_word=scene.size_word)
        out["change_shape"] = caption_of("single", [dataclasses.replace(o, shape=other(SHAPES, o.shape))], size_word=scene.size_word)
        if scene.size_word:
            out["change_size"] = caption_of("single", [dataclasses.replace(o, size=other(SIZES, o.size))], size_word=True)
    return {k: v for k, v in out.items() if v != scene.caption}


def sample_dataset(seed: int, n: int, mix: dict[str, float] | None = None,
                   exclude_compositional: bool = True) -> list[Scene]:
    """`n` scenes drawn with a seeded generator; `mix` gives each kind's share.

    With `exclude_compositional` (the default) every scene of the compositional split
    (`is_compositional_holdout`) is replaced by a scene of the same kind drawn from a second generator
    (seeded by `(seed, REPLACEMENT_STREAM)`), so the other scenes are exactly those of
    `exclude_compositional=False`: the two datasets differ only where a held-out scene was.

    The shipped model (assets/models/shapes-v1, seed 0, 60 000 scenes) was trained before the split
    existed, on `exclude_compositional=False`: it has seen the held-out combinations. Rebuilding its
    training data (a resume on a machine without the cached data) needs `exclude_compositional=False`.

    Args:
        seed: seed of the generator (the training data uses 0).
        n: number of scenes.
        mix: each kind's share (normalised); default single 0.25, relation 0.45, count 0.30.
        exclude_compositional: replace the compositional split's scenes (see above).

    Returns:
        `n` scenes.

    Example:
        >>> scenes = sample_dataset(0, 1000)
        >>> any(is_compositional_holdout(s) for s in scenes)   # False
    """
    mix = mix or {"single": 0.25, "relation": 0.45, "count": 0.30}
    rng = np.random.default_rng(seed)
    spare = np.random.default_rng((seed, REPLACEMENT_STREAM))
    kinds = list(mix)
    p = np.array([mix[k] for k in kinds], float)
    p /= p.sum()
    out = []
    for _ in range(n):
        scene = sample_scene(rng, kinds[rng.choice(len(kinds), p=p)])
        while exclude_compositional and is_compositional_holdout(scene):
            scene = sample_scene(spare, scene.kind)
        out.append(scene)
    return out


# ----------------------------------------------------------------------------------------------
# Grammar enumeration and the compositional split
# ----------------------------------------------------------------------------------------------
# Color-shape pairs no object of the training data has (any kind, any role, any size).
HELD_OUT_COLOR_SHAPES: tuple[tuple[str, str], ...] = (("purple", "triangle"), ("orange", "square"))
# Ordered (subject, object) color-shape pairs no relation scene of the training data has, with any of the
# four relations; the reverse order (roles swapped) stays in the training data, so a model has seen both
# objects, in relations with each other too, but never this subject with this object.
HELD_OUT_RELATION_PAIRS: tuple[tuple[tuple[str, str], tuple[str, str]], ...] = (
    (("green", "circle"), ("red", "triangle")),
    (("yellow", "square"), ("blue", "circle")),
    (("red", "square"), ("green", "triangle")),
)
REPLACEMENT_STREAM = 0xC0DE  # second seed word of the generator that replaces held-out training scenes
Holdout = Literal["color_shape", "relation_pair"]


def compositional_holdout(scene_or_caption: Scene | str) -> Holdout | None:
    """Which part of the compositional split a scene or caption belongs to, if any.

    Args:
        scene_or_caption: a scene, or a caption of the grammar (CaptionError otherwise).

    Returns:
        "color_shape" when an object (a phrase) has a held-out color-shape pair, else "relation_pair" when a
        relation's ordered (subject, object) pair is held out, else None.

    Example:
        >>> compositional_holdout("two purple triangles")                      # "color_shape"
        >>> compositional_holdout("a green circle above a red triangle")      # "relation_pair"
        >>> compositional_holdout("a red triangle above a green circle")      # None
    """
    if isinstance(scene_or_caption, Scene):
        pairs = [(o.color, o.shape) for o in scene_or_caption.objects]
        relation = scene_or_caption.kind == "relation"
    else:
        parsed = parse_caption(scene_or_caption)
        pairs = [(ph.color, ph.shape) for ph in parsed.phrases]
        relation = parsed.kind == "relation"
    if any(cs in HELD_OUT_COLOR_SHAPES for cs in pairs):
        return "color_shape"
    if relation and (pairs[0], pairs[1]) in HELD_OUT_RELATION_PAIRS:
        return "relation_pair"
    return None


def is_compositional_holdout(scene_or_caption: Scene | str) -> bool:
    """Whether a scene or caption holds a combination of the compositional split (`compositional_holdout`).

    Example:
        >>> is_compositional_holdout("a big orange square")   # True
    """
    return compositional_holdout(scene_or_caption) is not None


def grammar_captions(kind: Kind) -> list[str]:
    """Every caption of one kind that `sample_scene` can produce, in a fixed order.

    single: 18 color-shape pairs x (no size word, small, big) = 54; relation: 306 ordered pairs of distinct
    objects (not both color and shape equal) x 4 relations = 1 224; count: 2 numbers x 18 = 36.

    Example:
        >>> len(grammar_captions("count"))   # 36
    """
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    if kind == "single":
        return [f"a {z + ' ' if z else ''}{c} {s}" for z in ("", *SIZES) for c, s in pairs]
    if kind == "relation":
        return [f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}" for a in pairs for b in pairs if a != b for rel in RELATIONS]
    if kind == "count":
        return [f"{num} {c} {s}s" for num in NUMBERS for c, s in pairs]
    raise ValueError(f"unknown scene kind {kind!r}; expected one of {KINDS}")
