"""Generation evaluation: the failure breakdown over checker verdicts of known renders."""
from __future__ import annotations

import json

import numpy as np
import pytest

from interp.tasks import generation_eval as ge
from interp.tasks.generation_eval import evaluate_generation, failure_breakdown, score_generations, summarize
from interp.stats import wilson_interval
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
    full = evaluate_generation(tiny_pipe, n_per_kind=2, steps=2, return_images=True)
    part = evaluate_generation(tiny_pipe, n_per_kind=2, steps=2, return_images=True, kinds=("count",))
    assert part["n"] == 2 and part["n_single"] == 0 and part["n_count"] == 2
    assert part["captions"] == full["captions"][-2:]
    for a, b in zip(part["images"], full["images"][-2:]):
        assert np.array_equal(np.asarray(a), np.asarray(b))


class _Pipe:
    """A stand-in pipeline: `generate_images` is monkeypatched, so only the defaults are read."""

    discolens_defaults = None


@pytest.fixture()
def clean_renders(monkeypatch):
    """`generate_images` replaced by clean renders of each caption; the seeds it got are recorded."""
    calls: list[list[int]] = []

    def fake(pipe, captions, seeds, steps=None, guidance=None):
        calls.append(list(seeds))
        rng = np.random.default_rng(0)
        return [world.render(world.scene_from_caption(c, rng)) for c in captions]

    monkeypatch.setattr(ge, "generate_images", fake)
    return calls


class TestEvaluateGenerationJson:
    def test_rates_come_with_n_and_wilson_intervals(self, clean_renders):
        """Every rate of the result has an interval entry with its k, n and Wilson 95 % interval."""
        res = json.loads(json.dumps(evaluate_generation(_Pipe(), n_per_kind=3)))
        assert res["n"] == 9 and res["split"] == "test"
        for kind in world.KINDS:
            iv = res["intervals"][kind]
            assert iv["n"] == res[f"n_{kind}"] == 3 and iv["rate"] == res[kind]
            assert iv["ci95"] == pytest.approx(list(wilson_interval(iv["k"], 3)))
        det, det_iv = res["details"], res["intervals"]["details"]
        assert det_iv["relation"]["objects_ok"]["rate"] == det["relation"]["objects_ok"]
        assert set(det_iv["count"]["count_ok_by_number"]) == set(det["count"]["count_ok_by_number"])

    def test_existing_keys_keep_their_values(self, clean_renders):
        """The rates, counts and details are those `summarize` always gave."""
        res = evaluate_generation(_Pipe(), n_per_kind=2, kinds=("single",))
        assert (res["single"], res["n_single"], res["n_relation"], res["relation"]) == (1.0, 2, 0, None)
        assert res["details"]["single"] == {"one_object": 1.0}
        assert res["intervals"]["relation"] == {"rate": None, "k": 0, "n": 0, "ci95": None}

    def test_test_split_uses_the_committed_prompts_and_seeds(self, clean_renders):
        """Default: test prompts (EVAL_SEED) with noise seeds 1234 + i."""
        res = evaluate_generation(_Pipe(), n_per_kind=2, return_images=True)
        assert res["captions"] == [c for _, c in ge.held_out_prompts(2, ge.EVAL_SEED)]
        assert clean_renders[-1] == list(range(1234, 1240))
        assert (res["seed"], res["prompt_seed"]) == (1234, ge.EVAL_SEED)

    def test_validation_split_uses_its_own_prompts_and_seeds(self, clean_renders):
        res = evaluate_generation(_Pipe(), n_per_kind=2, split="validation", return_images=True)
        assert res["captions"] == [c for _, c in ge.eval_prompts("validation", 2)]
        assert clean_renders[-1] == [ge.NOISE_SEEDS["validation"] + i for i in range(6)]
        assert (res["split"], res["prompt_seed"]) == ("validation", ge.EVAL_SEEDS["validation"])
