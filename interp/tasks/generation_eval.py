"""Generation quality on the shapes world: prompts of a named split, generations judged by the scene checker.

The splits and their seeds are defined here, once (docs/protocol.md): "test" (the committed readings,
read once per model), "validation" (every choice: guidance, steps, checkpoints) and "compositional"
(prompts with the held-out combinations of `world.HELD_OUT_COLOR_SHAPES` / `HELD_OUT_RELATION_PAIRS`).

Example:
    >>> res = evaluate_generation(load_pipeline(), n_per_kind=100)            # the test split
    >>> res["single"], res["relation"], res["count"], res["n"]
    >>> res["intervals"]["count"]["ci95"]                                       # Wilson 95 % interval
"""
from __future__ import annotations

import functools
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from models.sampling import generate_images
from models.shapes import world
from models.shapes.checker import check

from interp import stats

Split = Literal["test", "validation", "compositional"]
SPLITS: tuple[str, ...] = ("test", "validation", "compositional")
# Every seed of every evaluation, in one place. The training data uses seed 0 (and its VAE stage seed 1).
EVAL_SEEDS: dict[str, int] = {
    "test": 10_007,               # generation test prompts (committed readings: keep)
    "validation": 30_011,         # generation validation prompts
    "compositional": 40_009,      # generation prompts with held-out combinations
    "grounding_scenes": 20_011,   # interp.tasks.grounding_eval: held-out renders (committed readings: keep)
    "grounding_prompts": 20_012,  # interp.tasks.grounding_eval: prompts of the generation-grounding eval
}
# Generation noise: prompt i of a split is generated with seed NOISE_SEEDS[split] + i. The test base is the
# CLI's `eval-generation --seed` default that produced the committed readings; the ranges stay disjoint
# while a split has fewer than NOISE_RANGE prompts.
NOISE_SEEDS: dict[str, int] = {"test": 1_234, "validation": 100_000, "compositional": 200_000}
NOISE_RANGE = 90_000
EVAL_SEED = EVAL_SEEDS["test"]  # the test prompts' seed (the training data uses seed 0)
TEST_N_PER_KIND = 100  # the test split as committed readings read it; validation avoids these captions


def held_out_prompts(n_per_kind: int = 100, seed: int = EVAL_SEED) -> list[tuple[str, str]]:
    """`(kind, caption)` pairs, n per kind, drawn with a seed the training data never uses.

    With the default seed these are the test prompts (`eval_prompts("test", n_per_kind)`).
    """
    rng = np.random.default_rng(seed)
    out = []
    for kind in world.KINDS:
        for _ in range(n_per_kind):
            out.append((kind, world.sample_scene(rng, kind).caption))
    return out


@functools.lru_cache(maxsize=1)
def _test_captions() -> frozenset[str]:
    return frozenset(c for _, c in held_out_prompts(TEST_N_PER_KIND, EVAL_SEED))


def _validation_prompts(n_per_kind: int, seed: int) -> list[tuple[str, str]]:
    avoid = _test_captions()
    out = []
    for j, kind in enumerate(world.KINDS):
        rng = np.random.default_rng((seed, j))  # a stream per kind: a smaller n is a prefix of a larger one
        got = 0
        for _ in range(1000 * max(n_per_kind, 1)):
            if got == n_per_kind:
                break
            cap = world.sample_scene(rng, kind).caption
            if cap not in avoid and not world.is_compositional_holdout(cap):
                out.append((kind, cap))
                got += 1
        else:
            raise RuntimeError(f"could not draw {n_per_kind} {kind} validation prompts")
    return out


def _compositional_prompts(n_per_kind: int, seed: int) -> list[tuple[str, str]]:
    rngs = [np.random.default_rng((seed, j)) for j in range(len(world.KINDS))]  # a stream per kind, as validation
    held = world.HELD_OUT_COLOR_SHAPES
    all_pairs = [(c, s) for c in world.COLORS for s in world.SHAPES]

    def pick(rng: np.random.Generator, options: Sequence):
        return options[rng.integers(len(options))]

    single, relation, count = (rngs[world.KINDS.index(k)] for k in ("single", "relation", "count"))
    out = []
    for _ in range(n_per_kind):
        (c, s), size = pick(single, held), (pick(single, world.SIZES) + " " if single.random() < 0.5 else "")
        out.append(("single", f"a {size}{c} {s}"))
    for i in range(n_per_kind):
        rel = pick(relation, world.RELATIONS)
        if i % 2 == 0:  # a held-out ordered (subject, object) pair
            a, b = pick(relation, world.HELD_OUT_RELATION_PAIRS)
        else:  # a held-out color-shape pair as subject or object; the other object any other pair
            a = pick(relation, held)
            b = pick(relation, [p for p in all_pairs if p != a])
            if relation.random() < 0.5:
                a, b = b, a
        out.append(("relation", f"a {a[0]} {a[1]} {rel} a {b[0]} {b[1]}"))
    for _ in range(n_per_kind):
        c, s = pick(count, held)
        out.append(("count", f"{pick(count, tuple(world.NUMBERS))} {c} {s}s"))
    return out


def eval_prompts(split: Split = "test", n_per_kind: int = 100, seed: int | None = None) -> list[tuple[str, str]]:
    """The `(kind, caption)` prompts of an evaluation split, n per kind, kinds in `world.KINDS` order.

    test: `held_out_prompts(n_per_kind, EVAL_SEED)`, exactly the committed readings' prompts.
    validation: scenes drawn with `EVAL_SEEDS["validation"]`, dropping (redrawing) every caption of the
        test split (read at `TEST_N_PER_KIND`) and of the compositional split. The grammar is small for
        single (54 captions) and count (36), and the test prompts use most of them, so validation single
        and count prompts repeat the few captions left (13 single ones, all with a size word, 12 when the
        compositional one is dropped; 4 count ones), each time with its own noise seed; relation
        prompts (1 224 captions) are nearly all distinct.
    compositional: captions with held-out combinations (`world.compositional_holdout`): single and count
        with a held-out color-shape pair; relation alternating a held-out ordered pair (even i) and a
        held-out color-shape pair as subject or object (odd i). Captions repeat (6 single, 4 count).

    Args:
        split: "test", "validation" or "compositional".
        n_per_kind: prompts per kind.
        seed: the prompt generator's seed; None: `EVAL_SEEDS[split]`.

    Returns:
        `[(kind, caption)]` of length 3 * n_per_kind; generate prompt i with seed `NOISE_SEEDS[split] + i`.

    Example:
        >>> val = eval_prompts("validation", 50)
        >>> {c for _, c in val} & {c for _, c in eval_prompts("test", 100)}   # set()
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if n_per_kind < 0 or 3 * n_per_kind > NOISE_RANGE:
        raise ValueError(f"n_per_kind must be in 0..{NOISE_RANGE // 3} (disjoint noise-seed ranges)")
    seed = EVAL_SEEDS[split] if seed is None else seed
    if split == "test":
        return held_out_prompts(n_per_kind, seed)
    if split == "validation":
        return _validation_prompts(n_per_kind, seed)
    return _compositional_prompts(n_per_kind, seed)


def score_generations(images: Sequence[Image.Image], captions: Sequence[str], strict: bool = False) -> list[dict]:
    """The scene checker's verdict for each (image, caption); `strict`: the checker's strict mode (docs/checker.md)."""
    return [check(img, cap, strict=strict) for img, cap in zip(images, captions)]


def _rate(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _outcomes(kinds: Sequence[str], verdicts: Sequence[dict]) -> dict:
    """`failure_breakdown`'s structure with the per-prompt outcomes `[prompts]` (bools) at the leaves."""
    by = {k: [d for kk, d in zip(kinds, verdicts) if kk == k] for k in world.KINDS}
    rel = by.get("relation", [])
    cnt = by.get("count", [])
    return {
        "single": {"one_object": [len(d["detections"]) == 1 for d in by.get("single", [])]},
        "relation": {"two_objects": [len(d["detections"]) == 2 for d in rel],
                     "objects_ok": [d["objects_ok"] for d in rel],
                     "relation_ok": [d["relation_ok"] for d in rel],
                     "relation_ok_given_objects": [d["relation_ok"] for d in rel if d["objects_ok"]]},
        "count": {"count_ok": [d["count_ok"] for d in cnt],
                  "attributes_ok_given_count": [d["found"] == len(d["detections"]) for d in cnt if d["count_ok"]],
                  "too_few": [len(d["detections"]) < d["asked"] for d in cnt],
                  "too_many": [len(d["detections"]) > d["asked"] for d in cnt],
                  "count_ok_by_number": {str(n): [d["count_ok"] for d in cnt if d["asked"] == n]
                                         for n in sorted({d["asked"] for d in cnt})}},
    }


def _map_leaves(tree: dict, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def failure_breakdown(kinds: Sequence[str], verdicts: Sequence[dict]) -> dict:
    """Where generations fail, per kind (fractions of that kind's prompts unless named "_given_"):

    single: one_object (exactly one detection). relation: two_objects (exactly two detections), objects_ok
    (both phrases drawn), relation_ok, relation_ok_given_objects (placement right when both objects are).
    count: count_ok (right number of objects), attributes_ok_given_count (all of the caption's color and
    shape when the number is right), too_few / too_many (objects drawn against the number asked), and
    count_ok_by_number (count_ok per number asked, e.g. {"2": .., "3": ..}).
    """
    return _map_leaves(_outcomes(kinds, verdicts), _rate)


def summarize(kinds: Sequence[str], verdicts: Sequence[dict]) -> dict:
    """Fraction correct per kind, n, the failure breakdown and every rate's interval.

    Returns:
        {"n", kind: rate (None without prompts), f"n_{kind}", "details" (`failure_breakdown`),
         "intervals": {kind: `interp.stats.rate` dict ({"rate", "k", "n", "ci95": Wilson 95 %}),
                       "details": the breakdown's structure with such a dict for each rate}}.
    """
    res: dict = {"n": len(verdicts)}
    intervals: dict = {}
    for k in world.KINDS:
        v = [d["correct"] for kk, d in zip(kinds, verdicts) if kk == k]
        res[k] = float(np.mean(v)) if v else None
        res[f"n_{k}"] = len(v)
        intervals[k] = stats.rate(v)
    outcomes = _outcomes(kinds, verdicts)
    res["details"] = _map_leaves(outcomes, _rate)
    intervals["details"] = _map_leaves(outcomes, stats.rate)
    res["intervals"] = intervals
    return res


def evaluate_generation(pipe, n_per_kind: int = 100, steps: int | None = None, guidance: float | None = None,
                        seed: int | None = None, prompt_seed: int | None = None, return_images: bool = False,
                        kinds: Sequence[str] | None = None, split: Split = "test") -> dict:
    """Generate each prompt of a split once (prompt i with seed `seed` + i) and judge it with the scene checker.

    `kinds` keeps only those kinds' prompts; each keeps the seed it has in the full evaluation.

    Args:
        pipe: a StableDiffusionPipeline.
        n_per_kind: prompts per kind (`eval_prompts`).
        steps: denoising steps; None: the model's default (25 without one).
        guidance: classifier-free guidance scale; None: the model's default (7.5 without one).
        seed: noise seed of prompt 0; None: `NOISE_SEEDS[split]` (test: 1234, the committed readings').
        prompt_seed: the prompts' seed; None: `EVAL_SEEDS[split]`.
        return_images: add "images", "captions" and "verdicts".
        kinds: the kinds to evaluate (default all).
        split: "test", "validation" or "compositional" (docs/protocol.md).

    Returns:
        `summarize`'s dict (per-kind rates, n, details, intervals) with "steps", "guidance", "seed",
        "prompt_seed" and "split"; "strict": the same summary judged by the checker's strict mode.

    Example:
        >>> res = evaluate_generation(pipe, n_per_kind=50, split="validation", kinds=("count",))
        >>> res["count"], res["intervals"]["count"]["ci95"]
    """
    seed = NOISE_SEEDS[split] if seed is None else seed
    prompt_seed = EVAL_SEEDS[split] if prompt_seed is None else prompt_seed
    pairs = [(i, k, c) for i, (k, c) in enumerate(eval_prompts(split, n_per_kind, prompt_seed))
             if kinds is None or k in kinds]
    prompt_kinds, caps = [k for _, k, _ in pairs], [c for _, _, c in pairs]
    imgs = generate_images(pipe, caps, [seed + i for i, _, _ in pairs], steps=steps, guidance=guidance)
    verdicts = score_generations(imgs, caps)
    d = pipe.discolens_defaults if hasattr(pipe, "discolens_defaults") else None
    res = summarize(prompt_kinds, verdicts)
    res["strict"] = summarize(prompt_kinds, score_generations(imgs, caps, strict=True))
    res.update({"steps": steps or (d.steps if d else 25), "guidance": guidance if guidance is not None else (d.guidance if d else 7.5),
                "seed": seed, "prompt_seed": prompt_seed, "split": split})
    if return_images:
        res["images"] = imgs
        res["captions"] = caps
        res["verdicts"] = verdicts
    return res
