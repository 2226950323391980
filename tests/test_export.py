"""Exports load back: the trace with its manifest, tables as JSON and CSV, figures as PNG."""
from __future__ import annotations

import csv
import json

import torch
from PIL import Image

from interp.tasks import export
from interp.tasks import workbench as wb


def test_generation_export_round_trip(tiny_pipe, tmp_path):
    """image.png, word_maps.png, trace.safetensors, manifest.json; the trace (queries too) loads back equal."""
    gen = wb.traced_generation(tiny_pipe, "a red circle", seed=0, steps=2, guidance=3.0)
    paths = export.export_generation(gen, tmp_path)
    assert [p.name for p in paths] == ["image.png", "word_maps.png", "trace.safetensors", "manifest.json"]
    assert Image.open(paths[0]).size == gen.image.size and Image.open(paths[1]).width > 100
    tr, manifest = export.load_trace_export(paths[-1])
    assert manifest["words"] == ["a", "red", "circle"] and manifest["settings"]["seed"] == 0
    assert manifest["shapes"][f"probs/{tr.layers[0].alias}"] == list(tr.probs[tr.layers[0].alias].shape)
    for k, v in gen.trace.probs.items():
        assert torch.equal(tr.probs[k], v) and torch.equal(tr.queries[k], gen.trace.queries[k])
    assert tr.tokens == gen.trace.tokens and tr.timesteps == gen.trace.timesteps


def test_table_export(tmp_path):
    """A table as JSON records and CSV rows; NaN becomes null."""
    j, c = export.export_table(["rank", "caption", "score"], [[1, "a red circle", 0.5], [2, "b", float("nan")]],
                               tmp_path, "ranking")
    assert json.loads(j.read_text()) == [{"rank": 1, "caption": "a red circle", "score": 0.5},
                                         {"rank": 2, "caption": "b", "score": None}]
    assert list(csv.reader(c.open()))[:2] == [["rank", "caption", "score"], ["1", "a red circle", "0.5"]]
