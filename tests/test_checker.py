"""Tests of the scene checker (models/shapes/checker.py) on renders of the shapes world."""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np
import pytest

from models.shapes import checker, world

SEED = 2024
N_SCENES = 320
NOISE_SIGMA = 8.0  # in 0..255 units, i.e. 8/255


@pytest.fixture(scope="module")
def dataset() -> list[world.Scene]:
    return world.sample_dataset(SEED, N_SCENES)


@pytest.fixture(scope="module")
def renders(dataset) -> list[np.ndarray]:
    return [np.asarray(world.render(s)) for s in dataset]


@pytest.fixture(scope="module")
def results(dataset, renders) -> list[dict]:
    return [checker.check(im, s.caption) for s, im in zip(dataset, renders)]


@pytest.fixture(scope="module")
def negative_results(dataset, renders) -> dict[tuple[str, str], list[dict]]:
    """Checks of every render against each of its scene's negatives, keyed by (kind, negative type)."""
    out: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for s, im in zip(dataset[:200], renders[:200]):
        for key, neg in world.negatives(s).items():
            out[(s.kind, key)].append(checker.check(im, neg))
    return out


def _blank(size: int = world.IMAGE_SIZE) -> np.ndarray:
    return np.full((size, size, 3), world.BACKGROUND, np.uint8)


def _det(cx: float, cy: float, color: str = "red", shape: str = "circle") -> checker.Detection:
    box = (cx - 5, cy - 5, cx + 5, cy + 5)
    return checker.Detection(color, shape, box, (cx, cy), 80)


class TestAccuracy:
    def test_clean_renders_judged_correct(self, dataset, results):
        """At least 99% of clean renders (all kinds mixed) are judged correct against their own caption."""
        assert {s.kind for s in dataset} == set(world.KINDS)
        acc = np.mean([r["correct"] for r in results])
        assert acc >= 0.99, f"accuracy {acc:.3f}"

    def test_detections_match_scene_objects(self, dataset, results):
        """On at least 99% of clean renders the detected (color, shape) multiset equals the scene's."""
        same = [sorted((d["color"], d["shape"]) for d in r["detections"]) == sorted((o.color, o.shape) for o in s.objects)
                for s, r in zip(dataset, results)]
        assert np.mean(same) >= 0.99

    def test_detected_boxes_match_object_boxes(self, dataset, results):
        """Each detected box lies within 1.5 px of the nearest true object box (squares: of the drawn square)."""
        errors = []
        for s, r in zip(dataset, results):
            for d in r["detections"]:
                def err(o: world.Obj) -> float:
                    m = (o.box[2] - o.box[0]) * 0.06 if o.shape == "square" else 0.0
                    true = (o.box[0] + m, o.box[1] + m, o.box[2] - m, o.box[3] - m)
                    return max(abs(a - b) for a, b in zip(d["box"], true))
                errors.append(min(err(o) for o in s.objects))
        assert max(errors) <= 1.5

    def test_noisy_renders_judged_correct(self, dataset, renders):
        """With gaussian noise (sigma 8/255) added, at least 95% of renders are still judged correct."""
        rng = np.random.default_rng(0)
        ok = []
        for s, im in zip(dataset, renders):
            noisy = np.clip(im + rng.normal(0.0, NOISE_SIGMA, im.shape), 0, 255).round().astype(np.uint8)
            ok.append(checker.check(noisy, s.caption)["correct"])
        assert np.mean(ok) >= 0.95, f"accuracy {np.mean(ok):.3f}"

    def test_larger_renders_judged_correct(self, dataset):
        """Renders at 128x128 are judged correct as well (thresholds scale with the image size)."""
        ok = [checker.check(world.render(s, 128), s.caption)["correct"] for s in dataset[:40]]
        assert np.mean(ok) >= 0.975

    def test_size_word_judged_right(self, dataset, results):
        """size_ok is true for the single captions that name the object's size."""
        sized = [r for s, r in zip(dataset, results) if s.kind == "single" and s.size_word]
        assert sized
        assert np.mean([r["size_ok"] for r in sized]) >= 0.99


class TestNegatives:
    @pytest.mark.parametrize("kind, key", [
        ("relation", "swap_attributes"),
        ("relation", "swap_roles"),
        ("relation", "flip_relation"),
        ("relation", "subject_color"),
        ("relation", "object_color"),
        ("relation", "subject_shape"),
        ("relation", "object_shape"),
        ("count", "change_count"),
        ("count", "change_color"),
        ("count", "change_shape"),
        ("single", "change_color"),
        ("single", "change_shape"),
    ])
    def test_negative_caption_judged_incorrect(self, negative_results, kind, key):
        """A render judged against a hard negative of its scene is incorrect in at least 95% of cases."""
        res = negative_results[(kind, key)]
        assert len(res) >= 20
        rejected = np.mean([not r["correct"] for r in res])
        assert rejected >= 0.95, f"{kind}/{key}: rejected {rejected:.3f}"

    def test_flip_relation_blames_relation(self, negative_results):
        """Against flip_relation the objects are still found but the relation fails."""
        res = negative_results[("relation", "flip_relation")]
        assert np.mean([r["objects_ok"] and not r["relation_ok"] for r in res]) >= 0.95

    def test_change_count_blames_count(self, negative_results):
        """Against change_count the count fails."""
        res = negative_results[("count", "change_count")]
        assert np.mean([not r["count_ok"] for r in res]) >= 0.95

    def test_change_size_blames_size_only(self, negative_results):
        """Against change_size the single object is still correct but size_ok is false."""
        res = negative_results[("single", "change_size")]
        assert res
        assert np.mean([r["correct"] and not r["size_ok"] for r in res]) >= 0.95


class TestDetect:
    def test_blank_background_detects_nothing(self):
        """A background-only image has no detections."""
        assert checker.detect(_blank()) == []

    def test_blank_background_fails_every_kind(self):
        """A background-only image is incorrect for single, relation and count captions."""
        for caption in ["a red circle", "a red circle left of a blue square", "two red circles"]:
            assert not checker.check(_blank(), caption)["correct"]

    @pytest.mark.parametrize("rgb", [(0, 200, 200), (120, 120, 120), (30, 30, 30), (255, 255, 255)])
    def test_non_palette_colors_ignored(self, rgb):
        """A patch far from every palette color (or grey) is not detected."""
        im = _blank()
        im[10:30, 10:30] = rgb
        assert checker.detect(im) == []

    def test_tiny_specks_dropped(self):
        """A 3x3 palette-colored speck is below the minimum area."""
        im = _blank()
        im[10:13, 10:13] = world.COLORS["red"]
        assert checker.detect(im) == []

    def test_touching_objects_split_by_color(self):
        """Two touching patches of different colors are two detections."""
        im = _blank()
        im[10:30, 10:30] = world.COLORS["red"]
        im[10:30, 30:50] = world.COLORS["blue"]
        dets = checker.detect(im)
        assert [(d.color, d.shape) for d in dets] == [("red", "square"), ("blue", "square")]

    @pytest.mark.parametrize("shape", world.SHAPES)
    @pytest.mark.parametrize("color", world.COLORS)
    def test_each_color_and_shape_detected(self, color, shape):
        """A small object of every color and shape is detected as such."""
        o = world.Obj(color, shape, "small", (20.2, 30.6, 30.7, 41.1))
        dets = checker.detect(world.render(world.Scene("single", (o,), f"a {color} {shape}")))
        assert [(d.color, d.shape) for d in dets] == [(color, shape)]

    def test_pil_and_array_inputs_agree(self, dataset):
        """A PIL image and its uint8 array give the same detections."""
        img = world.render(dataset[0])
        assert checker.detect(img) == checker.detect(np.asarray(img))

    def test_detection_is_frozen(self):
        """Detection is an immutable record."""
        with pytest.raises(dataclasses.FrozenInstanceError):
            _det(10, 10).color = "blue"  # type: ignore[misc]

    def test_size_of_separates_small_and_big(self):
        """size_of calls extents of the small range small and of the big range big."""
        for shape in world.SHAPES:
            for size, ext in [("small", 10.5), ("small", 13.0), ("big", 18.0), ("big", 22.0)]:
                o = world.Obj("green", shape, size, (20.3, 20.3, 20.3 + ext, 20.3 + ext))
                (d,) = checker.detect(world.render(world.Scene("single", (o,), f"a green {shape}")))
                assert checker.size_of(d) == size, (shape, ext)


class TestRelations:
    @pytest.mark.parametrize("relation, holds", [("left of", True), ("right of", False), ("above", False),
                                                 ("below", False)])
    def test_horizontal_displacement(self, relation, holds):
        """A subject 30 px left (and 2 px lower) of the object is 'left of' it and nothing else."""
        assert checker.relation_holds(_det(10, 32), _det(40, 30), relation) is holds

    @pytest.mark.parametrize("relation, holds", [("left of", False), ("right of", False), ("above", False),
                                                 ("below", True)])
    def test_dominant_axis_decides(self, relation, holds):
        """A subject 10 px right and 20 px below the object is only 'below' it."""
        assert checker.relation_holds(_det(40, 40), _det(30, 20), relation) is holds

    def test_identical_phrases_either_assignment(self):
        """'a red circle left of a red circle' holds for two red circles side by side."""
        a = world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0))
        b = world.Obj("red", "circle", "small", (40.0, 22.0, 52.0, 34.0))
        im = world.render(world.Scene("relation", (a, b), "a red circle left of a red circle", "left of"))
        assert checker.check(im, "a red circle left of a red circle")["correct"]

    def test_three_objects_fail_relation(self):
        """A relation caption is incorrect when a third object is present."""
        objs = (world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0)),
                world.Obj("blue", "square", "small", (40.0, 20.0, 52.0, 32.0)),
                world.Obj("green", "triangle", "small", (25.0, 45.0, 37.0, 57.0)))
        im = world.render(world.Scene("count", objs, "three red circles"))
        res = checker.check(im, "a red circle left of a blue square")
        assert not res["correct"] and not res["objects_ok"]

    @pytest.mark.parametrize("relation, relation_ok", [("left of", True), ("right of", False)])
    def test_wrong_object_color_still_judges_relation(self, relation, relation_ok):
        """With one wrong color the unambiguous assignment still decides relation_ok (objects_ok false)."""
        a = world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0))
        b = world.Obj("blue", "square", "big", (36.0, 18.0, 56.0, 38.0))
        im = world.render(world.Scene("relation", (a, b), "a red circle left of a blue square", "left of"))
        res = checker.check(im, f"a red circle {relation} a green square")
        assert (res["objects_ok"], res["relation_ok"], res["correct"]) == (False, relation_ok, False)

    def test_ambiguous_assignment_fails_relation(self):
        """When both assignments agree equally with the phrases, relation_ok is false."""
        a = world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0))
        b = world.Obj("blue", "circle", "small", (40.0, 20.0, 52.0, 32.0))
        im = world.render(world.Scene("relation", (a, b), "a red circle left of a blue circle", "left of"))
        res = checker.check(im, "a red circle left of a red circle")
        assert (res["objects_ok"], res["relation_ok"]) == (False, False)


class TestCheckApi:
    def test_accepts_scene(self, dataset, renders):
        """check takes a Scene in place of its caption and gives the same verdict."""
        assert checker.check(renders[0], dataset[0]) == checker.check(renders[0], dataset[0].caption)

    def test_rejects_out_of_grammar_caption(self):
        """An out-of-grammar caption raises world.CaptionError."""
        with pytest.raises(world.CaptionError):
            checker.check(_blank(), "a red circle next to a blue square")

    def test_result_fields_per_kind(self, dataset, results):
        """Each kind reports its own detail fields next to kind, correct and detections."""
        fields = {"single": set(), "relation": {"objects_ok", "relation_ok"}, "count": {"count_ok", "asked", "found"}}
        for s, r in zip(dataset, results):
            extra = {"size_ok"} if s.kind == "single" and s.size_word else set()
            assert set(r) == {"kind", "caption", "correct", "detections"} | fields[s.kind] | extra
            assert r["kind"] == s.kind

    def test_detections_are_plain_dicts(self, results):
        """Detections come back as dicts with color, shape, box, center and area."""
        d = results[0]["detections"][0]
        assert set(d) == {"color", "shape", "box", "center", "area"}

    def test_count_reports_found(self):
        """A count caption with one object too many reports count_ok false and the matching number found."""
        objs = tuple(world.Obj("orange", "square", "small", (x, 20.0, x + 12.0, 32.0)) for x in (4.0, 26.0, 48.0))
        im = world.render(world.Scene("count", objs, "three orange squares"))
        res = checker.check(im, "two orange squares")
        assert (res["count_ok"], res["found"], res["correct"]) == (False, 3, False)


def _with_blob(image, box, rgb, kind: str = "ellipse") -> np.ndarray:
    """A copy of the image with a filled ellipse / rectangle drawn with PIL (no anti-aliasing)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.asarray(image)).copy()
    getattr(ImageDraw.Draw(im), kind)(box, fill=rgb)
    return np.asarray(im)


def _single(color: str = "red", shape: str = "circle", size: str = "big", box=(20.0, 20.0, 40.0, 40.0)) -> np.ndarray:
    o = world.Obj(color, shape, size, box)
    return np.asarray(world.render(world.Scene("single", (o,), f"a {color} {shape}")))


OFF_PALETTE = [(128, 128, 128), (60, 60, 60), (195, 195, 195), (140, 90, 40)]  # greys, brown


class TestStrict:
    def test_default_is_strict_false(self, dataset, renders):
        """check(..., strict=False) is the default mode."""
        for s, im in zip(dataset[:20], renders[:20]):
            assert checker.check(im, s.caption) == checker.check(im, s.caption, strict=False)

    def test_clean_renders_judged_correct(self, dataset, renders):
        """Strict mode judges at least 99% of clean renders correct (size words included)."""
        ok = [checker.check(im, s.caption, strict=True)["correct"] for s, im in zip(dataset[:160], renders[:160])]
        assert np.mean(ok) >= 0.99

    def test_noisy_renders_have_no_unknown_objects(self, dataset, renders):
        """Gaussian noise (sigma 8/255) on renders adds no unknown objects and no unknown shapes."""
        rng = np.random.default_rng(1)
        for s, im in zip(dataset[:60], renders[:60]):
            noisy = np.clip(im + rng.normal(0.0, NOISE_SIGMA, im.shape), 0, 255).round().astype(np.uint8)
            res = checker.check(noisy, s.caption, strict=True)
            assert res["unknown_objects"] == [] and all(d["shape"] != "unknown" for d in res["detections"])

    def test_result_fields(self):
        """Strict mode keeps the default keys and adds strict, unknown_objects, shape_fits and n_objects."""
        im = _single()
        default, strict = checker.check(im, "a red circle"), checker.check(im, "a red circle", strict=True)
        assert set(strict) == set(default) | {"strict", "unknown_objects", "shape_fits", "n_objects"}
        assert set(strict["detections"][0]) == set(default["detections"][0])
        assert strict["n_objects"] == 1 and len(strict["shape_fits"]) == 1

    @pytest.mark.parametrize("rgb", OFF_PALETTE)
    def test_off_palette_blob_fails_single(self, rgb):
        """An off-palette or grey ellipse beside the object: default passes, strict fails with one unknown object."""
        im = _with_blob(_single(), (4, 46, 16, 56), rgb)
        assert checker.check(im, "a red circle")["correct"]
        res = checker.check(im, "a red circle", strict=True)
        assert not res["correct"] and len(res["unknown_objects"]) == 1 and res["n_objects"] == 2

    def test_off_palette_blob_fails_relation(self):
        """A grey blob next to a correct relation render: strict objects_ok is false, the relation still judged."""
        a = world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0))
        b = world.Obj("blue", "square", "big", (36.0, 18.0, 56.0, 38.0))
        cap = "a red circle left of a blue square"
        im = _with_blob(world.render(world.Scene("relation", (a, b), cap, "left of")), (20, 46, 32, 58), (128, 128, 128))
        assert checker.check(im, cap)["correct"]
        res = checker.check(im, cap, strict=True)
        assert (res["objects_ok"], res["relation_ok"], res["correct"]) == (False, True, False)

    def test_off_palette_blob_breaks_count(self):
        """A brown blob beside two orange squares: strict count_ok is false (three objects), found stays 2."""
        objs = tuple(world.Obj("orange", "square", "small", (x, 8.0, x + 12.0, 20.0)) for x in (6.0, 40.0))
        im = _with_blob(world.render(world.Scene("count", objs, "two orange squares")), (24, 40, 38, 54), (140, 90, 40))
        assert checker.check(im, "two orange squares")["correct"]
        res = checker.check(im, "two orange squares", strict=True)
        assert (res["count_ok"], res["found"], res["correct"]) == (False, 2, False)

    def test_small_speck_counts_in_strict(self):
        """A 3x3 palette speck, dropped by default, is an unknown object in strict mode."""
        im = _single().copy()
        im[50:53, 5:8] = world.COLORS["blue"]
        assert checker.check(im, "a red circle")["correct"]
        res = checker.check(im, "a red circle", strict=True)
        assert not res["correct"] and [u["area"] for u in res["unknown_objects"]] == [9]

    def test_blank_background_has_no_unknown_objects(self):
        """A background-only image has no unknown objects."""
        assert checker.unknown_objects(_blank()) == []

    def test_object_edges_are_not_unknown(self):
        """The anti-aliased edge of every color and shape is explained by its object (renders at 64 and 128)."""
        for color in world.COLORS:
            for shape in world.SHAPES:
                o = world.Obj(color, shape, "big", (20.3, 20.7, 41.1, 41.5))
                for size in (64, 128):
                    assert checker.unknown_objects(world.render(world.Scene("single", (o,), ""), size)) == []

    def test_poor_fit_is_unknown_shape(self):
        """A plus sign gets some shape by default but is an unknown shape (fit below MIN_SHAPE_FIT) in strict mode."""
        im = _with_blob(_blank(), (26, 14, 34, 50), world.COLORS["red"], "rectangle")
        im = _with_blob(im, (12, 28, 48, 36), world.COLORS["red"], "rectangle")
        (d,) = checker.detect(im)
        assert checker.check(im, f"a red {d.shape}")["correct"]
        res = checker.check(im, f"a red {d.shape}", strict=True)
        assert res["detections"][0]["shape"] == "unknown" and res["shape_fits"][0] < checker.MIN_SHAPE_FIT
        assert not res["correct"]

    def test_elongated_blob_is_unknown_shape(self):
        """A 40x14 ellipse is a circle by default and an unknown shape (box aspect > MAX_ASPECT) in strict mode."""
        im = _with_blob(_blank(), (10, 25, 50, 39), world.COLORS["blue"])
        assert checker.check(im, "a blue circle")["correct"]
        assert not checker.check(im, "a blue circle", strict=True)["correct"]

    @pytest.mark.parametrize("size, other", [("big", "small"), ("small", "big")])
    def test_wrong_size_word_fails(self, size, other):
        """A render of one size against the other size word: default correct (size_ok false), strict fails."""
        box = (20.0, 20.0, 41.0, 41.0) if size == "big" else (20.0, 20.0, 31.5, 31.5)
        im = _single(size=size, box=box)
        default = checker.check(im, f"a {other} red circle")
        assert default["correct"] and not default["size_ok"]
        assert not checker.check(im, f"a {other} red circle", strict=True)["correct"]
        assert checker.check(im, f"a {size} red circle", strict=True)["correct"]

    def test_unknown_objects_scale_with_image_size(self):
        """At 128x128 the same grey blob (scaled) is an unknown object too."""
        o = world.Obj("red", "circle", "big", (20.0, 20.0, 40.0, 40.0))
        im = _with_blob(world.render(world.Scene("single", (o,), "a red circle"), 128), (8, 92, 32, 112), (128, 128, 128))
        res = checker.check(im, "a red circle", strict=True)
        assert len(res["unknown_objects"]) == 1 and not res["correct"]
