"""The Failures tab's tasks: wrong benchmark items with both captions and scores; rejected generations' reasons."""
from __future__ import annotations

import numpy as np
import pytest

from interp.scorers import MatchOptions
from interp.tasks import failures
from models.shapes.benchmarks import load_benchmark


class TestMatchingFailures:
    @pytest.mark.parametrize("name", ["comvg", "winoground"])
    def test_failures_are_the_items_scored_wrong(self, tiny_pipe, name):
        """Every failure's wrong caption scores at least its true caption; the count agrees with the metric."""
        b = load_benchmark(name)
        res = failures.matching_failures(tiny_pipe, b, MatchOptions(timesteps=(300,)), "lse", limit=6)
        assert res["n_items"] == 6 and res["benchmark"] == name
        for f in res["failures"]:
            assert f["wrong_score"] >= f["true_score"] and f["true_caption"] != f["wrong_caption"]
            assert f["category"] and f["image_path"].endswith(".png")
            assert f["scores"][f["captions"].index(f["true_caption"])] == f["true_score"]
        if name == "comvg":
            assert len(res["failures"]) == round(6 * (1 - res["metrics"]["accuracy"]))

    def test_failed_rows_rules(self):
        """Text failures name the best wrong caption; a group item right on text but wrong on images is found too."""
        M = np.array([[1.0, 2.0], [0.0, 3.0]])
        assert failures._failed_rows("group", M, [0, 1]) == [(0, 0, 1)]
        M = np.array([[2.0, 1.0], [3.0, 4.0]])  # text right for both images; caption 0 prefers image 1
        assert failures._failed_rows("group", M, [0, 1]) == [(0, 0, 1)]
        assert failures._failed_rows("pair", np.array([[1.0, 1.0]]), [0]) == [(0, 0, 1)]


class TestGenerationFailures:
    @pytest.mark.parametrize("verdict,reason", [
        ({"kind": "single", "detections": []}, "0 objects drawn, 1 asked"),
        ({"kind": "relation", "detections": [{"color": "red", "shape": "circle"}] * 2, "objects_ok": True,
          "relation_ok": False}, "wrong place"),
        ({"kind": "count", "detections": [{}] * 4, "asked": 3, "count_ok": False}, "too many: 4 objects drawn, 3 asked"),
    ])
    def test_reasons(self, verdict, reason):
        """The checker's verdict in a few words."""
        assert reason in failures.failure_reason(verdict)

    def test_generation_failures_on_the_tiny_model(self, tiny_pipe):
        """A random model fails (nearly) everything; each failure has its caption, seed, reason and image."""
        res = failures.generation_failures(tiny_pipe, n_per_kind=1, steps=2)
        assert res["n"] == 3 and len(res["failures"]) >= 1
        f = res["failures"][0]
        assert {"index", "kind", "caption", "seed", "reason", "image"} <= set(f) and f["image"].size == (64, 64)
