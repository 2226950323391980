"""The Discffusion report: does each claim of the paper hold for a model on the shapes benchmarks?

One function, `run_report`, runs named groups of experiments (each an option set, a scorer hook or a few-shot
attention prompt) over the benchmarks with `interp.tasks.matching_eval`, and returns plain rows; `report_markdown`
renders them as tables. Option sets that share timesteps and noise go through ONE shared pass per image
(`compare_scorers`), so their differences are the scorers' alone.

Groups (paper reference in brackets):
    scorers    LSE vs the Diffusion-Classifier score (plain / unconditional-normalised) vs the structure-aware
               score vs the routed score (interp.scorers.routed), same timesteps: equal UNet calls per pair
               (denoise_norm adds the "" row)
    pooling    LSE vs mean vs max over tokens vs max over positions (vs cosine of projected features where the
               installed interp.lse offers it) [Table 3]; probabilities vs logits
    layers     all cross-attention layers vs the last of each stage (the authors' code) [Fig. 3]
    noise      noise-level ensemble {0.2, 0.4, 0.6, 0.8} vs each level alone [Table 3]; a noise level l is the
               timestep round(l * T) of a T-step training schedule
    schedule   a DDIM schedule of `schedule_steps` timesteps: all vs the first (noisiest) only vs the last only
               [Table 9]; the Diffusion-Classifier score on the same schedule (more calls, same as LSE's)
    heads      Eq. 7 gradient-weighted heads (captum) vs the plain head average [Fig. 4]
    prompt     zero-shot vs few-shot attention prompts trained on the benchmark's train split [Table 1]:
               additive p^k / p^v with margin 0.2 (the paper), LoRA with margin 0.1 (the authors' code)
    authors    the claims above measured on the Discffusion authors' exact score (interp.scorers.discffusion,
               their 30 timesteps, one padded pass shared by the rows): the score vs its attention term alone
               (their --bias off), other poolings (with and without the denoising term), probabilities, all
               layers instead of theirs, the noisiest / least noisy of their timesteps alone, each noise level
               alone. (Head weighting and few-shot prompts are LSE-only here: groups heads and prompt.)

    >>> rows = run_report(pipe, ["winoground", "comvg"], groups=["scorers", "layers"])
    >>> print(report_markdown(rows))
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, Iterable, Sequence

from interp.lse import POOLINGS
from interp.scorers import get_scorer
from interp.scorers.discffusion import authors_timesteps
from interp.scorers.structure import StructureScorer
from interp.stats import mcnemar, wilson_interval
from interp.structure import StructureConfig
from interp.tasks.matching import MatchOptions
from interp.tasks.matching_eval import as_benchmark, compare_scorers, evaluate_matching
from interp.tasks.prompt_learning import apply_prompt, train_prompt
from interp.tasks.structure_fit import fit_relation_directions

__all__ = ["GROUPS", "PRIMARY", "Experiment", "experiments", "noise_level_timesteps", "schedule_timesteps",
           "run_report", "add_paired_tests", "verdict", "claims_markdown", "pairs_markdown", "report_markdown"]

GROUPS = ("scorers", "pooling", "layers", "noise", "schedule", "heads", "prompt", "authors")
NOISE_LEVELS = (0.2, 0.4, 0.6, 0.8)
# the headline metric of each benchmark family (all metrics are kept in the rows)
PRIMARY = {"winoground": "group_score", "comvg": "accuracy", "counting": "accuracy", "refcocog": "top1"}


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One row of the report: an option set, optionally with another registered scorer or a few-shot prompt."""

    group: str
    label: str
    options: MatchOptions
    scorer: str | None = None  # a registered scorer (interp.scorers) replacing options.scorer, e.g. "auto"
    scorer_args: tuple = ()  # (name, value) pairs for the scorer's constructor, e.g. (("bias", False),)
    prompt: str | None = None  # None (zero-shot) | "additive" | "lora"
    fit: str | None = None  # "relation_directions": the structure scorer with directions learned on the train split
    margin: float = 0.2
    # the paper's expectation against the group's first row: "first" (the first row wins), "this" (this row
    # wins), None (not a claim of the paper: a decomposition or another method)
    expect: str | None = None


def noise_level_timesteps(levels: Sequence[float], num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """Timesteps of noise levels l in (0, 1): round(l * T), clipped to 0..T-1."""
    out = []
    for lv in levels:
        if not 0 < float(lv) < 1:
            raise ValueError(f"noise levels must lie strictly between 0 and 1, got {lv}")
        out.append(min(num_train_timesteps - 1, int(round(float(lv) * num_train_timesteps))))
    return tuple(out)


def schedule_timesteps(scheduler, n: int) -> tuple[int, ...]:
    """The timesteps of an `n`-step sampling schedule of `scheduler`, in sampling order (noisiest first)."""
    if n < 1:
        raise ValueError(f"schedule steps must be at least 1, got {n}")
    s = copy.deepcopy(scheduler)
    s.set_timesteps(n)
    return tuple(int(t) for t in s.timesteps)


def experiments(groups: Iterable[str], base: MatchOptions, schedule: Sequence[int],
                num_train_timesteps: int = 1000) -> list[Experiment]:
    """The experiments of the named groups around the `base` LSE option set (see the module docstring)."""
    groups = list(groups)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown report group(s) {bad}; choose from {GROUPS}")
    rep = dataclasses.replace
    out: list[Experiment] = []
    for g in groups:
        if g == "scorers":
            out += [Experiment(g, "LSE (Discffusion)", base),
                    Experiment(g, "Diffusion Classifier (denoising error)", rep(base, scorer="denoise"),
                               expect="first"),
                    Experiment(g, "Diffusion Classifier, uncond.-normalised", rep(base, scorer="denoise_norm"),
                               expect="first"),
                    Experiment(g, "structure-aware (binding + relation)", base, scorer="structure"),
                    Experiment(g, "structure, relation directions learned on the train split", base,
                               scorer="structure", fit="relation_directions"),
                    Experiment(g, "routed: structure if same content words, else DC", base, scorer="auto")]
        elif g == "pooling":
            out += [Experiment(g, f"pooling={p}", rep(base, pooling=p), expect=None if p == base.pooling else "first")
                    for p in POOLINGS]
            other = "probs" if base.source == "logits" else "logits"
            out.append(Experiment(g, f"LSE on {other}", rep(base, source=other)))
        elif g == "layers":
            out += [Experiment(g, "all layers", rep(base, layers=None)),
                    Experiment(g, "last layer of each stage", rep(base, layers="last_per_stage"), expect="first")]
        elif g == "noise":
            ens = noise_level_timesteps(NOISE_LEVELS, num_train_timesteps)
            out.append(Experiment(g, f"ensemble {list(NOISE_LEVELS)} (t={list(ens)})", rep(base, timesteps=ens)))
            out += [Experiment(g, f"level {lv} alone (t={t})", rep(base, timesteps=(t,)), expect="first")
                    for lv, t in zip(NOISE_LEVELS, ens)]
        elif g == "schedule":
            ts = tuple(schedule)
            out += [Experiment(g, f"all {len(ts)} schedule steps", rep(base, timesteps=ts)),
                    Experiment(g, f"first step only (t={ts[0]})", rep(base, timesteps=ts[:1]), expect="first"),
                    Experiment(g, f"last step only (t={ts[-1]})", rep(base, timesteps=ts[-1:]), expect="first"),
                    Experiment(g, f"Diffusion Classifier, all {len(ts)} steps", rep(base, scorer="denoise", timesteps=ts))]
        elif g == "heads":
            out += [Experiment(g, "heads averaged", base),
                    Experiment(g, "heads weighted (Eq. 7, captum)", base, scorer="head_weighted", expect="this")]
        elif g == "prompt":
            out += [Experiment(g, "zero-shot", base),
                    Experiment(g, "few-shot additive prompt (M=0.2)", base, prompt="additive", margin=0.2,
                               expect="this"),
                    Experiment(g, "few-shot LoRA prompt (M=0.1)", base, prompt="lora", margin=0.1, expect="this")]
        elif g == "authors":
            out += _authors_experiments(base, num_train_timesteps)
    return out


def _authors_experiments(base: MatchOptions, num_train_timesteps: int) -> list[Experiment]:
    """Group "authors": the paper's claims on the authors' exact score (their timesteps, layers, logits, lam 1)."""
    rep, g = dataclasses.replace, "authors"
    ats = authors_timesteps(num_train_timesteps=num_train_timesteps)  # ascending: ats[-1] is the noisiest
    a = rep(base, scorer="discffusion", timesteps=ats, layers=None, pooling="lse", source="logits", lam=1.0)
    attn = (("bias", False),)
    out = [Experiment(g, f"authors' score (exact: padded LSE + denoising term, their layers, {len(ats)} t)", a),
           Experiment(g, "attention term alone (their --bias off)", a, scorer_args=attn)]
    for p in POOLINGS:
        if p not in ("lse", "cosine"):
            out += [Experiment(g, f"pooling={p} (+ denoising term)", rep(a, pooling=p), expect="first"),
                    Experiment(g, f"pooling={p}, attention term alone", rep(a, pooling=p), scorer_args=attn)]
    out += [Experiment(g, "LSE on probabilities (+ denoising term)", rep(a, source="probs")),
            Experiment(g, "all cross-attention layers instead of theirs (+ denoising term)", rep(a, layers="all"),
                       expect="this"),  # the paper's Fig. 3 (all layers best); their code uses the last blocks
            Experiment(g, "all cross-attention layers, attention term alone", rep(a, layers="all"), scorer_args=attn),
            Experiment(g, f"noisiest of their timesteps alone (t={ats[-1]})", rep(a, timesteps=ats[-1:]), expect="first"),
            Experiment(g, f"least noisy of their timesteps alone (t={ats[0]})", rep(a, timesteps=ats[:1]), expect="first")]
    for lv, t in zip(NOISE_LEVELS, noise_level_timesteps(NOISE_LEVELS, num_train_timesteps)):
        out.append(Experiment(g, f"noise level {lv} alone (t={t})", rep(a, timesteps=(t,)), expect="first"))
    return out


# the per-item outcome behind each benchmark's primary metric (`matching_eval.item_outcome`)
OUTCOME = {"group_score": "group", "text_score": "text", "image_score": "image", "accuracy": "correct",
           "top1": "top1", "top5": "top5"}


def _row(e: Experiment, res: dict, bench: str, seconds: float, noise_seed: int, extra: dict | None = None) -> dict:
    key = PRIMARY.get(bench)
    m = res["metrics"]
    outcomes = [bool(it[OUTCOME[key]]) for it in res.get("items", [])] if key in OUTCOME else []
    ci = list(wilson_interval(sum(outcomes), len(outcomes))) if outcomes else None
    return {"group": e.group, "label": e.label, "benchmark": bench, "primary": key,
            "value": m.get(key, math.nan) if key else math.nan, "ci95": ci, "n": len(outcomes),
            "outcomes": outcomes, "noise_seed": noise_seed, "metrics": m, "chance": res["chance"],
            "by_type": res.get("by_type", {}), "unet_evals_per_pair": res["unet_evals_per_pair"],
            "timesteps": list(e.options.timesteps), "n_items": res["n_items"], "seconds": round(seconds, 1),
            "expect": e.expect,
            **(extra or {})}


def add_paired_tests(rows: list[dict]) -> list[dict]:
    """Each row gets "paired": McNemar's exact test of its per-item outcomes against the first experiment of its
    group on the same benchmark and noise seed (the reference row gets none). Rows without outcomes are skipped."""
    ref: dict[tuple, dict] = {}
    for r in rows:
        k = (r["group"], r["benchmark"], r.get("noise_seed", 0))
        if k not in ref:
            ref[k] = r
            continue
        a = ref[k]
        if a.get("outcomes") and len(a["outcomes"]) == len(r.get("outcomes", [])):
            m = mcnemar(r["outcomes"], a["outcomes"])
            r["paired"] = {"vs": a["label"], "better": m["a_only"], "worse": m["b_only"], "p": m["p"]}
    return rows


def run_report(pipe, benchmarks: Sequence, groups: Sequence[str] = GROUPS, base: MatchOptions = MatchOptions(),
               split: str = "test", limit: int | None = None, schedule_steps: int = 10, prompt_steps: int = 50,
               seed: int = 0, progress: Callable[[dict], None] | None = None,
               noise_seeds: Sequence[int] = (0,)) -> list[dict]:
    """Run the report's experiments; one row per (experiment, benchmark, noise seed), in group order.

    Args:
        pipe: the pipeline (frozen; few-shot prompts are applied in a context and removed afterwards).
        benchmarks: loaded Benchmarks, or names / folders (`models.shapes.benchmarks.load_benchmark`).
        groups: which groups of `GROUPS` to run.
        base: the LSE option set every variation starts from (scorer must be "lse").
        split, limit: the evaluation items (`evaluate_matching`); prompts train on the "train" split.
        schedule_steps: length of the sampling schedule of the "schedule" group.
        prompt_steps: optimiser steps of each few-shot prompt.
        progress: called with each finished row.
        noise_seeds: every experiment runs once per noise seed (the seed of the noise draw shared by the
            captions; few-shot prompts are trained once per seed too).
    Returns:
        rows: {"group", "label", "benchmark", "primary", "value" (the primary metric), "ci95" (Wilson, over the
        items), "n", "outcomes" (per item), "noise_seed", "metrics", "chance", "by_type", "unet_evals_per_pair",
        "timesteps", "n_items", "seconds", "paired" (McNemar vs the group's first row; `add_paired_tests`)}
        (+ "prompt_loss" for prompts).
    """
    if base.scorer != "lse":
        raise ValueError("the report's base option set must use scorer='lse'")
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    exps = experiments(groups, base, schedule_timesteps(pipe.scheduler, schedule_steps), n_train)
    rows: list[dict] = []

    def emit(r: dict) -> None:
        rows.append(r)
        if progress:
            progress(r)

    for name in benchmarks:
        bench = as_benchmark(name)
        for ns in noise_seeds:
            for r in _run_benchmark(pipe, bench, [_with_seed(e, ns) for e in exps], split, limit, prompt_steps,
                                    seed, ns):
                emit(r)
    add_paired_tests(rows)
    return rows


def _with_seed(e: Experiment, noise_seed: int) -> Experiment:
    return dataclasses.replace(e, options=dataclasses.replace(e.options, noise_seed=int(noise_seed)))


def _run_benchmark(pipe, bench, exps: Sequence[Experiment], split, limit, prompt_steps: int, seed: int,
                   noise_seed: int) -> list[dict]:
    """The rows of one benchmark at one noise seed, in experiment order."""
    # every experiment's scorer (structure with learned directions: fitted here, on the train split)
    scorers: dict[Experiment, object] = {}
    extras: dict[Experiment, dict] = {}
    for e in exps:
        if e.prompt is not None:
            continue
        if e.fit == "relation_directions":
            t0 = time.time()
            dirs = fit_relation_directions(pipe, bench, e.options)
            scorers[e] = StructureScorer(config=StructureConfig(directions=dirs))
            extras[e] = {"learned_directions": [[rel, list(d)] for rel, d in dirs],
                         "fit_seconds": round(time.time() - t0, 1)}
        else:
            scorers[e] = get_scorer(e.scorer or e.options.scorer, **dict(e.scorer_args))
    # experiments whose scorers read one plain pass and share timesteps + noise: ONE shared pass per image
    shared: dict[tuple, list[Experiment]] = {}
    for e, sc in scorers.items():
        if sc.shares_pass:
            shared.setdefault((tuple(e.options.timesteps), e.options.noise_seed), []).append(e)
    done: dict[Experiment, dict] = {}
    for batch in shared.values():
        uniq: dict[tuple, Experiment] = {}
        for e in batch:
            uniq.setdefault(_key(e), e)
        t0 = time.time()
        rep = compare_scorers(pipe, bench, [u.options for u in uniq.values()], split=split, limit=limit,
                              per_item=True, scorer=[scorers[u] for u in uniq.values()])
        dt = (time.time() - t0) / len(uniq)
        by_key = dict(zip(uniq, (rep["results"][lab] for lab in rep["labels"])))
        for e in batch:
            done[e] = _row(e, by_key[_key(e)], bench.name, dt, noise_seed, extras.get(e))
    rows = []
    for e in exps:
        if e in done:
            rows.append(done[e])
            continue
        t0 = time.time()
        extra = {}
        if e.prompt is not None:
            prompt, log = train_prompt(pipe, bench, e.options, steps=prompt_steps, margin=e.margin,
                                       variant=e.prompt, seed=seed)
            extra = {"prompt_loss": [log[0]["loss"], log[-1]["loss"]], "prompt_steps": prompt_steps}
            with apply_prompt(pipe, prompt):
                res = evaluate_matching(pipe, bench, e.options, split=split, limit=limit, per_item=True)
        else:
            res = evaluate_matching(pipe, bench, e.options, split=split, limit=limit, per_item=True,
                                    scorer=scorers[e])
            extra = extras.get(e, {})
        rows.append(_row(e, res, bench.name, time.time() - t0, noise_seed, extra))
    return rows


def _key(e: Experiment) -> tuple:
    """Experiments with equal keys are the same computation (scored once)."""
    return (e.options, e.scorer, e.scorer_args, e.fit)


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def report_markdown(rows: Sequence[dict], title: str = "Discffusion on the shapes benchmarks",
                    command: str | Sequence[str] | None = None, model: str | None = None,
                    unet_step: int | None = None, pairs: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown: the claims' verdicts (`claims_markdown`), then per group experiments x benchmarks (primary metric),
    chance and UNet evals per pair. `model` / `unet_step` name the model measured (every verdict is about it)."""
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    lines = [f"# {title}", ""]
    if model or unet_step is not None:
        lines += [f"Model: {model or '?'}" + (f", UNet step {unet_step}" if unet_step is not None else "") +
                  " (every number and verdict below is about this model).", ""]
    for c in ([command] if isinstance(command, str) else list(command or [])):
        lines += [f"Made with: `{c}`", ""]
    seeds = sorted({r.get("noise_seed", 0) for r in rows})
    lines += ["Primary metric per benchmark: " + ", ".join(f"{b} {PRIMARY.get(b, '?')}" for b in benches) +
              ". Cells: metric [Wilson 95 % interval over the items] (UNet evaluations per image-caption pair); "
              "p: McNemar's exact test against the group's first row on the same items"
              + (f"; with {len(seeds)} noise seeds {seeds}: the mean, the per-seed range and the seeds' p values"
                 if len(seeds) > 1 else "") + ".", ""]
    lines += claims_markdown(rows)
    lines += pairs_markdown(rows, pairs)
    for g in dict.fromkeys(r["group"] for r in rows):
        grows = [r for r in rows if r["group"] == g]
        lines += [f"## {g}", "", "| experiment | " + " | ".join(benches) + " |",
                  "|---|" + "---|" * len(benches)]
        for lab in dict.fromkeys(r["label"] for r in grows):
            cells = []
            for b in benches:
                hit = [r for r in grows if r["label"] == lab and r["benchmark"] == b]
                cells.append(_cell(hit) if hit else "")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        chance = []
        for b in benches:
            hit = [r for r in grows if r["benchmark"] == b]
            chance.append(_fmt(hit[0]["chance"].get(hit[0]["primary"])) if hit else "")
        lines += ["| chance | " + " | ".join(chance) + " |", ""]
        lines += _split_tables(grows, benches) if g == "scorers" else []
    return "\n".join(lines)


ALPHA = 0.05  # the level of the paired tests behind a verdict


def verdict(row: dict) -> str | None:
    """A row's verdict on the paper's claim it carries (`expect`), from its paired test against the group's
    first row: "holds" (the expected side wins, McNemar p < ALPHA), "reversed" (the other side wins, p < ALPHA),
    "n.s." (no significant difference); None when the row carries no claim or has no paired test."""
    pr = row.get("paired")
    if not row.get("expect") or not pr:
        return None
    if pr["p"] >= ALPHA or pr["better"] == pr["worse"]:
        return "n.s."
    winner = "this" if pr["better"] > pr["worse"] else "first"
    return "holds" if winner == row["expect"] else "reversed"


def claims_markdown(rows: Sequence[dict]) -> list[str]:
    """The paper's claims, one line per (group, row carrying a claim): per benchmark the first row's value vs this
    row's, McNemar's p and the verdict (`verdict`); several noise seeds: one verdict per seed, "k/n" when they
    differ. Empty when no row carries a claim."""
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    ref = {(r["group"], r["benchmark"], r.get("noise_seed", 0)): r for r in reversed(rows)}  # the group's first row
    claim_rows = [r for r in rows if r.get("expect") and r.get("paired")]
    if not claim_rows:
        return []
    out = ["## The paper's claims, verdicts", "",
           f"Each line: the group's first row vs this row on the same items (primary metric), McNemar's exact p, "
           f"and the verdict on the paper's expectation (which side should win): holds / reversed at p < {ALPHA}, "
           "n.s. otherwise; with several noise seeds one verdict per seed.", "",
           "| group | first row vs this row (paper expects) | " + " | ".join(benches) + " |",
           "|---|---|" + "---|" * len(benches)]
    for g, lab in dict.fromkeys((r["group"], r["label"]) for r in claim_rows):
        mine = [r for r in claim_rows if r["group"] == g and r["label"] == lab]
        first = ref[(g, mine[0]["benchmark"], mine[0].get("noise_seed", 0))]["label"]
        side = "first" if mine[0]["expect"] == "first" else "this"
        cells = []
        for b in benches:
            hits = [r for r in mine if r["benchmark"] == b]
            if not hits:
                cells.append("")
                continue
            refs = [ref[(g, b, h.get("noise_seed", 0))]["value"] for h in hits]
            vals = [h["value"] for h in hits]
            vs = [verdict(h) for h in hits]
            vtxt = vs[0] if len(set(vs)) == 1 else ", ".join(f"{v} {vs.count(v)}/{len(vs)}" for v in dict.fromkeys(vs))
            ps = "/".join(f"{h['paired']['p']:.2g}" for h in hits)
            cells.append(f"{_fmt(sum(refs) / len(refs))} vs {_fmt(sum(vals) / len(vals))}, p={ps}: **{vtxt}**")
        out.append(f"| {g} | {first} vs {lab} ({side} wins) | " + " | ".join(cells) + " |")
    return out + [""]


def pairs_markdown(rows: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> list[str]:
    """McNemar's exact test between any two rows by label (e.g. across groups), per benchmark and noise seed
    both hold: "a vs b: value a vs value b, b better / worse on k / m items, p". ValueError for a label no row has."""
    if not pairs:
        return []
    labels = {r["label"] for r in rows}
    for a, b in pairs:
        for lab in (a, b):
            if lab not in labels:
                raise ValueError(f"no report row is labelled {lab!r}")
    benches = list(dict.fromkeys(r["benchmark"] for r in rows))
    out = ["## Paired comparisons across groups", "",
           "Each cell: a vs b on the same items (primary metric), the items only b gets right / only a gets right, "
           "McNemar's exact p (per noise seed both rows hold).", "",
           "| a vs b | " + " | ".join(benches) + " |", "|---|" + "---|" * len(benches)]
    for a, b in pairs:
        cells = []
        for bench in benches:
            got = []
            for ra in (r for r in rows if r["label"] == a and r["benchmark"] == bench):
                rb = next((r for r in rows if r["label"] == b and r["benchmark"] == bench
                           and r.get("noise_seed", 0) == ra.get("noise_seed", 0)), None)
                if rb is None or len(rb.get("outcomes", [])) != len(ra.get("outcomes", [])) or not ra.get("outcomes"):
                    continue
                m = mcnemar(rb["outcomes"], ra["outcomes"])
                got.append(f"{_fmt(ra['value'])} vs {_fmt(rb['value'])}, +{m['a_only']}/-{m['b_only']}, p={m['p']:.2g}")
            cells.append("; ".join(got))
        out.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    return out + [""]


def _cell(hits: Sequence[dict]) -> str:
    """One table cell from an experiment's rows on one benchmark (one per noise seed)."""
    vals = [h["value"] for h in hits]
    cost = f"({hits[0]['unet_evals_per_pair']:.1f})"
    ps = [h["paired"]["p"] for h in hits if h.get("paired")]
    ptxt = (" p=" + "/".join(f"{p:.2g}" for p in ps)) if ps else ""
    if len(hits) == 1:
        ci = hits[0].get("ci95")
        return f"{_fmt(vals[0])}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" {cost}{ptxt}"
    return f"{_fmt(sum(vals) / len(vals))} ({_fmt(min(vals))}–{_fmt(max(vals))}) {cost}{ptxt}"


def _split_tables(rows: Sequence[dict], benches: Sequence[str]) -> list[str]:
    """Per benchmark, the primary metric of each experiment per hard-negative split (`by_type`)."""
    out = []
    for b in benches:
        brows = [r for r in rows if r["benchmark"] == b and r.get("by_type")]
        types = list(dict.fromkeys(t for r in brows for t in r["by_type"]))
        if not types:
            continue
        n = {t: brows[0]["by_type"][t].get("n", "") for t in types if t in brows[0]["by_type"]}
        out += [f"Per split, {b} ({brows[0]['primary']}):", "",
                "| experiment | " + " | ".join(f"{t} (n={n.get(t, '')})" for t in types) + " |",
                "|---|" + "---|" * len(types)]
        for r in brows:
            out.append(f"| {r['label']} | " + " | ".join(_fmt(r["by_type"].get(t, {}).get(r["primary"])) for t in types) + " |")
        out.append("")
    return out
