"""Where the model is wrong, item by item: matching failures of a scorer on a benchmark, and generations the scene
checker rejects, each with its reason (the app's Failures tab).

Example:
    >>> res = matching_failures(pipe, load_benchmark("comvg"), MatchOptions(timesteps=(300,)), "auto", limit=20)
    >>> res["failures"][0]["true_caption"], res["failures"][0]["wrong_caption"], res["failures"][0]["category"]
    >>> gen = generation_failures(pipe, n_per_kind=5)
    >>> gen["failures"][0]["reason"]                 # e.g. "3 objects drawn, 2 asked"
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from models.shapes.benchmarks import Benchmark

from interp.scorers import MatchOptions, Scorer
from interp.tasks.generation_eval import evaluate_generation
from interp.tasks.matching_eval import evaluate_matching

__all__ = ["matching_failures", "generation_failures", "failure_reason", "CATEGORY"]

# benchmark item type -> what the wrong caption changes (the Failures table's "category")
CATEGORY = {
    "swap_attributes": "attribute (swapped between objects)", "swap_roles": "role (objects swapped)",
    "flip_relation": "relation word", "subject": "role: the subject changed", "object": "role: the object changed",
    "predicate": "relation word", "change_count": "count", "change_color": "attribute: colour",
    "single": "refer: single object", "relation": "refer: relation scene", "count": "refer: count scene",
}


def _failed_rows(family: str, M: np.ndarray, answers: Sequence[int]) -> list[tuple[int, int, int]]:
    """(image, true caption, best wrong caption) per image whose true caption does not strictly win."""
    out = []
    for i, a in enumerate(answers):
        others = [c for c in range(M.shape[1]) if c != a]
        best = max(others, key=lambda c: M[i, c])
        if M[i, best] >= M[i, a]:
            out.append((i, a, best))
    if family == "group" and not out:  # text right, image wrong: the other image scores the caption higher
        for i, a in enumerate(answers):
            for j in range(M.shape[0]):
                if j != i and M[j, a] >= M[i, a]:
                    out.append((i, a, answers[j]))
                    break
    return out


def matching_failures(pipe, bench: Benchmark, options: MatchOptions, scorer: Scorer | str, split: str = "test",
                      limit: int | None = None) -> dict:
    """The benchmark items a scorer gets wrong.

    Returns:
        {"benchmark", "split", "scorer", "n_items", "metrics", "unet_evals", "failures": [{"id", "type", "category",
         "image_path", "true_caption", "wrong_caption", "true_score", "wrong_score", "captions", "scores"}]}
        (`scores`: the image's row of the item's score table, in `captions` order).
    """
    res = evaluate_matching(pipe, bench, options, split=split, limit=limit, scorer=scorer, per_item=True)
    items = {it.id: it for it in bench.items}
    fails = []
    for r in res["items"]:
        it = items[r["id"]]
        M = np.asarray(r["scores"], dtype=np.float64)
        for i, a, c in _failed_rows(res["family"], M, it.answers):
            fails.append({"id": it.id, "type": it.type, "category": CATEGORY.get(it.type, it.type),
                          "image_path": str(it.folder / it.images[i]), "true_caption": it.captions[a],
                          "wrong_caption": it.captions[c], "true_score": float(M[i, a]),
                          "wrong_score": float(M[i, c]), "captions": list(it.captions),
                          "scores": [float(v) for v in M[i]]})
    return {"benchmark": res["benchmark"], "split": res["split"], "scorer": res["scorer"], "n_items": res["n_items"],
            "metrics": res["metrics"], "unet_evals": res["unet_evals"], "failures": fails}


def _det(d: dict) -> str:
    return f"{d.get('color', '?')} {d.get('shape', '?')}"


def failure_reason(verdict: dict) -> str:
    """The scene checker's verdict in a few words (why a generation was rejected)."""
    dets = verdict.get("detections", [])
    kind, n = verdict.get("kind"), len(dets)
    drew = ", ".join(_det(d) for d in dets) or "nothing"
    if kind == "single":
        return f"{n} objects drawn, 1 asked ({drew})" if n != 1 else f"wrong colour or shape: drew a {drew}"
    if kind == "relation":
        if n != 2:
            return f"{n} objects drawn, 2 asked ({drew})"
        if not verdict.get("objects_ok"):
            return f"wrong colour or shape: drew {drew}"
        return "objects right, wrong place (the relation does not hold)"
    if kind == "count":
        asked = verdict.get("asked")
        if not verdict.get("count_ok"):
            return f"{'too many' if n > (asked or 0) else 'too few'}: {n} objects drawn, {asked} asked"
        return f"right number, wrong colour or shape ({verdict.get('found')} of {n} match)"
    return "rejected by the checker"


def generation_failures(pipe, n_per_kind: int = 5, split: str = "test", steps: int | None = None,
                        guidance: float | None = None) -> dict:
    """Held-out prompts whose generation the scene checker rejects, with the reason and the image.

    Returns:
        {"n", "rates": {kind: rate}, "failures": [{"index", "kind", "caption", "seed", "reason", "image"}]}.
    """
    res = evaluate_generation(pipe, n_per_kind=n_per_kind, split=split, steps=steps, guidance=guidance,
                              return_images=True)
    kinds = [v["kind"] for v in res["verdicts"]]
    fails = [{"index": i, "kind": k, "caption": c, "seed": res["seed"] + i, "reason": failure_reason(v), "image": img}
             for i, (k, c, v, img) in enumerate(zip(kinds, res["captions"], res["verdicts"], res["images"]))
             if not v["correct"]]
    return {"n": res["n"], "rates": {k: res[k] for k in ("single", "relation", "count")}, "split": split,
            "failures": fails}
