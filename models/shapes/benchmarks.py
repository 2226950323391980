"""Fixed, seeded, versioned image-text matching test sets built from the shapes world (`models.shapes.world`).

Each benchmark lives in `assets/benchmarks/<name>/`: `benchmark.json` (version, seed, generator, split rule,
counts, chance levels, items) and `images/*.png` (64x64 renders). Building is deterministic: the same
name, seed and code give a byte-identical `benchmark.json` and identical pixels.

    python -m models.shapes.benchmarks                 # (re)build all four under assets/benchmarks/
    python -m models.shapes.benchmarks counting --out /tmp/b

    >>> b = load_benchmark("winoground")
    >>> it = b.split("test")[0]
    >>> it.captions, it.answers, it.image(0)     # image k's true caption is captions[answers[k]]

The benchmarks (synthetic analogues of the public sets they are named after):

    winoground  2 images x 2 captions with the same words in a different order; caption k describes image k
                (image 1 is a render of caption 1, `world.scene_from_caption`). Types: swap_attributes (the
                colors swapped between the two objects), swap_roles (subject and object swapped), and
                flip_relation (the relation word flipped, e.g. left of -> right of: the one type whose
                captions differ in words, not only in order).
    comvg       1 image, captions [positive, negative]; the negative differs in one role: "subject"
                (subject_color or subject_shape, alternating), "object" (object_color / object_shape) or
                "predicate" (flip_relation). meta["negative_type"] holds the world's negative key.
    counting    1 count-scene image, captions [positive, negative]; types change_count (two <-> three) and
                change_color.
    refcocog    1 image against 10 distinct captions: the true one, up to 5 hard negatives from
                `world.negatives` and random captions of other scenes ("easy": none of their phrases names a
                color-shape pair present in the image) to fill 10; shuffled, `answers[0]` is the true
                index. Types: the scene kind (single / relation / count). Scored Top-1 / Top-5.

Split: exactly TRAIN_SHARE = 10% of each benchmark's items (rounded) are "train" (for few-shot prompt
learning and calibration), stratified by type (each type gets floor(10% of its items), the remainder goes
to the types with the largest fractional parts, ties in type order), chosen with a generator seeded from the
benchmark seed; all others are "test". Report results on "test".

Item schema (JSON and `Item`): id, split, type, images (paths relative to the benchmark folder), captions,
answers (per image, the index of its true caption), scenes (per image, `Scene.to_dict()` of its render),
meta (per benchmark: negative_type / sources).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from models.shapes import world

__all__ = ["BENCHMARK_VERSION", "BENCHMARKS", "SIZES", "SEEDS", "TYPES", "TRAIN_SHARE", "CHANCE", "DEFAULT_ROOT",
           "Item", "Benchmark", "build_benchmark", "build_all", "load_benchmark", "generate_items"]

BENCHMARK_VERSION = 1
ROOT = Path(__file__).resolve().parents[2]  # the repo root
DEFAULT_ROOT = ROOT / "assets" / "benchmarks"
BENCHMARKS = ("winoground", "comvg", "counting", "refcocog")
SIZES = {"winoground": 100, "comvg": 150, "counting": 100, "refcocog": 60}
# Seeds no other part of the project uses (training data: 0; generation eval: 10_007; grounding: 20_011).
SEEDS = {"winoground": 41_001, "comvg": 41_002, "counting": 41_003, "refcocog": 41_004}
TYPES = {
    "winoground": ("swap_attributes", "swap_roles", "flip_relation"),
    "comvg": ("subject", "object", "predicate"),
    "counting": ("change_count", "change_color"),
    "refcocog": ("single", "relation", "count"),
}
TRAIN_SHARE = 0.10
REFCOCOG_CAPTIONS = 10
REFCOCOG_MAX_HARD = 5
# Chance level of each metric (random scores, no ties).
CHANCE = {
    "winoground": {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6},
    "comvg": {"accuracy": 0.5},
    "counting": {"accuracy": 0.5},
    "refcocog": {"top1": 1 / REFCOCOG_CAPTIONS, "top5": 5 / REFCOCOG_CAPTIONS},
}
# the generator label recorded in benchmark.json when v1 was built (module paths of that time: models.benchmarks is
# models.shapes.benchmarks now); kept verbatim so the committed sets still equal a fresh build
GENERATOR = (f"models.benchmarks v{BENCHMARK_VERSION} over models.world (shapes world, "
             f"{world.IMAGE_SIZE}x{world.IMAGE_SIZE} renders); numpy.random.default_rng(seed)")
DESCRIPTIONS = {
    "winoground": "2 images x 2 captions, same words in a different order (swap_attributes, swap_roles) or the "
                  "relation word flipped (flip_relation); caption k describes image k; image 1 renders caption 1",
    "comvg": "image + positive + negative caption differing in the subject, the object or the predicate",
    "counting": "count-scene image + its caption + a negative with the count (two <-> three) or the color changed",
    "refcocog": f"image against {REFCOCOG_CAPTIONS} distinct captions: 1 true, up to {REFCOCOG_MAX_HARD} hard "
                "negatives (world.negatives), the rest random captions naming no color-shape pair of the image",
}


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    """One benchmark item. Image k's true caption is `captions[answers[k]]`; images load lazily.

    Attributes:
        id: "<benchmark>-<index>"
        split: "train" | "test"
        type: the item type (see TYPES)
        images: image paths relative to the benchmark folder                              [images]
        captions: the captions, all distinct                                              [captions]
        answers: per image, the index of its true caption                                 [images]
        scenes: per image, the scene record of its render (`world.Scene.to_dict()`)       [images]
        meta: extra facts (comvg: negative_type; refcocog: sources, the origin of each caption)
        folder: the benchmark folder (not saved)
    """

    id: str
    split: str
    type: str
    images: list[str]
    captions: list[str]
    answers: list[int]
    scenes: list[dict]
    meta: dict = dataclasses.field(default_factory=dict)
    folder: Path | None = dataclasses.field(default=None, repr=False, compare=False)

    def image(self, k: int = 0) -> Image.Image:
        """Image k, loaded from disk (RGB)."""
        if self.folder is None:
            raise ValueError(f"item {self.id} has no folder to load its images from")
        with Image.open(self.folder / self.images[k]) as im:
            return im.convert("RGB")

    def load_images(self) -> list[Image.Image]:
        """All images of the item, loaded from disk."""
        return [self.image(k) for k in range(len(self.images))]

    def scene(self, k: int = 0) -> world.Scene:
        """The scene record of image k."""
        return world.Scene.from_dict(self.scenes[k])

    def to_dict(self) -> dict:
        return {"id": self.id, "split": self.split, "type": self.type, "images": list(self.images),
                "captions": list(self.captions), "answers": list(self.answers), "scenes": list(self.scenes),
                "meta": dict(self.meta)}


@dataclasses.dataclass
class Benchmark:
    """A loaded benchmark: header fields of `benchmark.json` and its items (images load lazily)."""

    name: str
    version: int
    seed: int
    generator: str
    description: str
    train_share: float
    chance: dict
    items: list[Item]
    folder: Path

    def split(self, split: str | None = "test") -> list[Item]:
        """Items of a split: "train", "test", or None / "all" for every item."""
        if split in (None, "all"):
            return list(self.items)
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
        return [it for it in self.items if it.split == split]

    @property
    def types(self) -> tuple[str, ...]:
        return TYPES.get(self.name, tuple(dict.fromkeys(it.type for it in self.items)))

    def counts(self) -> dict:
        """{split: {type: n}} over the items."""
        return _counts(self.items)


def _counts(items: Sequence[Item]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for it in items:
        out.setdefault(it.split, {}).setdefault(it.type, 0)
        out[it.split][it.type] += 1
    return {s: dict(sorted(v.items())) for s, v in sorted(out.items())}


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Draft:
    """An item before its split is assigned, with its scenes (rendered on save)."""

    type: str
    captions: list[str]
    answers: list[int]
    scenes: list[world.Scene]
    meta: dict


def _relation_scene(rng, ok: Callable[[world.Scene], bool]) -> world.Scene:
    for _ in range(10_000):
        s = world.sample_scene(rng, "relation")
        if ok(s):
            return s
    raise RuntimeError("no relation scene satisfied the constraint")  # pragma: no cover


def _winoground(rng, n: int) -> list[_Draft]:
    types = TYPES["winoground"]
    out = []
    for i in range(n):
        kind = types[i % len(types)]
        if kind == "swap_attributes":  # distinct colors and shapes: otherwise it equals swap_roles / the caption
            cond = lambda s: s.objects[0].color != s.objects[1].color and s.objects[0].shape != s.objects[1].shape
        elif kind == "swap_roles":  # distinct shapes: otherwise swapping roles is swapping colors
            cond = lambda s: s.objects[0].shape != s.objects[1].shape
        else:
            cond = lambda s: True
        s0 = _relation_scene(rng, cond)
        c1 = world.negatives(s0, rng)[kind]
        s1 = world.scene_from_caption(c1, rng)
        out.append(_Draft(kind, [s0.caption, c1], [0, 1], [s0, s1], {}))
    return out


def _same_phrase(caption: str) -> bool:
    p = world.parse_caption(caption).phrases
    return (p[0].color, p[0].shape) == (p[1].color, p[1].shape)


def _comvg(rng, n: int) -> list[_Draft]:
    types = TYPES["comvg"]
    out = []
    seen = {t: 0 for t in types}
    for i in range(n):
        role = types[i % len(types)]
        if role == "predicate":
            key = "flip_relation"
        else:
            key = f"{role}_{('color', 'shape')[seen[role] % 2]}"
        seen[role] += 1
        while True:  # skip negatives whose subject and object phrases coincide ("a red circle left of a red circle")
            s = world.sample_scene(rng, "relation")
            neg = world.negatives(s, rng).get(key)
            if neg is not None and not _same_phrase(neg):
                break
        out.append(_Draft(role, [s.caption, neg], [0], [s], {"negative_type": key}))
    return out


def _counting(rng, n: int) -> list[_Draft]:
    types = TYPES["counting"]
    out = []
    for i in range(n):
        kind = types[i % len(types)]
        s = world.sample_scene(rng, "count")
        neg = world.negatives(s, rng)[kind]
        out.append(_Draft(kind, [s.caption, neg], [0], [s], {}))
    return out


def _pairs(caption: str) -> set[tuple[str, str]]:
    return {(p.color, p.shape) for p in world.parse_caption(caption).phrases}


def _refcocog(rng, n: int) -> list[_Draft]:
    types = TYPES["refcocog"]
    out = []
    for i in range(n):
        kind = types[i % len(types)]
        s = world.sample_scene(rng, kind)
        present = {(o.color, o.shape) for o in s.objects}
        hard = {}
        for key, cap in world.negatives(s, rng).items():
            if cap != s.caption and cap not in hard.values():
                hard[key] = cap
        keys = list(hard)
        pick = sorted(rng.choice(len(keys), size=min(REFCOCOG_MAX_HARD, len(keys)), replace=False).tolist())
        captions, sources = [s.caption], ["true"]
        for j in pick:
            captions.append(hard[keys[j]])
            sources.append(keys[j])
        while len(captions) < REFCOCOG_CAPTIONS:
            other = world.sample_scene(rng, world.KINDS[int(rng.integers(len(world.KINDS)))]).caption
            if other not in captions and not (_pairs(other) & present):
                captions.append(other)
                sources.append("random")
        order = rng.permutation(REFCOCOG_CAPTIONS).tolist()
        captions = [captions[j] for j in order]
        sources = [sources[j] for j in order]
        out.append(_Draft(kind, captions, [sources.index("true")], [s], {"sources": sources}))
    return out


_GENERATORS = {"winoground": _winoground, "comvg": _comvg, "counting": _counting, "refcocog": _refcocog}


def _assign_splits(types: Sequence[str], order: Sequence[str], rng, share: float = TRAIN_SHARE) -> list[str]:
    """Stratified split: round(share * n) train items, by largest remainder over the types (ties in `order`)."""
    n = len(types)
    idx_of = {t: [i for i, x in enumerate(types) if x == t] for t in order}
    quota = {t: share * len(idx_of[t]) for t in order}
    take = {t: math.floor(quota[t]) for t in order}
    left = round(share * n) - sum(take.values())
    for t in sorted(order, key=lambda t: (-(quota[t] - take[t]), order.index(t)))[:max(left, 0)]:
        take[t] += 1
    split = ["test"] * n
    for t in order:
        idx = idx_of[t]
        for j in rng.permutation(len(idx))[: take[t]].tolist():
            split[idx[j]] = "train"
    return split


def generate_items(name: str, seed: int | None = None, n: int | None = None) -> list[tuple[Item, list[world.Scene]]]:
    """The items of a benchmark (with their scenes, not yet rendered), deterministic in (name, seed, n)."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {BENCHMARKS}")
    seed = SEEDS[name] if seed is None else int(seed)
    n = SIZES[name] if n is None else int(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    drafts = _GENERATORS[name](np.random.default_rng(seed), n)
    splits = _assign_splits([d.type for d in drafts], TYPES[name], np.random.default_rng([seed, 1]))
    width = max(4, len(str(n - 1)))
    out = []
    for i, (d, sp) in enumerate(zip(drafts, splits)):
        stem = f"{i:0{width}d}"
        files = [f"images/{stem}.png"] if len(d.scenes) == 1 else [f"images/{stem}_{k}.png" for k in range(len(d.scenes))]
        item = Item(f"{name}-{stem}", sp, d.type, files, d.captions, d.answers, [s.to_dict() for s in d.scenes],
                    d.meta)
        out.append((item, d.scenes))
    return out


def _json_text(header: dict, items: Sequence[Item]) -> str:
    """benchmark.json text: header fields one per line, then one item per line (diff-friendly, stable)."""
    head = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in header.items())
    body = ",\n".join("    " + json.dumps(it.to_dict(), separators=(",", ":")) for it in items)
    return "{\n" + head + ',\n  "items": [\n' + body + "\n  ]\n}\n"


def build_benchmark(name: str, folder: str | Path | None = None, seed: int | None = None,
                    n: int | None = None) -> Path:
    """Generate a benchmark and write `benchmark.json` + `images/*.png` into `folder`; returns the folder.

    Args:
        name: one of BENCHMARKS.
        folder: where to write (default `assets/benchmarks/<name>`); earlier `images/*.png` there are removed.
        seed: the generator seed (default SEEDS[name]).
        n: the number of items (default SIZES[name]).
    """
    seed = SEEDS.get(name) if seed is None else int(seed)
    pairs = generate_items(name, seed, n)
    items = [it for it, _ in pairs]
    folder = Path(folder) if folder is not None else DEFAULT_ROOT / name
    img_dir = folder / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for old in img_dir.glob("*.png"):
        old.unlink()
    for it, scenes in pairs:
        for rel, s in zip(it.images, scenes):
            world.render(s).save(folder / rel, format="PNG", optimize=False)
    header = {
        "name": name, "version": BENCHMARK_VERSION, "seed": seed, "generator": GENERATOR,
        "description": DESCRIPTIONS[name], "n_items": len(items), "types": list(TYPES[name]),
        "train_share": TRAIN_SHARE,
        "split_rule": "round(train_share * n_items) train items, stratified by type (largest remainder), "
                      "chosen with default_rng([seed, 1]); the rest test",
        "counts": _counts(items), "chance": CHANCE[name],
    }
    (folder / "benchmark.json").write_text(_json_text(header, items), encoding="utf-8")
    return folder


def build_all(root: str | Path | None = None) -> dict[str, Path]:
    """Build every benchmark with its default seed and size under `root` (default assets/benchmarks)."""
    root = Path(root) if root is not None else DEFAULT_ROOT
    return {name: build_benchmark(name, root / name) for name in BENCHMARKS}


def load_benchmark(name: str | Path, root: str | Path | None = None) -> Benchmark:
    """Load a benchmark by name (from `root`, default assets/benchmarks) or from a folder path.

    Raises:
        FileNotFoundError: no benchmark.json there (build it with `python -m models.shapes.benchmarks`).
        ValueError: the file's version differs from BENCHMARK_VERSION (rebuild it).
    """
    p = Path(name)
    folder = p if (p / "benchmark.json").is_file() else (Path(root) if root is not None else DEFAULT_ROOT) / str(name)
    path = folder / "benchmark.json"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark at {path}; build it with `python -m models.shapes.benchmarks {p.name}`"
                                + (f" (known: {', '.join(BENCHMARKS)})" if str(name) not in BENCHMARKS else ""))
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("version") != BENCHMARK_VERSION:
        raise ValueError(f"{path} is version {d.get('version')}, this code reads version {BENCHMARK_VERSION}; "
                         f"rebuild it with `python -m models.shapes.benchmarks {d.get('name', p.name)}`")
    items = [Item(it["id"], it["split"], it["type"], it["images"], it["captions"], it["answers"], it["scenes"],
                  it.get("meta", {}), folder) for it in d["items"]]
    return Benchmark(d["name"], d["version"], d["seed"], d["generator"], d["description"], d["train_share"],
                     d["chance"], items, folder)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m models.shapes.benchmarks", description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*", default=list(BENCHMARKS), help=f"default: all of {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", default=None, help="root folder (default assets/benchmarks)")
    a = ap.parse_args(argv)
    root = Path(a.out) if a.out else DEFAULT_ROOT
    for name in a.names:
        if name not in BENCHMARKS:
            ap.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        folder = build_benchmark(name, root / name)
        b = load_benchmark(folder)
        print(f"{name:10s} {len(b.items):4d} items  {b.counts()}  -> {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
