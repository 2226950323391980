"""Faithfulness of attention on held-out renders: one noised, traced UNet call per timestep per scene,
every map scored against the world's exact masks (`interp.grounding`).

Example:
    >>> res = evaluate_grounding(load_pipeline(), n_scenes=60, timesteps=(300,))
    >>> res["aggregates"]["mean"]["color"]["pointing"]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from models.shapes import world
from models.shapes.checker import check
from models.trace import trace
from models.unet_pass import encode_image, noised_unet_pass

from interp import stats
from interp.grounding import aggregate_maps, grounding_table, rank_slices, score_maps, summarize
from interp.tasks.generation_eval import EVAL_SEEDS, held_out_prompts

GROUNDING_SEED = EVAL_SEEDS["grounding_scenes"]  # held-out renders (the training data uses seed 0)
GROUNDING_PROMPT_SEED = EVAL_SEEDS["grounding_prompts"]  # prompts of `evaluate_generation_grounding`
DEFAULT_TIMESTEPS = (100, 300, 500, 700)


def held_out_scenes(n: int, seed: int = GROUNDING_SEED, kinds: Sequence[str] = world.KINDS) -> list[world.Scene]:
    """n scenes cycling over the kinds, drawn with a seed the training data never uses."""
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng, kinds[i % len(kinds)]) for i in range(n)]


def _summ(rows: list[dict]) -> dict:
    by_class = summarize(rows, by=("word_class",))
    return {str(k): v for k, v in by_class.items()}


def pointing_intervals(rows: Sequence[dict]) -> dict:
    """Per word class, the pointing rate as an `interp.stats.rate` dict ({"rate", "k", "n", "ci95"}).

    Meant for rows with one map per (scene, word), as the aggregates have: the Wilson interval treats the
    rows as independent (words of one scene are not quite), so it does not fit tables that pool many
    layers, heads and steps of the same word.
    """
    classes: dict = {}
    for r in rows:
        classes.setdefault(str(r["word_class"]), []).append(bool(r["pointing"]))
    return {c: stats.rate(v) for c, v in classes.items()}


def evaluate_grounding(pipe, n_scenes: int = 60, timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
                       seed: int = GROUNDING_SEED, noise_seed: int = 0, calibration_share: float = 0.5,
                       return_rows: bool = False) -> dict:
    """Grounding metrics on held-out renders.

    The first `calibration_share` of the scenes picks the best layer and head ("best_layer",
    "best_head", "weighted" aggregates); every aggregate is then scored on the remaining scenes so the
    choice is not scored on the data it was chosen on. The per-slice tables use all scenes.

    Returns:
        {"n_scenes", "timesteps", "by_class" (all slices pooled), "by_layer", "by_head", "by_step"
         (each {group: {word_class: metrics}}), "aggregates" ({name: {word_class: metrics}}, on the
         held-out half), "aggregates_ci95" ({name: {word_class: {"pointing": `interp.stats.rate` dict}}}:
         n maps, k pointing hits, Wilson 95 %), "best_layer", "best_head", "unet_evals", and "rows" (every
         slice's metrics) when `return_rows`}. The pooled slice tables get no interval: their rows are
        many layers, heads and steps of the same words, not independent draws.
    """
    scenes = held_out_scenes(n_scenes, seed)
    traces, rows = [], []
    evals = 0
    for s in scenes:
        img = world.render(s)
        res = noised_unet_pass(pipe, encode_image(pipe, img), [s.caption], list(timesteps), noise_seed=noise_seed,
                               logits=False)
        evals += res.unet_evals
        tr = res.traces[0]
        traces.append(tr)
        rows.append(grounding_table(tr, s))
    n_cal = max(1, int(len(scenes) * calibration_share))
    cal_rows = [r for rs in rows[:n_cal] for r in rs]
    all_rows = [r for rs in rows for r in rs]
    ranked = rank_slices(cal_rows, by="energy")
    best_layer = ranked["layers"][0][0]
    best_head = ranked["heads"][0][0]
    weights = {k: max(v, 0.0) for k, v in ranked["heads"]}

    aggs: dict[str, list[dict]] = {k: [] for k in ("mean", "daam", "best_layer", "best_head", "weighted")}
    for s, tr in zip(scenes[n_cal:], traces[n_cal:]):
        for name in aggs:
            kw = {}
            if name == "best_layer":
                kw = {"layer": best_layer}
            elif name == "best_head":
                kw = {"layer": best_head[0], "head": best_head[1]}
            elif name == "weighted":
                kw = {"weights": weights}
            aggs[name].extend(score_maps(aggregate_maps(tr, name, **kw), tr, s))

    def grouped(key: str) -> dict:
        groups: dict = {}
        for r in all_rows:
            groups.setdefault(r[key] if key != "head" else f"{r['layer']}/h{r['head']}", []).append(r)
        return {str(g): _summ(rs) for g, rs in groups.items()}

    return {
        "n_scenes": len(scenes), "n_calibration": n_cal, "timesteps": list(timesteps),
        "by_class": _summ(all_rows), "by_layer": grouped("layer"), "by_head": grouped("head"),
        "by_step": grouped("timestep"),
        "aggregates": {k: _summ(v) for k, v in aggs.items()},
        "aggregates_ci95": {k: {c: {"pointing": r} for c, r in pointing_intervals(v).items()} for k, v in aggs.items()},
        "best_layer": best_layer, "best_head": list(best_head), "unet_evals": evals,
        **({"rows": all_rows} if return_rows else {}),
    }


def scene_from_detections(caption: str, detections: Sequence[dict]) -> world.Scene | None:
    """A scene whose objects are the checker's detections, ordered as the caption's phrases need.

    Returns None when the detections cannot be bound to the phrases unambiguously (wrong generations).
    """
    p = world.parse_caption(caption)

    def obj(d: dict) -> world.Obj:
        ext = max(d["box"][2] - d["box"][0], d["box"][3] - d["box"][1])
        return world.Obj(d["color"], d["shape"], "big" if ext > 15.5 else "small", tuple(float(v) for v in d["box"]))

    objs: list[world.Obj] = []
    for ph in p.phrases:
        hits = [d for d in detections if d["color"] == ph.color and d["shape"] == ph.shape]
        if len(hits) != ph.count:
            return None
        objs.extend(obj(d) for d in hits)
    if len(objs) != len(detections):
        return None
    return world.Scene(p.kind, tuple(objs), " ".join(p.words), p.relation, p.kind == "single" and p.phrases[0].size is not None)


def evaluate_generation_grounding(pipe, n_per_kind: int = 10, steps: int | None = None, guidance: float | None = None,
                                  seed: int = 0, prompt_seed: int = GROUNDING_PROMPT_SEED) -> dict:
    """Grounding of the model's own generations: each held-out prompt is generated with every step
    traced, the scene checker finds the objects, and the maps are scored against masks of the
    detected objects. Only generations the checker judges correct are scored (their words can be
    bound to detections). Returns {"n_prompts", "n_scored", "scored" (`interp.stats.rate` of n_scored
    out of n_prompts, with its Wilson 95 % interval), "by_class", "by_step"}."""
    d = getattr(pipe, "discolens_defaults", None)
    rows: list[dict] = []
    pairs = held_out_prompts(n_per_kind, prompt_seed)
    scored = 0
    for i, (_, cap) in enumerate(pairs):
        g = torch.Generator("cpu").manual_seed(seed + i)
        kw = {"height": d.size, "width": d.size} if d and d.size else {}
        with torch.no_grad(), trace(pipe) as tr:
            img = pipe(cap, num_inference_steps=steps or (d.steps if d else 25),
                       guidance_scale=guidance if guidance is not None else (d.guidance if d else 7.5),
                       generator=g, **kw).images[0]
        verdict = check(img, cap)
        scene = scene_from_detections(cap, verdict["detections"]) if verdict["correct"] else None
        if scene is None:
            continue
        scored += 1
        rows.extend(grounding_table(tr.trace, scene, size=img.height))
    by_step: dict = {}
    for r in rows:
        by_step.setdefault(r["timestep"], []).append(r)
    return {"n_prompts": len(pairs), "n_scored": scored, "scored": stats.rate(scored, len(pairs)), "by_class": _summ(rows) if rows else {},
            "by_step": {str(k): _summ(v) for k, v in sorted(by_step.items(), reverse=True)}}
