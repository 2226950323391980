"""bench/diffdis_timestep.py: one validation line per discriminative timestep, equal training, resumable."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import ROOT

spec = importlib.util.spec_from_file_location("diffdis_timestep", ROOT / "bench" / "diffdis_timestep.py")
dd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dd)

SMALL = json.dumps({"n_val": 4, "batch": 8, "hidden": 32, "layers": 1, "heads": 2, "val_every": 1,
                    "checkpoint_every": 1, "export_every": 1, "feature_batch": 8})


def test_one_validation_line_per_timestep_and_resume(tiny_pipe_dir, tmp_path, capsys):
    args = ["--model", str(tiny_pipe_dir), "--timesteps", "0", "1000", "--steps", "2", "--n-scenes", "16",
            "--n-val", "2", "--work", str(tmp_path / "w"), "--reuse-cache", str(tmp_path / "none"),
            "--out", str(tmp_path / "out.jsonl"), "--train-kwargs", SMALL]
    assert dd.main(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["timestep"] for x in lines] == [0, 1000]
    assert all(x["split"] == "validation" and x["steps"] == 2 for x in lines)
    assert all(x["caption"]["overall"]["n"] == 2 and x["vqa"]["overall"]["n"] > 0 for x in lines)
    saved = json.loads((tmp_path / "w" / "adapter_t1000" / "config.json").read_text())
    assert saved["timestep"] == 1000 and saved["trained_steps"] == 2
    # a second call finds the trained adapters and only evaluates again: same rates
    assert dd.main(args) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["caption"] for x in again] == [x["caption"] for x in lines]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("bad", [["--timesteps", "1001"], ["--steps", "0"], ["--train-kwargs", "{nope"]])
def test_bad_arguments_exit_2(bad, capsys):
    with pytest.raises(SystemExit) as e:
        dd.main(bad)
    assert e.value.code == 2
