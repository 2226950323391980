"""Grounding evaluation plumbing: held-out scenes, binding detections to caption phrases."""
from __future__ import annotations

import numpy as np
import pytest

from interp.stats import wilson_interval
from interp.tasks.grounding_eval import held_out_scenes, pointing_intervals, scene_from_detections
from models.shapes import world
from models.shapes.checker import check


class TestHeldOut:
    def test_deterministic_and_cycles_kinds(self):
        """Same seed, same scenes; kinds cycle single, relation, count."""
        a, b = held_out_scenes(6), held_out_scenes(6)
        assert [s.caption for s in a] == [s.caption for s in b]
        assert [s.kind for s in a] == ["single", "relation", "count"] * 2

    def test_not_the_training_draw(self):
        """The held-out draw differs from the training data's seed-0 draw."""
        train = world.sample_dataset(0, 30)
        assert [s.caption for s in held_out_scenes(30)] != [s.caption for s in train]


class TestSceneFromDetections:
    @pytest.mark.parametrize("kind", world.KINDS)
    def test_clean_render_binds_to_the_same_objects(self, kind):
        """Detections of a clean render bind back to the scene's objects in phrase order."""
        s = world.sample_scene(np.random.default_rng(3), kind)
        got = scene_from_detections(s.caption, check(world.render(s), s.caption)["detections"])
        assert got is not None and got.caption == s.caption
        assert [(o.color, o.shape) for o in got.objects] == [(o.color, o.shape) for o in s.objects] or kind == "count"
        for o, t in zip(sorted(got.objects, key=lambda o: o.center), sorted(s.objects, key=lambda o: o.center)):
            assert abs(o.center[0] - t.center[0]) < 2 and abs(o.center[1] - t.center[1]) < 2

    def test_wrong_detections_do_not_bind(self):
        """A missing or extra object gives None."""
        s = world.sample_scene(np.random.default_rng(4), "relation")
        dets = check(world.render(s), s.caption)["detections"]
        assert scene_from_detections(s.caption, dets[:1]) is None
        assert scene_from_detections(s.caption, dets + dets[:1]) is None


class TestPointingIntervals:
    def test_per_class_counts_and_wilson_interval(self):
        """Pointing hits are counted per word class, each with its Wilson 95 % interval."""
        rows = [{"word_class": "color", "pointing": p} for p in (True, True, False, True)]
        rows += [{"word_class": "shape", "pointing": False}]
        res = pointing_intervals(rows)
        assert (res["color"]["k"], res["color"]["n"], res["color"]["rate"]) == (3, 4, 0.75)
        assert res["color"]["ci95"] == pytest.approx(list(wilson_interval(3, 4)))
        assert (res["shape"]["k"], res["shape"]["n"]) == (0, 1)
