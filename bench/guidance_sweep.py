"""Guidance sweep on validation prompts: choose a model's default guidance without touching the test prompts.

`eval-generation` judges held-out prompts drawn with `EVAL_SEED` (the test set). This sweep draws its
prompts with another seed (`VAL_SEED`; training uses seed 0), so a default picked here is not fitted to the
test prompts. One JSON line per guidance value: the per-kind rates and the failure breakdown.

    python bench/guidance_sweep.py --model assets/models/shapes-v1 --guidance 2 3 --kinds count relation
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VAL_SEED = 20_011  # neither the training data's seed (0) nor the test prompts' (EVAL_SEED)


def main(argv: list[str] | None = None) -> int:
    from interp.tasks.generation_eval import EVAL_SEED, evaluate_generation
    from models.shapes import world

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="bundled model when omitted")
    p.add_argument("--guidance", type=float, nargs="+", required=True)
    p.add_argument("--kinds", nargs="+", default=list(world.KINDS), choices=list(world.KINDS))
    p.add_argument("--n-per-kind", type=int, default=50)
    p.add_argument("--prompt-seed", type=int, default=VAL_SEED)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.prompt_seed == EVAL_SEED:
        p.error("--prompt-seed is the test prompts' seed; a sweep must not choose on them")
    if a.n_per_kind < 1 or any(g < 0 for g in a.guidance):
        p.error("--n-per-kind must be >= 1 and guidance values >= 0")

    import torch

    from models import load_pipeline

    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    for g in a.guidance:
        res = evaluate_generation(pipe, n_per_kind=a.n_per_kind, guidance=g, seed=a.seed,
                                  prompt_seed=a.prompt_seed, kinds=a.kinds)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
