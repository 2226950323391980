"""DPT readings: validation sweep (snapshots x t), test readings (REC, hard-negative ITM, the four matching
benchmarks), self-correction on count prompts. Writes JSON under docs/measurements/dpt/.

    python -m bench.dpt_eval val --work ~/.cache/discolens/dpt/s1 --ts 100,250,400
    python -m bench.dpt_eval export --snap ~/.cache/discolens/dpt/s1/snap-01200 --t 250
    python -m bench.dpt_eval test                       # --parts rec: only the grounding reading
    python -m bench.dpt_eval fuse-val --write           # the dpt_fused scorer's weight, chosen on validation
    python -m bench.dpt_eval selfcorr --split validation --n 40 --etas 0.5,2 --best-of 4 [--objectives score,contrast]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
from scipy.stats import binomtest

from models import load_pipeline
from models.adapters.dpt import load_adapter
from models.shapes import referring, world
from models.training import dpt as tdpt

OUT = Path(__file__).resolve().parent.parent / "docs" / "measurements" / "dpt"


def wilson(k: int, n: int) -> list[float]:
    ci = binomtest(int(k), int(n)).proportion_ci(method="wilson")
    return [round(float(ci.low), 3), round(float(ci.high), 3)]


def rate(d: dict) -> dict:
    return {"rate": round(d["k"] / d["n"], 3), "k": d["k"], "n": d["n"], "ci95": wilson(d["k"], d["n"])}


def cmd_val(a, pipe) -> None:
    snaps = sorted(Path(a.work).expanduser().glob("snap-*"))
    if a.last:
        snaps = snaps[-a.last:]
    rec_set = referring.referring_dataset(tdpt.DPT_SEEDS["validation"], a.n_rec)
    itm_set = world.sample_dataset(tdpt.DPT_SEEDS["validation"], a.n_itm, exclude_compositional=False)
    rows = []
    for s in snaps:
        ad = load_adapter(s)
        p = tdpt.tuned_pipe(pipe, s) if (s / "lora.safetensors").exists() else pipe  # stage 2: its tuned UNet
        for t in [int(v) for v in a.ts.split(",")]:
            t0 = time.time()
            rec = tdpt.evaluate_rec(p, ad, rec_set, t)
            itm = tdpt.evaluate_itm_pairs(p, ad, itm_set, t)
            row = {"snapshot": s.name, "t": t, "rec": rate(rec["overall"]),
                   "rec_by_kind": {k: rate(v) for k, v in rec["by_kind"].items()}, "itm": rate(itm["overall"]),
                   "itm_by_type": {k: rate(v) for k, v in itm["by_type"].items()}, "seconds": round(time.time() - t0)}
            rows.append(row)
            print(s.name, t, "rec", row["rec"]["rate"], "itm", row["itm"]["rate"], flush=True)
    best = max(rows, key=lambda r: r["rec"]["rate"] + r["itm"]["rate"])
    OUT.mkdir(parents=True, exist_ok=True)
    out = {"command": " ".join(sys.argv), "seed": tdpt.DPT_SEEDS["validation"], "rows": rows,
           "chosen": {"snapshot": best["snapshot"], "t": best["t"], "rule": "max rec + itm (validation)"}}
    (OUT / a.out).write_text(json.dumps(out, indent=1))
    print("chosen", out["chosen"])


def cmd_export(a, pipe) -> None:
    stage2 = (Path(a.snap) / "lora.safetensors").exists()
    d = tdpt.export_adapter(a.snap, tdpt.tuned_dir_for(pipe) if stage2 else tdpt.adapter_dir_for(pipe),
                            extra={"chosen_on": "validation seed 50001"})
    set_config(d, t=a.t)
    print("exported to", d)


def set_config(folder: Path, **values) -> None:
    """Set keys of an exported adapter's config.json (a validation choice: its t, its fused weight)."""
    f = Path(folder) / "config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), **values}, indent=2) + "\n")


def cmd_test(a, pipe) -> None:
    from interp.scorers.base import MatchOptions
    from interp.scorers.dpt import DPTScorer, DPTTunedScorer
    from interp.scorers.dpt_fused import DPTFusedScorer
    from interp.tasks.matching_eval import evaluate_matching

    base = pipe
    a.tuned = a.tuned or a.fused
    pipe, ad = tdpt.find_reader(pipe, a.tuned)  # stage 2: the tuned model and its adapter
    out: dict = {"command": " ".join(sys.argv), "seed": tdpt.DPT_SEEDS["test"], "t": ad.config.t,
                 "fused_denoise_weight": ad.config.fused_denoise_weight if a.fused else None,
                 "trained_steps": ad.config.trained_steps, "stage": ad.config.stage}
    parts = set(a.parts.split(","))
    if "rec" in parts:
        rec = tdpt.evaluate_rec(pipe, ad, referring.referring_dataset(tdpt.DPT_SEEDS["test"], a.n_rec))
        out["rec"] = rate(rec["overall"])
        out["rec_by_kind"] = {k: rate(v) for k, v in rec["by_kind"].items()}
        out["rec_mean_iou"] = round(sum(rec["ious"]) / len(rec["ious"]), 4)
        out["rec_head"] = ad.config.rec_head
        print("rec", out["rec"], out["rec_by_kind"], flush=True)
    if "itm" in parts:
        itm = tdpt.evaluate_itm_pairs(pipe, ad, world.sample_dataset(tdpt.DPT_SEEDS["test"], a.n_itm,
                                                                     exclude_compositional=False),
                                      denoise_weight=ad.config.fused_denoise_weight if a.fused else 0.0)
        out["itm_pairs"] = rate(itm["overall"])
        out["itm_pairs_by_type"] = {k: rate(v) for k, v in itm["by_type"].items()}
        print("itm", out["itm_pairs"], flush=True)
    out["benchmarks"] = {}
    for name in (a.benchmarks.split(",") if "benchmarks" in parts else []):
        scorer = DPTFusedScorer() if a.fused else DPTTunedScorer() if a.tuned else DPTScorer()
        r = evaluate_matching(base, name, MatchOptions(), split="test", scorer=scorer, per_item=False)
        out["benchmarks"][name] = {k: r[k] for k in ("metrics", "by_type", "n_items", "unet_calls", "unet_evals",
                                                      "pairs", "unet_evals_per_pair")}
        print(name, r["metrics"], r["unet_evals_per_pair"], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / a.out).write_text(json.dumps(out, indent=1))


def weight_rule(weights: list[float], correct: list[int]) -> float:
    """The validation choice of the fused weight: the highest pair accuracy; ties: the longest run of adjacent grid
    weights that reach it, and in it the weight nearest (in log) to the run's geometric centre (0 when the run
    starts at 0: the adapter alone is as good)."""
    best = max(correct)
    runs = [[i for i, _ in g] for hit, g in itertools.groupby(enumerate(correct), key=lambda x: x[1] == best) if hit]
    run = max(runs, key=len)
    lo, hi = weights[run[0]], weights[run[-1]]
    if lo == 0:
        return 0.0
    centre = math.sqrt(lo * hi)
    return min((weights[i] for i in run), key=lambda w: abs(math.log(w / centre)))


def cmd_fuse_val(a, pipe) -> None:
    from interp.scorers.base import MatchOptions
    from interp.scorers.dpt_fused import DPTFusedScorer
    from interp.tasks.matching_eval import evaluate_matching

    tpipe, ad = tdpt.find_tuned(pipe)
    weights = [float(w) for w in a.weights.split(",")]
    scenes = world.sample_dataset(tdpt.DPT_SEEDS["validation"], a.n_itm, exclude_compositional=False)
    readings = tdpt.itm_pair_readings(tpipe, ad, scenes, noise_seed=a.noise_seed)
    rows = []
    for w in weights:
        acc = tdpt.pair_accuracy(readings, w)
        row = {"weight": w, "itm": rate(acc["overall"]), "itm_by_type": {k: rate(v) for k, v in acc["by_type"].items()},
               "train_splits": {}}
        for name in a.benchmarks.split(",") if a.benchmarks else []:
            r = evaluate_matching(pipe, name, MatchOptions(), split="train", scorer=DPTFusedScorer(denoise_weight=w),
                                  per_item=False)
            row["train_splits"][name] = r["metrics"]
        rows.append(row)
        print(w, row["itm"], {k: v for k, v in row["train_splits"].items()}, flush=True)
    chosen = weight_rule(weights, [r["itm"]["k"] for r in rows])
    alone = tdpt.pair_accuracy([{**r, "scores": [0.0] * len(r["scores"])} for r in readings], 1.0)
    print("denoising error alone", rate(alone["overall"]), flush=True)
    out = {"command": " ".join(sys.argv), "seed": tdpt.DPT_SEEDS["validation"], "n_scenes": a.n_itm,
           "noise_seed": a.noise_seed,
           "adapter": str(tdpt.tuned_dir_for(pipe)), "rows": rows,
           "denoise_alone": {"itm": rate(alone["overall"]),
                             "itm_by_type": {k: rate(v) for k, v in alone["by_type"].items()}},
           "chosen": {"weight": chosen,
                      "rule": "max pair accuracy (validation); ties: the weight nearest the geometric centre of the "
                              "longest tied run (bench.dpt_eval.weight_rule)"}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / a.out).write_text(json.dumps(out, indent=1))
    print("chosen", out["chosen"])
    if a.write:
        set_config(tdpt.tuned_dir_for(pipe), fused_denoise_weight=chosen)
        print("written to", tdpt.tuned_dir_for(pipe) / "config.json")


def cmd_selfcorr(a, pipe) -> None:
    from interp.tasks.generation_eval import NOISE_SEEDS, eval_prompts
    from interp.tasks.self_correction import best_of_n, best_of_seeds, generate_self_corrected
    from models.sampling import generate_images
    from models.shapes.checker import check

    prompts = [c for k, c in eval_prompts(a.split, a.n) if k in a.kinds.split(",")]
    seeds = [NOISE_SEEDS[a.split] + i for i in range(len(prompts))]
    pipe, ad = tdpt.find_reader(pipe, a.tuned)  # stage 2: all rows tuned
    steps = pipe.discolens_defaults.steps
    res: dict = {"command": " ".join(sys.argv), "split": a.split, "n": len(prompts), "kinds": a.kinds, "steps": steps,
                 "model": "dpt-tuned (stage 2)" if a.tuned else "base", "settings": {}}
    OUT.mkdir(parents=True, exist_ok=True)

    def record(name, imgs, calls, backwards=0, **extra):
        ok = [bool(check(im, c)["correct"]) for im, c in zip(imgs, prompts)]
        res["settings"][name] = {**rate({"k": sum(ok), "n": len(ok)}), "unet_calls_per_image": calls,
                                 "unet_backwards_per_image": backwards, "correct": ok, **extra}
        print(name, res["settings"][name]["rate"], res["settings"][name]["ci95"], calls, flush=True)
        (OUT / a.out).write_text(json.dumps(res, indent=1))  # after every setting: a stopped sweep keeps its rows

    grid = [(o, r, rd, float(e)) for o in a.objectives.split(",") for r in a.readings.split(",")
            for rd in a.reads.split(",") for e in a.etas.split(",") if e]
    if not a.skip_base:
        record("base", generate_images(pipe, prompts, seeds), steps)
    for objective, reading, read, eta in grid:
        imgs, trs = [], []
        t0 = time.time()
        for p, s in zip(prompts, seeds):
            im, tr = generate_self_corrected(pipe, p, s, eta=eta, reading=reading, adapter=ad,
                                             step_range=(a.start, a.stop), record_after=False, previews=False,
                                             objective=objective, read=read)
            imgs.append(im), trs.append(tr)
        name = (f"eta={eta:g},{reading}" + ("" if objective == "score" else f",{objective}")
                + ("" if read == "z_t" else f",read={read}")
                + ("" if (a.start, a.stop) == (0, None) else f",steps={a.start}:{a.stop or steps}"))
        record(name, imgs, trs[0].unet_calls, trs[0].unet_backwards,
               correction_rows=1 + len(trs[0].negatives),  # UNet rows per correction call
               seconds=round(time.time() - t0, 1))
    if a.best_of:
        imgs = []
        for i, p in enumerate(prompts):
            im, info = best_of_n(pipe, p, best_of_seeds(seeds[i], a.best_of), adapter=ad)
            imgs.append(im)
        record(f"best_of_{a.best_of}", imgs, info["unet_calls"])


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("val")
    v.add_argument("--work", required=True)
    v.add_argument("--ts", default="100,250,400")
    v.add_argument("--n-rec", type=int, default=30)
    v.add_argument("--n-itm", type=int, default=60)
    v.add_argument("--last", type=int, default=0)
    v.add_argument("--out", default="val_sweep.json")
    e = sub.add_parser("export")
    e.add_argument("--snap", required=True)
    e.add_argument("--t", type=int, required=True)
    t = sub.add_parser("test")
    t.add_argument("--n-rec", type=int, default=100)
    t.add_argument("--n-itm", type=int, default=200)
    t.add_argument("--benchmarks", default="winoground,comvg,counting,refcocog")
    t.add_argument("--out", default="test.json")
    t.add_argument("--parts", default="rec,itm,benchmarks", help="which readings: rec, itm, benchmarks")
    t.add_argument("--tuned", action="store_true", help="the stage-2 model (assets/adapters/<model>-dpt-lora)")
    t.add_argument("--fused", action="store_true", help="the stage-2 model fused with its denoising error (dpt_fused)")
    f = sub.add_parser("fuse-val")
    f.add_argument("--weights", default="0,0.05,0.1,0.15,0.2,0.3,0.5,0.7,1,1.5,2,3,5")
    f.add_argument("--n-itm", type=int, default=100)
    f.add_argument("--benchmarks", default="winoground,comvg,counting,refcocog", help="their train splits, reported")
    f.add_argument("--write", action="store_true", help="store the chosen weight in the shipped adapter's config")
    f.add_argument("--noise-seed", type=int, default=0, help="the noise draw of the pass (the scorers' default: 0)")
    f.add_argument("--out", default="fuse_validation.json")
    s = sub.add_parser("selfcorr")
    s.add_argument("--split", default="validation")
    s.add_argument("--n", type=int, default=40)
    s.add_argument("--kinds", default="count")
    s.add_argument("--etas", default="0.5,2")
    s.add_argument("--readings", default="noise_only")
    s.add_argument("--objectives", default="score", help="score (Eq. 9) and / or contrast (against the negatives)")
    s.add_argument("--reads", default="z_t", help="where the adapter reads: z_t (Eq. 9) and / or x0")
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--stop", type=int, default=None, help="last corrected step + 1 (default: all)")
    s.add_argument("--skip-base", action="store_true", help="no plain row (read it from an earlier file)")
    s.add_argument("--best-of", type=int, default=4)
    s.add_argument("--tuned", action="store_true", help="every row from the stage-2 model and its adapter")
    s.add_argument("--out", default="selfcorr_validation.json")
    a = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline(device="cpu")
    {"val": cmd_val, "export": cmd_export, "test": cmd_test, "fuse-val": cmd_fuse_val,
     "selfcorr": cmd_selfcorr}[a.cmd](a, pipe)


if __name__ == "__main__":
    main()
