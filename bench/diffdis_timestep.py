"""DiffDis's discriminative-timestep ablation for the text denoiser, on VALIDATION scenes.

For each discriminative timestep (DiffDis: 0, 999 and the extra "1000"), train a text denoiser with the same
recipe and the same number of steps (frozen UNet, cached features; `models.training.text_diffusion`), then
judge its captions and VQA answers on the validation scenes (`evaluate_text_diffusion(split="validation")`,
never the test scenes). One JSON line per timestep: the timestep, the steps trained and the caption / VQA
rates (with n and Wilson intervals). Runs resume: each timestep has its own work
folder under --work; a finished adapter is evaluated again, not retrained.

    python -m bench.diffdis_timestep --timesteps 0 999 1000 --steps 1130 --out docs/measurements/text_diffusion/diffdis_timestep_val.jsonl

Note: in the frozen mode the "1000" embedding stays at its initialisation (the sinusoid of t = 1000, a
time embedding the UNet never saw in training) because the features are cached once; DiffDis learns it
jointly (the dual mode here). With the bundled zero-terminal-SNR schedule t = 999 is pure noise (abar = 0).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from interp.tasks.text_diffusion import evaluate_text_diffusion
from models import load_pipeline
from models.training.text_diffusion import EXTRA_TIMESTEP, TextDiffusionConfig, train_text_diffusion

DEFAULT_WORK = os.path.expanduser("~/.cache/discolens/diffdis_timestep")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 999, EXTRA_TIMESTEP])
    p.add_argument("--steps", type=int, default=1130, help="optimiser steps per timestep (equal for all)")
    p.add_argument("--n-scenes", dest="n_scenes", type=int, default=10_000, help="training scenes")
    p.add_argument("--n-val", dest="n_val", type=int, default=300, help="validation scenes judged")
    p.add_argument("--work", default=DEFAULT_WORK, help="work folder (caches, checkpoints, adapters)")
    p.add_argument("--reuse-cache", dest="reuse_cache", default=os.path.expanduser("~/.cache/discolens/text_diffusion"),
                   help="copy feature caches found here (same scenes, timestep, blocks) instead of rebuilding them")
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    p.add_argument("--train-kwargs", dest="train_kwargs", default="{}",
                   help="JSON of further TextDiffusionConfig fields (tests: small models)")
    a = p.parse_args(argv)
    bad = [t for t in a.timesteps if not 0 <= t <= EXTRA_TIMESTEP]
    if bad or a.steps < 1 or a.n_scenes < 1 or a.n_val < 1:
        p.error(f"timesteps must lie in 0..{EXTRA_TIMESTEP} (got {bad}); --steps, --n-scenes, --n-val >= 1")
    try:
        extra = json.loads(a.train_kwargs)
    except ValueError as e:
        p.error(f"--train-kwargs is not JSON: {e}")
    if a.threads:
        torch.set_num_threads(a.threads)

    pipe = load_pipeline(a.model)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(a.reuse_cache)
    for t in a.timesteps:
        for f in src.glob(f"*_t{t}_*.pt") if src.is_dir() else []:
            if not (work / f.name).exists():
                shutil.copy2(f, work / f.name)
        cfg = TextDiffusionConfig(timestep=t, steps=a.steps, n_scenes=a.n_scenes, work_dir=str(work),
                                  out_dir=str(work / f"adapter_t{t}"), model=a.model, threads=a.threads, **extra)
        t0 = time.time()
        train_text_diffusion(cfg, pipe)
        trained_min = (time.time() - t0) / 60
        res = evaluate_text_diffusion(pipe, n_scenes=a.n_val, split="validation", adapter=cfg.out_dir,
                                      ranking=False, progress=False)
        line = {"timestep": t, "steps": a.steps, "n_scenes_trained": a.n_scenes, "split": "validation",
                "train_minutes_this_call": round(trained_min, 1), "caption": res["caption"], "vqa": res["vqa"],
                "options": res["options"], "n_scenes": res["n_scenes"]}
        text = json.dumps(line)
        print(text, flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
