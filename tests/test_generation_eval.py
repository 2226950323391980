"""Generation evaluation: the failure breakdown over checker verdicts of known renders."""
from __future__ import annotations

import numpy as np
import pytest

from interp.tasks.generation_eval import failure_breakdown, score_generations, summarize
from models.shapes import world


def _verdicts(pairs):
    """Checker verdicts of clean renders of `scene_caption` judged against `judged_caption`."""
    rng = np.random.default_rng(3)
    imgs = [world.render(world.scene_from_caption(scene_cap, rng)) for scene_cap, _ in pairs]
    return score_generations(imgs, [judged for _, judged in pairs])


class TestFailureBreakdown:
    def test_relation_split_into_objects_and_placement(self):
        """A flipped relation keeps objects_ok but loses relation_ok; a wrong color loses objects_ok."""
        pairs = [("a red circle left of a blue square", "a red circle left of a blue square"),
                 ("a red circle left of a blue square", "a red circle right of a blue square"),
                 ("a green circle left of a blue square", "a red circle left of a blue square")]
        v = _verdicts(pairs)
        d = failure_breakdown(["relation"] * 3, v)["relation"]
        assert d["two_objects"] == 1.0
        assert d["objects_ok"] == pytest.approx(2 / 3)
        assert d["relation_ok_given_objects"] == pytest.approx(1 / 2)

    def test_count_and_single(self):
        """Two drawn for three: count wrong; right number of the wrong color: attributes wrong given count."""
        pairs = [("two red circles", "three red circles"), ("two red circles", "two blue circles"),
                 ("two red circles", "two red circles"), ("a red circle", "a red circle")]
        v = _verdicts(pairs)
        res = summarize(["count", "count", "count", "single"], v)
        c = res["details"]["count"]
        assert c["count_ok"] == pytest.approx(2 / 3)
        assert c["attributes_ok_given_count"] == pytest.approx(1 / 2)
        assert res["details"]["single"]["one_object"] == 1.0 and res["single"] == 1.0
        assert res["count"] == pytest.approx(1 / 3)
        assert (c["too_few"], c["too_many"]) == (pytest.approx(1 / 3), 0.0)
        assert c["count_ok_by_number"] == {"2": 1.0, "3": 0.0}

    def test_empty_kind_gives_none(self):
        d = failure_breakdown([], [])
        assert d["relation"]["objects_ok"] is None and d["count"]["count_ok"] is None


def test_kinds_keep_the_seeds_of_the_full_evaluation(tiny_pipe):
    """Evaluating only the count prompts gives the same images as those prompts get in the full run."""
    from interp.tasks.generation_eval import evaluate_generation

    full = evaluate_generation(tiny_pipe, n_per_kind=2, steps=2, return_images=True)
    part = evaluate_generation(tiny_pipe, n_per_kind=2, steps=2, return_images=True, kinds=("count",))
    assert part["n"] == 2 and part["n_single"] == 0 and part["n_count"] == 2
    assert part["captions"] == full["captions"][-2:]
    for a, b in zip(part["images"], full["images"][-2:]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
