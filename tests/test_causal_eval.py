"""interp.tasks.causal_eval: planning, judging and the paired comparison (tiny pipeline, fast)."""
from __future__ import annotations

import numpy as np
import pytest

from models.shapes import world
from models.shapes.checker import check

from interp.tasks import causal_eval as ce


def _det(color: str, shape: str, cx: float, cy: float) -> dict:
    return {"color": color, "shape": shape, "center": (cx, cy), "box": (cx - 5, cy - 5, cx + 5, cy + 5), "area": 80}


BASE = [_det("red", "circle", 16, 32), _det("blue", "square", 48, 32)]


class TestJudge:
    def test_unchanged(self):
        """The same detections: nothing changed."""
        j = ce.judge_edit(BASE, BASE, 0, "color")
        assert j["status"] == "unchanged" and not j["changed"] and not j["only"]

    def test_recolored_only(self):
        """The target changes color in place, the other object stays: a specific, sole change."""
        j = ce.judge_edit(BASE, [_det("green", "circle", 17, 32), BASE[1]], 0, "color")
        assert j["status"] == "recolored" and j["only"] and j["specific"]

    def test_gone(self):
        """The target vanishes, the other stays."""
        j = ce.judge_edit(BASE, [BASE[1]], 0, "shape")
        assert j["status"] == "gone" and j["only"] and j["specific"]

    def test_moved(self):
        """The target reappears far away with its attributes."""
        j = ce.judge_edit(BASE, [_det("red", "circle", 16, 60), BASE[1]], 0, "shape")
        assert j["status"] == "moved" and j["only"] and not j["specific"]

    def test_other_object_changed_is_not_only(self):
        """A change of the other object too breaks 'only'."""
        j = ce.judge_edit(BASE, [_det("green", "circle", 16, 32), _det("blue", "triangle", 48, 32)], 0, "color")
        assert j["changed"] and not j["others_kept"] and not j["only"]

    def test_extra_object_is_not_only(self):
        """A new object appearing breaks 'only'."""
        j = ce.judge_edit(BASE, [_det("green", "circle", 16, 32), BASE[1], _det("red", "square", 32, 8)], 0, "color")
        assert j["extra"] == 1 and not j["only"]


class TestPlan:
    def test_plans_color_and_shape_words_of_correct_baselines(self):
        """A correctly rendered relation scene gives 4 words x 2 variants; the boxes hold the objects."""
        scene = world.sample_scene(np.random.default_rng(3), "relation")
        v = check(world.render(scene), scene.caption)
        assert v["objects_ok"]
        plan = ce.plan_edits([scene.caption], ["relation"], [v], (64, 64))
        assert len(plan) == 8
        words = scene.caption.split()
        assert {words[e.word] for e in plan} == {o.color for o in scene.objects} | {o.shape for o in scene.objects}
        for e in plan:
            if e.variant == "box":
                det = v["detections"][e.target]
                x0, y0, x1, y1 = e.box
                assert x0 * 64 <= det["center"][0] <= x1 * 64 and y0 * 64 <= det["center"][1] <= y1 * 64
                assert (det["color"], det["shape"])[e.role == "shape"] == words[e.word]

    def test_wrong_baseline_skipped(self):
        """A baseline the checker rejects plans no edit."""
        v = {"correct": False, "objects_ok": False, "detections": []}
        assert ce.plan_edits(["a red circle left of a blue square"], ["relation"], [v], (64, 64)) == []


class TestStatistics:
    def test_rates_carry_a_wilson_interval(self):
        """A rate holds its Wilson interval, which contains the observed rate; none for n = 0."""
        lo, hi = ce._rate(7, 20)["ci95"]
        assert lo < 0.35 < hi
        assert ce._rate(0, 0)["ci95"] is None

    def test_compare_models_counts_discordant_pairs(self):
        """McNemar counts only the pairs where the models disagree, on shared keys."""
        a = {"cases": [{"key": str(i), "variant": "global", "only": i < 6} for i in range(10)]}
        b = {"cases": [{"key": str(i), "variant": "global", "only": i < 2} for i in range(12)]}
        r = ce.compare_models(a, b)["global"]
        assert (r["n_pairs"], r["a_only"], r["b_only"]) == (10, 4, 0)
        assert r["mcnemar_p"] == pytest.approx(0.125)


def _held_out_renders(n: int, seed: int) -> dict:
    """Caption -> exact render of the held-out scenes `held_out_prompts(n, seed)` draws (same rng stream)."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind in world.KINDS:
        for _ in range(n):
            sc = world.sample_scene(rng, kind)
            out.setdefault(sc.caption, world.render(sc))
    return out


class TestEvaluate:
    def test_runs_on_tiny_pipeline(self, tiny_pipe, monkeypatch):
        """End to end on the tiny pipeline: baselines judged, every planned edit generated and judged."""
        calls = []
        real = ce._generate
        renders = _held_out_renders(2, ce.CAUSAL_SEED)

        def generate(pipe, captions, seeds, edits, steps, guidance, batch_size):
            imgs = real(pipe, captions, seeds, edits, steps, guidance, batch_size)
            calls.append(len(imgs))
            if all(e is None for e in edits):  # the random tiny model draws noise: judge exact renders instead
                return [renders[c] for c in captions]
            return imgs

        monkeypatch.setattr(ce, "_generate", generate)
        res = ce.evaluate_interventions(tiny_pipe, n_prompts=2, steps=2, guidance=3.0, batch_size=4)
        assert res["n_baselines"] == 4 and calls[0] == 4
        assert res["cases"] and calls[1] == len(res["cases"])
        assert {c["variant"] for c in res["cases"]} == {"global", "box"}
        assert set(res["summary"]) == {"global", "box"}
        assert all(c["status"] in ("unchanged", "recolored", "reshaped", "replaced", "moved",
                                   "replaced_elsewhere", "gone") for c in res["cases"])
