"""bench/guidance_sweep.py: a line per guidance value, on validation prompts only."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT
from interp.tasks.generation_eval import EVAL_SEED, NOISE_SEEDS, eval_prompts

spec = importlib.util.spec_from_file_location("guidance_sweep", ROOT / "bench" / "guidance_sweep.py")
gs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gs)


def test_one_line_per_guidance_on_the_requested_kinds(tiny_pipe_dir, capsys):
    assert gs.main(["--model", str(tiny_pipe_dir), "--guidance", "1", "2", "--kinds", "count",
                    "--n-per-kind", "1"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["guidance"] for x in lines] == [1.0, 2.0]
    assert all(x["n"] == x["n_count"] == 1 and x["prompt_seed"] == gs.VAL_SEED for x in lines)
    assert all(x["split"] == "validation" and x["seed"] == NOISE_SEEDS["validation"] for x in lines)
    assert all(x["intervals"]["count"]["n"] == 1 for x in lines)


def test_validation_prompts_share_no_caption_with_the_test_prompts():
    assert not {c for _, c in eval_prompts("validation", 50)} & {c for _, c in eval_prompts("test", 100)}


def test_refuses_noise_seeds_of_the_test_prompts(capsys):
    """A --seed whose range meets the test's noise seeds (1234 + i) is refused."""
    with pytest.raises(SystemExit) as e:
        gs.main(["--guidance", "2", "--seed", "1200", "--n-per-kind", "20"])
    assert e.value.code == 2 and "noise seeds of the test" in capsys.readouterr().err


def test_refuses_the_test_prompts_seed(capsys):
    with pytest.raises(SystemExit) as e:
        gs.main(["--guidance", "2", "--prompt-seed", str(EVAL_SEED)])
    assert e.value.code == 2 and "test prompts" in capsys.readouterr().err
