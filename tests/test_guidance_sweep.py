"""bench/guidance_sweep.py: a line per guidance value, on validation prompts only."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT
from interp.tasks.generation_eval import EVAL_SEED, held_out_prompts

spec = importlib.util.spec_from_file_location("guidance_sweep", ROOT / "bench" / "guidance_sweep.py")
gs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gs)


def test_one_line_per_guidance_on_the_requested_kinds(tiny_pipe_dir, capsys):
    assert gs.main(["--model", str(tiny_pipe_dir), "--guidance", "1", "2", "--kinds", "count",
                    "--n-per-kind", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["guidance"] for x in lines] == [1.0, 2.0]
    assert all(x["n"] == x["n_count"] == 1 and x["prompt_seed"] == gs.VAL_SEED for x in lines)


def test_validation_prompts_differ_from_the_test_prompts():
    assert held_out_prompts(50, gs.VAL_SEED) != held_out_prompts(50, EVAL_SEED)


def test_refuses_the_test_prompts_seed(capsys):
    with pytest.raises(SystemExit) as e:
        gs.main(["--guidance", "2", "--prompt-seed", str(EVAL_SEED)])
    assert e.value.code == 2 and "test prompts" in capsys.readouterr().err
