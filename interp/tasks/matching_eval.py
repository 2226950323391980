"""Image-text matching accuracy on the fixed shapes-world benchmarks (`models.shapes.benchmarks`).

Every image of an item is scored against all of the item's captions by a registered scorer (`interp.scorers`;
for most, ONE batched, traced UNet pass: one UNet call per timestep, the captions as batch rows, the same
noise for every caption), giving a score table `M[image][caption]` per item. The metrics only compare
entries of these tables, so they are checked with hand-made scorers independently of any model.

Metrics (a tie counts as a miss: the true entry must be strictly higher):
    winoground  text_score: every image scores its own caption above the other caption;
                image_score: every caption scores its own image above the other image;
                group_score: both. Chance 1/4, 1/4, 1/6.
    comvg       accuracy: the positive caption scores above the negative, overall and per type
                (subject / object / predicate). Chance 1/2.
    counting    accuracy, overall and per type (change_count / change_color). Chance 1/2.
    refcocog    top1 / top5: the true caption's rank among the 10 (rank = 1 + number of other captions
                scoring >= it) is 1 / at most 5; also mean_rank. Chance 1/10, 1/2.

Cost: `unet_calls` is the number of UNet forward calls (one per timestep per image); `unet_evals` the number
of sample-forwards (batch rows through the UNet, the "" row of denoise_norm included);
`unet_evals_per_pair` = unet_evals / (number of image-caption pairs scored). With S timesteps and K
captions per image: lse and denoise use S * K evals per image, i.e. exactly S per pair; denoise_norm adds
one "" row per call, S * (K + 1) per image, i.e. S * (1 + 1/K) per pair (1.5 S for the 2-caption
benchmarks, 1.1 S for refcocog's 10 captions).

Scorer: any `interp.scorers.Scorer` (a registered name through `options.scorer`, or an instance, e.g. a
hand-made one in tests); only its `ScoreResult.scores` and costs are read here.

    >>> res = evaluate_matching(pipe, "winoground", MatchOptions(scorer="auto"))
    >>> res["metrics"]["group_score"], res["chance"]["group_score"], res["unet_evals_per_pair"]
    >>> rep = compare_scorers(pipe, "comvg", [MatchOptions(scorer="lse"), MatchOptions(scorer="denoise_norm")])
    >>> rep["table"]
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from interp.scorers import MatchOptions, PassSpec, Scorer, get_scorer
from interp.stats import rate
from models.shapes.benchmarks import CHANCE, Benchmark, Item, load_benchmark
from models.unet_pass import encode_image, noised_unet_pass

__all__ = ["evaluate_matching", "compare_scorers", "item_outcome", "summarize_outcomes", "outcome_intervals",
           "options_label", "distributed_state"]
# which metric family a benchmark uses; unknown names are inferred from the item structure
_FAMILY = {"winoground": "group", "comvg": "pair", "counting": "pair", "refcocog": "topk"}


# ----------------------------------------------------------------------------------------------
# Metrics over score tables (pure)
# ----------------------------------------------------------------------------------------------
def _family(name: str, item: Item) -> str:
    if name in _FAMILY:
        return _FAMILY[name]
    if len(item.images) > 1:
        return "group"
    return "pair" if len(item.captions) == 2 else "topk"


def item_outcome(family: str, item: Item, M: Sequence[Sequence[float]]) -> dict:
    """The item's outcome from its score table `M[image][caption]` (ties count as misses).

    family "group": {"text", "image", "group"} booleans; "pair": {"correct"}; "topk": {"rank", "top1", "top5"}.
    """
    M = np.asarray(M, dtype=np.float64)
    if M.shape != (len(item.images), len(item.captions)):
        raise ValueError(f"{item.id}: score table has shape {M.shape}, expected "
                         f"{(len(item.images), len(item.captions))} (images x captions)")
    if np.isnan(M).any():
        raise ValueError(f"{item.id}: NaN score")
    ans = item.answers
    if family == "group":
        text = all(M[i, a] > M[i, c] for i, a in enumerate(ans) for c in range(M.shape[1]) if c != a)
        image = all(M[i, a] > M[j, a] for i, a in enumerate(ans) for j in range(M.shape[0]) if j != i)
        return {"text": bool(text), "image": bool(image), "group": bool(text and image)}
    a = ans[0]
    others = [c for c in range(M.shape[1]) if c != a]
    if family == "pair":
        return {"correct": bool(all(M[0, a] > M[0, c] for c in others))}
    rank = 1 + int(sum(bool(M[0, c] >= M[0, a]) for c in others))
    return {"rank": rank, "top1": rank == 1, "top5": rank <= 5}


def summarize_outcomes(family: str, outcomes: Sequence[dict]) -> dict:
    """Mean metrics over item outcomes (see `item_outcome`); NaN where there are none."""
    n = len(outcomes)

    def mean(key):
        return float(np.mean([o[key] for o in outcomes])) if n else math.nan

    if family == "group":
        return {"text_score": mean("text"), "image_score": mean("image"), "group_score": mean("group")}
    if family == "pair":
        return {"accuracy": mean("correct")}
    return {"top1": mean("top1"), "top5": mean("top5"), "mean_rank": mean("rank")}


def _chance(name: str, family: str, items: Sequence[Item]) -> dict:
    if name in CHANCE:
        return dict(CHANCE[name])
    if family == "group":
        return {"text_score": 0.25, "image_score": 0.25, "group_score": 1 / 6}
    if family == "pair":
        return {"accuracy": 0.5}
    k = len(items[0].captions)
    return {"top1": 1 / k, "top5": min(5, k) / k}


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
def as_benchmark(benchmark: Benchmark | str | Path) -> Benchmark:
    return benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark)


def _select(b: Benchmark, split: str | None, limit: int | None) -> list[Item]:
    items = b.split(split)
    if limit is not None:
        if int(limit) < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        items = items[: int(limit)]
    if not items:
        raise ValueError(f"benchmark {b.name!r} has no items in split {split!r}")
    return items


def _check_options(options: MatchOptions) -> None:
    if not isinstance(options, MatchOptions):
        raise TypeError(f"options must be a MatchOptions, got {type(options).__name__}")


def options_label(o: MatchOptions) -> str:
    """A short label of an option set, e.g. "lse[logits,all,lse,lam=1,words]" or "denoise_norm"; the
    source reads "cosine" for pooling="cosine" (which ignores `source`)."""
    if o.scorer != "lse":
        return str(o.scorer)
    src = "cosine" if o.pooling == "cosine" else o.source
    return f"lse[{src},{o.layers or 'all'},{o.pooling},lam={o.lam:g},{o.tokens}]"


def _options_dict(o: MatchOptions) -> dict:
    d = dataclasses.asdict(o)
    d["timesteps"] = list(d["timesteps"])
    return d


def _run(items: Sequence[Item], score_image: Callable[[Any, list[str]], tuple[list[dict], int, int]], n_opts: int):
    """Score every image of every item; returns (tables per option [option][item] -> M, calls, evals, pairs)."""
    tables: list[list[list[list[float]]]] = [[] for _ in range(n_opts)]
    calls = evals = pairs = 0
    for it in items:
        rows: list[list[list[float]]] = [[] for _ in range(n_opts)]
        for k in range(len(it.images)):
            per_opt, c, e = score_image(it.image(k), list(it.captions))
            calls += c
            evals += e
            pairs += len(it.captions)
            for o, scores in enumerate(per_opt):
                missing = [cap for cap in it.captions if cap not in scores]
                if missing:
                    raise ValueError(f"{it.id}: the scorer returned no score for {missing}")
                rows[o].append([float(scores[cap]) for cap in it.captions])
        for o in range(n_opts):
            tables[o].append(rows[o])
    return tables, calls, evals, pairs


def distributed_state():
    """accelerate's PartialState when this process is one of several (`accelerate launch` / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None

    state = PartialState(cpu=not torch.cuda.is_available())  # processes on CPU talk over gloo
    return state if state.num_processes > 1 else None


def _run_sharded(items: Sequence[Item], score_image, n_opts: int):
    """`_run` data-parallel: each process scores a contiguous share of the items, and every process gets all
    score tables back in item order (accelerate `gather_object`). A single process just runs `_run`."""
    state = distributed_state()
    if state is None:
        return _run(items, score_image, n_opts)

    with state.split_between_processes(list(range(len(items)))) as mine:
        mine = list(mine)
        part = _run([items[i] for i in mine], score_image, n_opts) if mine else ([[] for _ in range(n_opts)], 0, 0, 0)
    tables: list[list] = [[None] * len(items) for _ in range(n_opts)]
    calls = evals = pairs = 0
    for idx, (tabs, c, e, p) in gather_object([(mine, part)]):
        for o in range(n_opts):
            for i, M in zip(idx, tabs[o]):
                tables[o][i] = M
        calls, evals, pairs = calls + c, evals + e, pairs + p
    return tables, calls, evals, pairs


def _report(b: Benchmark, items: Sequence[Item], tables, split, limit, per_item: bool) -> dict:
    family = _family(b.name, items[0])
    outcomes = [item_outcome(family, it, M) for it, M in zip(items, tables)]
    by_type = {}
    types = [t for t in b.types if any(it.type == t for it in items)]
    types += [t for t in dict.fromkeys(it.type for it in items) if t not in types]
    for t in types:
        sel = [o for it, o in zip(items, outcomes) if it.type == t]
        by_type[t] = {**summarize_outcomes(family, sel), "n": len(sel)}
    out = {"benchmark": b.name, "version": b.version, "split": split, "limit": limit, "n_items": len(items),
           "family": family, "metrics": summarize_outcomes(family, outcomes), "by_type": by_type,
           "chance": _chance(b.name, family, items), "intervals": outcome_intervals(outcomes)}
    if per_item:
        out["items"] = [{"id": it.id, "type": it.type, "scores": M, **o} for it, M, o in zip(items, tables, outcomes)]
    return out


def outcome_intervals(outcomes: Sequence[dict]) -> dict:
    """Each rate-valued metric with its count, n and Wilson 95 % interval over the items (`interp.stats.rate`):
    text / image / group, correct, top1 / top5 (mean rank has none)."""
    keys = [k for k in ("text", "image", "group", "correct", "top1", "top5") if outcomes and k in outcomes[0]]
    return {k: rate([bool(o[k]) for o in outcomes]) for k in keys}


def _cost(calls: int, evals: int, pairs: int) -> dict:
    return {"unet_calls": int(calls), "unet_evals": int(evals), "pairs": int(pairs),
            "unet_evals_per_pair": evals / pairs if pairs else math.nan}


def _scorer_name(scorer: Scorer) -> str:
    return scorer.name or type(scorer).__name__


def evaluate_matching(pipe, benchmark: Benchmark | str | Path, options: MatchOptions = MatchOptions(),
                      split: str | None = "test", limit: int | None = None, scorer: Scorer | str | None = None,
                      per_item: bool = True) -> dict:
    """Matching metrics of one scorer on a benchmark.

    Args:
        pipe: the pipeline (passed to the scorer; may be None for a scorer that runs no model).
        benchmark: a loaded Benchmark, a benchmark name (assets/benchmarks/<name>) or a folder.
        options: MatchOptions; `options.scorer` names the registered scorer unless `scorer` is given.
        split: "test" (default), "train", or None / "all".
        limit: score only the first `limit` items of the split (file order).
        scorer: a Scorer instance or registry name, replacing `options.scorer`.
        per_item: include each item's score table and outcome under "items".
    Returns:
        JSON-ready dict: "benchmark", "version", "split", "limit", "n_items", "family", "scorer", "options",
        "metrics" (overall; see the module docstring), "by_type" ({type: metrics + "n"}), "chance",
        "unet_calls", "unet_evals", "pairs", "unet_evals_per_pair" (= unet_evals / pairs: S for lse and
        denoise, S * (1 + 1/K) for denoise_norm, with S timesteps and K captions per image), and "items"
        ([{"id", "type", "scores" (M[image][caption]), outcome}]) when `per_item`.
    """
    _check_options(options)
    sc = get_scorer(options.scorer if scorer is None else scorer)
    b = as_benchmark(benchmark)
    items = _select(b, split, limit)

    def score_image(image, captions):
        res = sc.score(pipe, image, captions, options)
        return [res.by_caption], res.unet_calls, res.unet_evals

    tables, calls, evals, pairs = _run_sharded(items, score_image, 1)
    out = _report(b, items, tables[0], split, limit, per_item)
    name = _scorer_name(sc)
    out.update(scorer=name, label=options_label(options) if name == options.scorer else name,
               options=_options_dict(options), **_cost(calls, evals, pairs))
    return out


def compare_scorers(pipe, benchmark: Benchmark | str | Path, scorers: Sequence[MatchOptions],
                    split: str | None = "test", limit: int | None = None,
                    scorer: Scorer | str | None | Sequence[Scorer | str | None] = None,
                    per_item: bool = False) -> dict:
    """Several option sets side by side on the same items, timesteps and noise.

    All option sets must share `timesteps` and `noise_seed` (ValueError otherwise; sweep timesteps with
    separate `evaluate_matching` runs). When every option set's scorer reads one plain pass
    (`Scorer.shares_pass`), each image gets ONE pass serving every option set (logits traced if any reads
    logits, cosine maps if any pools cosine, the "" row added if any needs it), so the options see the very
    same UNet outputs; otherwise each option set's scorer runs on its own. `scorer` (instance or name)
    replaces every `options.scorer`; a list gives one per option set (None keeps that set's `options.scorer`).

    Returns:
        {"benchmark", "split", "n_items", "timesteps", "noise_seed", "labels",
         "results": {label: evaluate_matching-style dict; its cost fields are what that option set costs
                     alone (unet_evals_per_pair: S, or S * (1 + 1/K) for denoise_norm)},
         "table": [{"label", "scorer", **metrics, "unet_evals_per_pair"}] (one row per option set),
         "chance", "shared_pass": {"unet_calls", "unet_evals", "pairs", "unet_evals_per_pair"} (actually run)}
    """
    options = list(scorers)
    if not options:
        raise ValueError("no option sets to compare")
    for o in options:
        _check_options(o)
    ts, seed = tuple(options[0].timesteps), options[0].noise_seed
    for o in options[1:]:
        if tuple(o.timesteps) != ts or o.noise_seed != seed:
            raise ValueError("compare_scorers needs the same timesteps and noise_seed in every option set "
                             f"(got {tuple(o.timesteps)}/{o.noise_seed} vs {ts}/{seed}); "
                             "run evaluate_matching separately to compare timesteps")
    per = list(scorer) if isinstance(scorer, (list, tuple)) else [scorer] * len(options)
    if len(per) != len(options):
        raise ValueError(f"{len(per)} scorers for {len(options)} option sets: give one per option set")
    scs = [get_scorer(o.scorer if s is None else s) for o, s in zip(options, per)]
    b = as_benchmark(benchmark)
    items = _select(b, split, limit)
    labels: list[str] = []
    for o, sc in zip(options, scs):
        lab = options_label(o) if sc.name == o.scorer else f"{_scorer_name(sc)}:{options_label(o)}"
        base, k = lab, 2
        while lab in labels:
            lab, k = f"{base}#{k}", k + 1
        labels.append(lab)

    alone = [[0, 0] for _ in options]  # per option: calls, evals if run alone
    if all(sc.shares_pass for sc in scs):
        def score_image(image, captions):
            spec = PassSpec()
            for o, sc in zip(options, scs):
                spec = spec.merge(sc.needs(o, captions))
            res = noised_unet_pass(pipe, encode_image(pipe, image), captions, list(ts), noise_seed=seed,
                                   logits=spec.logits, cosine=spec.cosine, uncond=spec.uncond, padded=spec.padded)
            outs = [sc.score_pass(res, o) for o, sc in zip(options, scs)]
            for a, r in zip(alone, outs):
                a[0] += r.unet_calls
                a[1] += r.unet_evals
            return [r.by_caption for r in outs], res.unet_calls, res.unet_evals
    else:
        def score_image(image, captions):
            outs, calls, evals = [], 0, 0
            for a, o, sc in zip(alone, options, scs):
                r = sc.score(pipe, image, captions, o)
                a[0] += r.unet_calls
                a[1] += r.unet_evals
                calls += r.unet_calls
                evals += r.unet_evals
                outs.append(r.by_caption)
            return outs, calls, evals

    tables, calls, evals, pairs = _run(items, score_image, len(options))
    results, table = {}, []
    for lab, o, sc, tab, (c, e) in zip(labels, options, scs, tables, alone):
        r = _report(b, items, tab, split, limit, per_item)
        r.update(scorer=_scorer_name(sc), label=lab, options=_options_dict(o), **_cost(c, e, pairs))
        results[lab] = r
        table.append({"label": lab, "scorer": r["scorer"], **r["metrics"],
                      "unet_evals_per_pair": r["unet_evals_per_pair"]})
    first = next(iter(results.values()))
    return {"benchmark": b.name, "split": split, "limit": limit, "n_items": len(items), "timesteps": list(ts),
            "noise_seed": seed, "labels": labels, "results": results, "table": table, "chance": first["chance"],
            "by_type_table": {lab: r["by_type"] for lab, r in results.items()},
            "shared_pass": _cost(calls, evals, pairs)}
