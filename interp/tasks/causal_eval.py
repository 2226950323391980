"""A causal test of the word maps: suppress one word's cross-attention and see what the model draws.

For held-out relation and single-object prompts (`interp.tasks.generation_eval.held_out_prompts` with
`CAUSAL_SEED`, a seed neither training nor the other evaluations use) each prompt is generated once with
a fixed seed (the baseline). Where the scene checker (`models.shapes.checker.check`) finds the caption's
objects in the baseline (single: `correct`; relation: `objects_ok`, both phrases distinct), every color
and shape word is edited in turn, with the same seed, by `models.interventions.intervene`:

* "global": scale 0 on the word's column at every step and every cross-attention layer;
* "box": the same, but only at image positions inside the word's object as the baseline shows it (its
  detected box grown by `BOX_MARGIN` of the image on each side).

Judging (`judge_edit`): the baseline's detections are matched to the edited image's by centre distance
(optimal assignment, at most `MATCH_RADIUS` of the image width apart). The edited word's object is then
"unchanged", "recolored", "reshaped", "replaced" (both, in place), "moved" (not in place, but an
unmatched detection of its color and shape exists), "replaced_elsewhere" or "gone". The other objects
are "kept" when matched with the same color and shape. An edit "changes the word's object and only it"
(`only`) when the object is not unchanged, every other object is kept and no further object appears.
`specific`: a color word's object changed color or vanished / a shape word's object changed shape or
vanished.

Baselines and edits run under the same explicit attention maths (`capture_cross_attention` with a no-op
sink), in fixed-size batches with one seeded generator per row, so an unedited row is bit-identical to
its baseline.

Example:
    >>> res = evaluate_interventions(load_pipeline(), n_prompts=20)
    >>> res["summary"]["global"]["only"]        # {"k": .., "n": .., "rate": .., "ci95": [lo, hi]}
    >>> compare_models(res, evaluate_interventions(load_pipeline("shapes-v1-plain"), 20))["global"]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from scipy.optimize import linear_sum_assignment

from models import load_pipeline
from models.attention_capture import capture_cross_attention
from models.interventions import AttentionEdit, intervene, word_columns
from models.shapes import world
from models.shapes.checker import check

from interp.stats import mcnemar, wilson_interval
from interp.tasks.generation_eval import held_out_prompts

__all__ = ["CAUSAL_SEED", "EditCase", "plan_edits", "judge_edit", "evaluate_interventions", "summarize_cases",
           "compare_models", "run_causal_maps"]

CAUSAL_SEED = 40_001  # held-out prompts for this test; training uses 0, generation_eval 10_007
KINDS = ("single", "relation")
VARIANTS = ("global", "box")
MATCH_RADIUS = 0.125  # of the image width: farther apart, a baseline object and a detection do not match
BOX_MARGIN = 2 / 64  # of the image: the box edit covers the detected box grown by this on each side


@dataclasses.dataclass(frozen=True)
class EditCase:
    """One planned edit: which prompt, which word (and its object), which variant.

    Attributes:
        prompt: index of the prompt in the evaluation's prompt list (its seed is `seed + prompt`).
        kind: "single" | "relation".
        caption: the prompt.
        word: index of the edited word in `caption.split()`.
        role: "color" | "shape".
        target: index of the word's object among the baseline's detections.
        variant: "global" | "box".
        box: (x0, y0, x1, y1) in image fractions for "box", else None.
    """

    prompt: int
    kind: str
    caption: str
    word: int
    role: str
    target: int
    variant: str
    box: tuple[float, float, float, float] | None = None

    @property
    def key(self) -> str:
        """Identifies the same edit across models: prompt, word, variant."""
        return f"{self.prompt}:{self.word}:{self.variant}"


def _phrase_targets(verdict: dict, caption: str) -> list[int] | None:
    """Detection index of each phrase of a correctly drawn caption, or None (wrong / ambiguous baseline)."""
    parsed = world.parse_caption(caption)
    dets = verdict["detections"]
    if parsed.kind == "single":
        return [0] if verdict["correct"] else None
    if parsed.kind != "relation" or not verdict["objects_ok"]:
        return None
    ps, po = parsed.phrases
    if (ps.color, ps.shape) == (po.color, po.shape):
        return None  # both phrases alike: which object is whose cannot be told
    out = []
    for ph in (ps, po):
        hit = [i for i, d in enumerate(dets) if d["color"] == ph.color and d["shape"] == ph.shape]
        if len(hit) != 1:
            return None
        out.append(hit[0])
    return out


def _grown_box(det: dict, width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = det["box"]
    return (max(0.0, x0 / width - BOX_MARGIN), max(0.0, y0 / height - BOX_MARGIN),
            min(1.0, x1 / width + BOX_MARGIN), min(1.0, y1 / height + BOX_MARGIN))


def plan_edits(captions: Sequence[str], kinds: Sequence[str], verdicts: Sequence[dict],
               image_size: tuple[int, int], variants: Sequence[str] = VARIANTS) -> list[EditCase]:
    """Edits of every color and shape word of each correctly drawn baseline.

    Args:
        captions / kinds / verdicts: the prompts, their kinds and the checker's verdicts on the baselines.
        image_size: (width, height) of the baselines, to turn detection boxes into image fractions.
        variants: "global" and / or "box".
    Returns:
        the cases, in prompt order, then word order, then variant order.
    """
    out = []
    for i, (cap, kind, v) in enumerate(zip(captions, kinds, verdicts)):
        targets = _phrase_targets(v, cap)
        if targets is None:
            continue
        words = cap.split()
        for ph, t in zip(world.parse_caption(cap).phrases, targets):
            for wi in ph.word_idx:
                role = "color" if words[wi] == ph.color else "shape" if words[wi] == ph.shape else None
                if role is None:
                    continue  # size words are not edited
                for var in variants:
                    box = _grown_box(v["detections"][t], *image_size) if var == "box" else None
                    out.append(EditCase(i, kind, cap, wi, role, t, var, box))
    return out


def _match(base: Sequence[dict], edited: Sequence[dict], radius: float) -> dict[int, int]:
    """Baseline index -> edited index, optimal by centre distance, pairs farther than `radius` dropped."""
    if not base or not edited:
        return {}
    c = np.array([[np.hypot(b["center"][0] - e["center"][0], b["center"][1] - e["center"][1]) for e in edited]
                  for b in base])
    rows, cols = linear_sum_assignment(c)
    return {int(r): int(k) for r, k in zip(rows, cols) if c[r, k] <= radius}


def judge_edit(base: Sequence[dict], edited: Sequence[dict], target: int, role: str, width: int = 64) -> dict:
    """What an edit did to the word's object and to the others (see the module docstring).

    Args:
        base / edited: the checker's detections (dicts with color, shape, center) before / after.
        target: index of the edited word's object in `base`.
        role: "color" | "shape" (the edited word).
        width: image width in pixels (the match radius scales with it).
    Returns:
        {"status", "others_kept", "extra", "changed", "only", "specific"}.
    """
    m = _match(base, edited, MATCH_RADIUS * width)
    tb = base[target]
    unmatched = [j for j in range(len(edited)) if j not in m.values()]
    if target in m:
        te = edited[m[target]]
        dc, ds = te["color"] != tb["color"], te["shape"] != tb["shape"]
        status = "replaced" if dc and ds else "recolored" if dc else "reshaped" if ds else "unchanged"
        accounted = 0
    elif any(edited[j]["color"] == tb["color"] and edited[j]["shape"] == tb["shape"] for j in unmatched):
        status, accounted = "moved", 1
    elif unmatched:
        status, accounted = "replaced_elsewhere", 1
    else:
        status, accounted = "gone", 0
    others_kept = all(i in m and edited[m[i]]["color"] == b["color"] and edited[m[i]]["shape"] == b["shape"]
                      for i, b in enumerate(base) if i != target)
    extra = len(unmatched) - accounted
    changed = status != "unchanged"
    if role == "color":
        specific = status in ("recolored", "replaced", "gone")
    else:
        specific = status in ("reshaped", "replaced", "gone")
    return {"status": status, "others_kept": bool(others_kept), "extra": int(extra), "changed": changed,
            "only": bool(changed and others_kept and extra == 0), "specific": bool(specific)}


def _generate(pipe, captions: Sequence[str], seeds: Sequence[int], edits: Sequence[AttentionEdit | None],
              steps: int, guidance: float, batch_size: int) -> list[Image.Image]:
    """One image per caption (generator seeded per row); row i edited by edits[i] (None: unedited).

    Every batch has exactly `batch_size` rows (the last is padded with copies of its last row), so a row's
    result never depends on how many rows share its batch.
    """
    out: list[Image.Image] = []
    for s in range(0, len(captions), batch_size):
        idx = list(range(s, min(s + batch_size, len(captions))))
        pad = idx + [idx[-1]] * (batch_size - len(idx))
        row_edits = [dataclasses.replace(edits[i], prompts=(r,)) for r, i in enumerate(pad) if edits[i] is not None]
        gens = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in pad]
        with intervene(pipe, row_edits):
            res = pipe([captions[i] for i in pad], num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens)
        out.extend(res.images[: len(idx)])
    return out


def _rate(k: int, n: int) -> dict:
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None,
            "ci95": list(wilson_interval(k, n)) if n else None}


def summarize_cases(cases: Sequence[dict]) -> dict:
    """Per variant (and per variant x kind / role): rates of `only`, `changed`, `specific`, others kept,
    with Wilson 95% intervals, and the counts of each target status."""
    out: dict = {}
    for var in sorted({c["variant"] for c in cases}):
        sub = [c for c in cases if c["variant"] == var]

        def block(rows):
            return {"only": _rate(sum(r["only"] for r in rows), len(rows)),
                    "changed": _rate(sum(r["changed"] for r in rows), len(rows)),
                    "specific": _rate(sum(r["specific"] for r in rows), len(rows)),
                    "others_kept": _rate(sum(r["others_kept"] for r in rows if r["kind"] == "relation"),
                                         sum(r["kind"] == "relation" for r in rows)),
                    "status": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}}

        out[var] = block(sub)
        out[var]["by_kind"] = {k: block([c for c in sub if c["kind"] == k]) for k in KINDS
                               if any(c["kind"] == k for c in sub)}
        out[var]["by_role"] = {r: block([c for c in sub if c["role"] == r]) for r in ("color", "shape")
                               if any(c["role"] == r for c in sub)}
    return out


def evaluate_interventions(pipe, n_prompts: int = 50, steps: int | None = None, guidance: float | None = None,
                           seed: int = 0, prompt_seed: int = CAUSAL_SEED, kinds: Sequence[str] = KINDS,
                           variants: Sequence[str] = VARIANTS, batch_size: int = 16,
                           return_images: bool = False) -> dict:
    """Suppress each color / shape word of held-out prompts and judge the change with the scene checker.

    Args:
        pipe: a StableDiffusionPipeline of the shapes world (e.g. `load_pipeline("shapes-v1")`).
        n_prompts: prompts per kind (`held_out_prompts(n_prompts, prompt_seed)`, kinds kept: `kinds`).
        steps / guidance: default to the model's (`pipe.discolens_defaults`), else 25 / 3.0.
        seed: prompt i (in the full held-out list) is generated with seed `seed + i`, baseline and edits.
        variants: "global" (scale 0 on the word everywhere) and / or "box" (inside its object's box).
        batch_size: rows per pipeline call (fixed; see `_generate`).
        return_images: also return "baseline_images" and "edited_images" (PIL, in case order).
    Returns:
        {"settings", "baselines": [{prompt, kind, caption, seed, correct, detections}], "cases": [one dict per
        edit: EditCase fields, key, the `judge_edit` fields, edited detections], "summary": `summarize_cases`,
        "n_baselines", "n_baselines_usable", "seconds"}.
    """
    t0 = time.time()
    d = getattr(pipe, "discolens_defaults", None)
    steps = steps or (d.steps if d else 25)
    guidance = guidance if guidance is not None else (d.guidance if d else 3.0)
    prompts = [(i, k, c) for i, (k, c) in enumerate(held_out_prompts(n_prompts, prompt_seed)) if k in kinds]
    caps, pk = [c for _, _, c in prompts], [k for _, k, _ in prompts]
    seeds = [seed + i for i, _, _ in prompts]
    with capture_cross_attention(pipe.unet, lambda *a, **kw: None):  # one attention maths for all runs
        base = _generate(pipe, caps, seeds, [None] * len(caps), steps, guidance, batch_size)
        verdicts = [check(img, c) for img, c in zip(base, caps)]
        size = base[0].size if base else (64, 64)
        plan = plan_edits(caps, pk, verdicts, size, variants)
        edits = [AttentionEdit(tokens=tuple(word_columns(pipe.tokenizer, e.caption, e.word)), scale=0.0, box=e.box)
                 for e in plan]
        edited = _generate(pipe, [e.caption for e in plan], [seeds[e.prompt] for e in plan], edits, steps,
                           guidance, batch_size)
    cases = []
    for e, img in zip(plan, edited):
        dets = check(img, e.caption)["detections"]
        j = judge_edit(verdicts[e.prompt]["detections"], dets, e.target, e.role, img.size[0])
        cases.append({**dataclasses.asdict(e), "key": e.key, "word_text": e.caption.split()[e.word], **j,
                      "edited_detections": dets})
    res = {
        "settings": {"n_prompts_per_kind": n_prompts, "kinds": list(kinds), "variants": list(variants),
                     "steps": steps, "guidance": guidance, "seed": seed, "prompt_seed": prompt_seed,
                     "batch_size": batch_size, "match_radius": MATCH_RADIUS, "box_margin": BOX_MARGIN},
        "baselines": [{"prompt": i, "kind": k, "caption": c, "seed": s, "correct": v["correct"],
                       "detections": v["detections"]} for (i, k, c), s, v in zip(prompts, seeds, verdicts)],
        "n_baselines": len(caps),
        "n_baselines_usable": len({e.prompt for e in plan}),
        "cases": cases,
        "summary": summarize_cases(cases),
        "seconds": time.time() - t0,
    }
    if return_images:
        res["baseline_images"], res["edited_images"] = base, edited
    return res


def compare_models(a: dict, b: dict, field: str = "only") -> dict:
    """Paired comparison of two models on the same edits (same prompt, word and variant, both baselines usable).

    Per variant: n pairs, each model's rate with its Wilson interval, the discordant counts (a only / b only)
    and McNemar's exact p-value (two-sided binomial test of the discordant pairs against 1/2).
    """
    out = {}
    for var in sorted({c["variant"] for c in a["cases"]} & {c["variant"] for c in b["cases"]}):
        ca = {c["key"]: c[field] for c in a["cases"] if c["variant"] == var}
        cb = {c["key"]: c[field] for c in b["cases"] if c["variant"] == var}
        keys = sorted(set(ca) & set(cb))
        ka, kb = sum(ca[k] for k in keys), sum(cb[k] for k in keys)
        m = mcnemar([bool(ca[k]) for k in keys], [bool(cb[k]) for k in keys])
        out[var] = {"field": field, "n_pairs": len(keys), "a": _rate(ka, len(keys)), "b": _rate(kb, len(keys)),
                    "a_only": m["a_only"], "b_only": m["b_only"], "mcnemar_p": m["p"]}
    return out


def run_causal_maps(models: Sequence[str], n: int, out: Path, seed: int = 0, batch_size: int = 16,
                    command: str = "") -> dict:
    """Evaluate the edits on each model, write `<model>.json` and `summary.json` under `out`, return the summary
    (with the paired comparison when two models are given)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in models:
        res = evaluate_interventions(load_pipeline(name, device="cpu"), n, seed=seed, batch_size=batch_size)
        results[name] = res
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        print(name, f"{res['seconds']:.0f}s", json.dumps({v: res["summary"][v]["only"] for v in res["summary"]}),
              file=sys.stderr, flush=True)
    summary = {"command": command,
               "models": {m: {"n_baselines": r["n_baselines"], "n_baselines_usable": r["n_baselines_usable"],
                              "seconds": r["seconds"], "summary": r["summary"]} for m, r in results.items()}}
    if len(models) == 2:
        a, b = models
        summary["paired"] = {f: compare_models(results[a], results[b], f) for f in ("only", "changed", "specific")}
        summary["paired_models"] = [a, b]
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m interp.tasks.causal_eval --models shapes-v1 shapes-v1-plain --n 50 --out DIR`
    (also `python cli.py causal-maps ...`)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["shapes-v1", "shapes-v1-plain"])
    ap.add_argument("--n", type=int, default=50, help="prompts per kind (single, relation)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    cmd = "python -m interp.tasks.causal_eval " + " ".join(sys.argv[1:] if argv is None else argv)
    summary = run_causal_maps(args.models, args.n, args.out, args.seed, args.batch_size, cmd)
    print(json.dumps(summary.get("paired", {}), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
