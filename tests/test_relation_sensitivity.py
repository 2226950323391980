"""bench/relation_sensitivity.py: the text-state distances it reports."""
from __future__ import annotations

import importlib.util

import torch

from conftest import ROOT

spec = importlib.util.spec_from_file_location("relation_sensitivity", ROOT / "bench" / "relation_sensitivity.py")
rs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rs)


def test_distances_are_finite_and_see_word_changes(tiny_pipe):
    d = rs.text_distances(tiny_pipe)
    assert set(d) == {"left_vs_right", "above_vs_below", "subject_color"}
    assert all(0 < v < 10 for v in d.values())


def test_an_encoder_blind_to_the_relation_reads_zero(tiny_pipe, monkeypatch):
    """States that depend only on the colors and shapes give 0 between opposite relations, > 0 for a color."""
    real = rs.encode

    def no_relation(pipe, prompts):
        cleaned = [p.replace("left of", "above").replace("right of", "above").replace("below", "above") for p in prompts]
        return real(pipe, cleaned)

    monkeypatch.setattr(rs, "encode", no_relation)
    d = rs.text_distances(tiny_pipe)
    assert d["left_vs_right"] < 1e-6 and d["above_vs_below"] < 1e-6 and d["subject_color"] > 1e-3
