"""Generation quality on the shapes world: held-out prompts, generations judged by the scene checker.

Example:
    >>> res = evaluate_generation(load_pipeline(), n_per_kind=100)
    >>> res["single"], res["relation"], res["count"], res["n"]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from models.shapes import world

EVAL_SEED = 10_007  # the training data uses seed 0; held-out prompts and layouts come from this seed


def held_out_prompts(n_per_kind: int = 100, seed: int = EVAL_SEED) -> list[tuple[str, str]]:
    """`(kind, caption)` pairs, n per kind, drawn with a seed the training data never uses."""
    rng = np.random.default_rng(seed)
    out = []
    for kind in world.KINDS:
        for _ in range(n_per_kind):
            out.append((kind, world.sample_scene(rng, kind).caption))
    return out


def score_generations(images: Sequence[Image.Image], captions: Sequence[str]) -> list[dict]:
    """The scene checker's verdict for each (image, caption)."""
    from models.shapes.checker import check

    return [check(img, cap) for img, cap in zip(images, captions)]


def _rate(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def failure_breakdown(kinds: Sequence[str], verdicts: Sequence[dict]) -> dict:
    """Where generations fail, per kind (fractions of that kind's prompts unless named "_given_"):

    single: one_object (exactly one detection). relation: two_objects (exactly two detections), objects_ok
    (both phrases drawn), relation_ok, relation_ok_given_objects (placement right when both objects are).
    count: count_ok (right number of objects), attributes_ok_given_count (all of the caption's color and
    shape when the number is right), too_few / too_many (objects drawn against the number asked), and
    count_ok_by_number (count_ok per number asked, e.g. {"2": .., "3": ..}).
    """
    by = {k: [d for kk, d in zip(kinds, verdicts) if kk == k] for k in world.KINDS}
    rel = by.get("relation", [])
    cnt = by.get("count", [])
    return {
        "single": {"one_object": _rate(len(d["detections"]) == 1 for d in by.get("single", []))},
        "relation": {"two_objects": _rate(len(d["detections"]) == 2 for d in rel),
                     "objects_ok": _rate(d["objects_ok"] for d in rel),
                     "relation_ok": _rate(d["relation_ok"] for d in rel),
                     "relation_ok_given_objects": _rate(d["relation_ok"] for d in rel if d["objects_ok"])},
        "count": {"count_ok": _rate(d["count_ok"] for d in cnt),
                  "attributes_ok_given_count": _rate(d["found"] == len(d["detections"]) for d in cnt if d["count_ok"]),
                  "too_few": _rate(len(d["detections"]) < d["asked"] for d in cnt),
                  "too_many": _rate(len(d["detections"]) > d["asked"] for d in cnt),
                  "count_ok_by_number": {str(n): _rate(d["count_ok"] for d in cnt if d["asked"] == n)
                                         for n in sorted({d["asked"] for d in cnt})}},
    }


def summarize(kinds: Sequence[str], verdicts: Sequence[dict]) -> dict:
    """Fraction correct per kind, n, and the failure breakdown (`failure_breakdown`) under "details"."""
    res: dict = {"n": len(verdicts)}
    for k in world.KINDS:
        v = [d["correct"] for kk, d in zip(kinds, verdicts) if kk == k]
        res[k] = float(np.mean(v)) if v else None
        res[f"n_{k}"] = len(v)
    res["details"] = failure_breakdown(kinds, verdicts)
    return res


def evaluate_generation(pipe, n_per_kind: int = 100, steps: int | None = None, guidance: float | None = None,
                        seed: int = 0, prompt_seed: int = EVAL_SEED, return_images: bool = False,
                        kinds: Sequence[str] | None = None) -> dict:
    """Generate each held-out prompt once (seed = `seed` + i) and judge it with the scene checker.

    `kinds` keeps only those kinds' prompts; each keeps the seed it has in the full evaluation.
    """
    from models.sampling import generate_images

    pairs = [(i, k, c) for i, (k, c) in enumerate(held_out_prompts(n_per_kind, prompt_seed))
             if kinds is None or k in kinds]
    prompt_kinds, caps = [k for _, k, _ in pairs], [c for _, _, c in pairs]
    imgs = generate_images(pipe, caps, [seed + i for i, _, _ in pairs], steps=steps, guidance=guidance)
    verdicts = score_generations(imgs, caps)
    d = pipe.discolens_defaults if hasattr(pipe, "discolens_defaults") else None
    res = summarize(prompt_kinds, verdicts)
    res.update({"steps": steps or (d.steps if d else 25), "guidance": guidance if guidance is not None else (d.guidance if d else 7.5),
                "seed": seed, "prompt_seed": prompt_seed})
    if return_images:
        res["images"] = imgs
        res["captions"] = caps
        res["verdicts"] = verdicts
    return res
