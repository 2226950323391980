"""Guidance sweep on validation prompts: choose a model's default guidance without touching the test prompts.

`eval-generation` judges the test split. This sweep judges the validation split
(`interp.tasks.generation_eval.eval_prompts("validation", n)`): prompts drawn with their own seed, no caption
of the test split among them, and generation noise seeds from a range the test's never enters, so a default
picked here is not fitted to the test prompts (docs/protocol.md). One JSON line per guidance value: the
per-kind rates, their Wilson intervals and the failure breakdown.

    python -m bench.guidance_sweep --model assets/models/shapes-v1 --guidance 2 3 --kinds count relation
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from interp.tasks.generation_eval import (
    EVAL_SEED, EVAL_SEEDS, NOISE_SEEDS, TEST_N_PER_KIND, evaluate_generation,
)
from models import load_pipeline
from models.shapes import world

VAL_SEED = EVAL_SEEDS["validation"]  # the validation prompts' seed (neither the training data's 0 nor the test's)
VAL_NOISE_SEED = NOISE_SEEDS["validation"]  # validation prompt i is generated with seed VAL_NOISE_SEED + i
TEST_NOISE = range(NOISE_SEEDS["test"], NOISE_SEEDS["test"] + 3 * TEST_N_PER_KIND)  # the test split's noise seeds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="bundled model when omitted")
    p.add_argument("--guidance", type=float, nargs="+", required=True)
    p.add_argument("--kinds", nargs="+", default=list(world.KINDS), choices=list(world.KINDS))
    p.add_argument("--n-per-kind", type=int, default=50)
    p.add_argument("--prompt-seed", type=int, default=VAL_SEED)
    p.add_argument("--seed", type=int, default=VAL_NOISE_SEED, help="noise seed of prompt 0")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.prompt_seed == EVAL_SEED:
        p.error("--prompt-seed is the test prompts' seed; a sweep must not choose on them")
    if a.n_per_kind < 1 or any(g < 0 for g in a.guidance):
        p.error("--n-per-kind must be >= 1 and guidance values >= 0")
    if a.seed < TEST_NOISE.stop and TEST_NOISE.start < a.seed + 3 * a.n_per_kind:
        p.error(f"--seed {a.seed} reuses noise seeds of the test prompts ({TEST_NOISE.start}..{TEST_NOISE.stop - 1})")

    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    for g in a.guidance:
        res = evaluate_generation(pipe, n_per_kind=a.n_per_kind, guidance=g, seed=a.seed,
                                  prompt_seed=a.prompt_seed, kinds=a.kinds, split="validation")
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
