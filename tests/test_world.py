"""Tests of the shapes world (models/shapes/world.py): sampling, rendering, captions, negatives, masks."""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest

from models.shapes import world

SEED = 123
N_SCENES = 200


@pytest.fixture(scope="module")
def dataset() -> list[world.Scene]:
    return world.sample_dataset(SEED, N_SCENES)


def _of_kind(dataset: list[world.Scene], kind: str) -> list[world.Scene]:
    scenes = [s for s in dataset if s.kind == kind]
    assert scenes, f"the dataset has no {kind} scene"
    return scenes


def _boxes_overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


class TestDeterminism:
    def test_same_seed_gives_same_scenes(self):
        """Two datasets drawn with the same seed hold equal scene records."""
        assert world.sample_dataset(7, 40) == world.sample_dataset(7, 40)

    def test_same_seed_gives_identical_pixels(self):
        """Renders of two same-seed datasets are pixel-identical."""
        a, b = world.sample_dataset(7, 20), world.sample_dataset(7, 20)
        for sa, sb in zip(a, b):
            np.testing.assert_array_equal(np.asarray(world.render(sa)), np.asarray(world.render(sb)))

    def test_different_seed_gives_different_scenes(self):
        """Datasets drawn with different seeds differ in captions and layouts."""
        a, b = world.sample_dataset(7, 40), world.sample_dataset(8, 40)
        assert [s.caption for s in a] != [s.caption for s in b]
        assert sum(sa.objects != sb.objects for sa, sb in zip(a, b)) > 30

    def test_different_seed_gives_different_pixels(self):
        """Renders of datasets with different seeds are not identical."""
        a, b = world.sample_dataset(7, 5), world.sample_dataset(8, 5)
        assert any(not np.array_equal(np.asarray(world.render(x)), np.asarray(world.render(y))) for x, y in zip(a, b))

    def test_dataset_mixes_all_kinds(self, dataset):
        """The default mix yields single, relation and count scenes."""
        assert {s.kind for s in dataset} == set(world.KINDS)


class TestCaptionRoundTrip:
    def test_sampled_captions_parse_to_their_kind(self, dataset):
        """Every sampled caption parses back to its scene's kind."""
        for s in dataset:
            assert world.parse_caption(s.caption).kind == s.kind, s.caption

    def test_single_captions_parse_to_their_object(self, dataset):
        """Single captions parse to the object's color and shape, and its size iff the caption names it."""
        for s in _of_kind(dataset, "single"):
            (ph,) = world.parse_caption(s.caption).phrases
            o = s.objects[0]
            assert (ph.color, ph.shape, ph.count) == (o.color, o.shape, 1)
            assert ph.size == (o.size if s.size_word else None)

    def test_relation_captions_parse_to_subject_object_and_relation(self, dataset):
        """Relation captions parse to subject, object (in order) and the scene's relation."""
        for s in _of_kind(dataset, "relation"):
            p = world.parse_caption(s.caption)
            assert [(ph.color, ph.shape) for ph in p.phrases] == [(o.color, o.shape) for o in s.objects]
            assert p.relation == s.relation

    def test_count_captions_parse_to_number_of_objects(self, dataset):
        """Count captions parse to the number, color and shape of the scene's objects."""
        for s in _of_kind(dataset, "count"):
            (ph,) = world.parse_caption(s.caption).phrases
            assert ph.count == len(s.objects)
            assert {(o.color, o.shape) for o in s.objects} == {(ph.color, ph.shape)}


class TestGrammar:
    def test_single(self):
        """'a COLOR SHAPE' is a single caption without size whose content words are color and shape."""
        p = world.parse_caption("a red circle")
        assert p.kind == "single"
        assert p.phrases == (world.Phrase("red", "circle", None, 1, (1, 2)),)

    @pytest.mark.parametrize("size", world.SIZES)
    def test_single_with_size(self, size):
        """'a SIZE COLOR SHAPE' is a single caption carrying the size word."""
        p = world.parse_caption(f"a {size} blue square")
        assert p.kind == "single"
        assert p.phrases == (world.Phrase("blue", "square", size, 1, (1, 2, 3)),)

    @pytest.mark.parametrize("relation", world.RELATIONS)
    def test_relation(self, relation):
        """Each relation parses with its words indexed and both phrases pointing at their own words."""
        p = world.parse_caption(f"a green triangle {relation} a purple circle")
        assert (p.kind, p.relation) == ("relation", relation)
        assert " ".join(p.words[i] for i in p.relation_idx) == relation
        subj, obj = p.phrases
        assert [p.words[i] for i in subj.word_idx] == ["green", "triangle"]
        assert [p.words[i] for i in obj.word_idx] == ["purple", "circle"]

    @pytest.mark.parametrize("number, n", sorted(world.NUMBERS.items()))
    def test_plural_count(self, number, n):
        """'NUMBER COLOR SHAPEs' is a count caption of that number."""
        p = world.parse_caption(f"{number} yellow triangles")
        assert p.kind == "count"
        assert p.phrases == (world.Phrase("yellow", "triangle", None, n, (0, 1, 2)),)

    def test_case_and_spacing_are_normalized(self):
        """Upper case and repeated spaces do not change the parse."""
        assert world.parse_caption("  A Red   Circle ") == world.parse_caption("a red circle")

    @pytest.mark.parametrize("caption", [
        "",
        "a red",
        "red circle",
        "a pink circle",
        "a huge red circle",
        "a red hexagon",
        "a red circles",
        "two red circle",
        "four red circles",
        "one red circle",
        "a red circle near a blue square",
        "a red circle left a blue square",
        "a red circle left of blue square",
        "a small red circle left of a blue square",
        "a red circle and a blue square",
    ])
    def test_rejects_out_of_grammar(self, caption):
        """Captions outside the grammar raise CaptionError."""
        with pytest.raises(world.CaptionError):
            world.parse_caption(caption)

    def test_caption_error_is_value_error(self):
        """CaptionError can be caught as a ValueError."""
        with pytest.raises(ValueError):
            world.parse_caption("a red dodecahedron")


class TestLayout:
    def test_relation_scenes_satisfy_their_relation(self, dataset):
        """Subject - object center displacement points along the relation's direction and dominates."""
        for s in _of_kind(dataset, "relation"):
            (ax, ay), (bx, by) = s.objects[0].center, s.objects[1].center
            ux, uy = world.REL_DIRECTION[s.relation]
            dx, dy = ax - bx, ay - by
            along, across = dx * ux + dy * uy, abs(dx * uy - dy * ux)
            assert along > 0 and along > across, s

    def test_objects_lie_inside_the_image(self, dataset):
        """Every object box lies inside the 64x64 image."""
        for s in dataset:
            for o in s.objects:
                x0, y0, x1, y1 = o.box
                assert 0 <= x0 < x1 <= world.IMAGE_SIZE and 0 <= y0 < y1 <= world.IMAGE_SIZE, o

    def test_object_boxes_do_not_overlap(self, dataset):
        """No two object boxes of a scene overlap."""
        for s in dataset:
            for a, b in itertools.combinations(s.objects, 2):
                assert not _boxes_overlap(a.box, b.box), s

    def test_object_masks_do_not_overlap(self, dataset):
        """No pixel is covered by two objects of a scene."""
        for s in dataset[:60]:
            m = world.object_masks(s)
            assert ((m > 0).sum(0) <= 1).all(), s.caption

    def test_object_extent_matches_size(self, dataset):
        """Each object's extent lies in its size's SIZE_PX range."""
        for s in dataset:
            for o in s.objects:
                lo, hi = world.SIZE_PX[o.size]
                assert lo <= o.box[2] - o.box[0] <= hi and lo <= o.box[3] - o.box[1] <= hi, o

    def test_count_objects_share_size(self, dataset):
        """All objects of a count scene have the same color, shape and size."""
        for s in _of_kind(dataset, "count"):
            assert len({(o.color, o.shape, o.size) for o in s.objects}) == 1

    def test_render_paints_object_colors(self, dataset):
        """The pixel at each object's center has the object's palette color; the corner is background."""
        for s in dataset[:60]:
            im = np.asarray(world.render(s))
            for o in s.objects:
                cx, cy = o.center
                assert tuple(im[int(cy), int(cx)]) == world.COLORS[o.color], (s.caption, o)
            corners = [tuple(im[y, x]) for y in (0, -1) for x in (0, -1)]
            assert world.BACKGROUND in corners

    @staticmethod
    def _mask_area(shape: str, ext: float = 20.0) -> float:
        o = world.Obj("red", shape, "big", (10.3, 12.7, 10.3 + ext, 12.7 + ext))
        return float(world.object_masks(world.Scene("single", (o,), f"a red {shape}"))[0].sum())

    @pytest.mark.parametrize("shape, area_factor", [("circle", math.pi / 4), ("square", 0.88**2), ("triangle", 0.5)])
    def test_object_mask_area_matches_shape(self, shape, area_factor):
        """An object's mask area matches its shape's geometric area for its extent."""
        # PIL fills shapes edge-inclusively: about a third of a pixel more extent than the box (+3-5% at 20 px)
        ratio = self._mask_area(shape) / (area_factor * 20.0**2)
        assert 0.98 <= ratio <= 1.07

    def test_square_area_matches_circle_area(self):
        """A square and a circle of the same (big) extent cover the same area within 2% (the inset's purpose)."""
        assert self._mask_area("square") == pytest.approx(self._mask_area("circle"), rel=0.02)

    def test_scene_from_caption_satisfies_caption(self):
        """scene_from_caption lays out exactly the caption's objects and relation."""
        rng = np.random.default_rng(0)
        for caption in ["a small red circle", "a blue square below a green triangle", "three purple circles"]:
            s = world.scene_from_caption(caption, rng)
            assert s.caption == caption
            p = world.parse_caption(caption)
            assert s.relation == p.relation
            if p.phrases[0].size:
                assert s.objects[0].size == p.phrases[0].size


class TestNegatives:
    def test_swap_attributes_uses_same_words_but_differs(self, dataset):
        """swap_attributes reorders the caption's words into a different caption."""
        seen = 0
        for s in _of_kind(dataset, "relation"):
            neg = world.negatives(s).get("swap_attributes")
            if neg is None:
                continue
            seen += 1
            assert sorted(neg.split()) == sorted(s.caption.split())
            assert neg != s.caption
        assert seen > 0

    def test_swap_attributes_left_out_when_colors_equal(self):
        """A relation scene whose objects share a color has no swap_attributes negative."""
        a = world.Obj("red", "circle", "small", (5.0, 20.0, 17.0, 32.0))
        b = world.Obj("red", "square", "small", (40.0, 20.0, 52.0, 32.0))
        s = world.Scene("relation", (a, b), world.caption_of("relation", [a, b], "left of"), "left of")
        assert "swap_attributes" not in world.negatives(s)

    def test_swap_roles_swaps_subject_and_object(self, dataset):
        """swap_roles keeps the relation and exchanges the two noun phrases."""
        for s in _of_kind(dataset, "relation"):
            p, n = world.parse_caption(s.caption), world.parse_caption(world.negatives(s)["swap_roles"])
            assert n.relation == p.relation
            assert [(q.color, q.shape) for q in n.phrases] == [(q.color, q.shape) for q in reversed(p.phrases)]

    def test_flip_relation_uses_opposite_relation(self, dataset):
        """flip_relation keeps both phrases and uses the opposite relation."""
        for s in _of_kind(dataset, "relation"):
            p, n = world.parse_caption(s.caption), world.parse_caption(world.negatives(s)["flip_relation"])
            assert n.relation == world.OPPOSITE[p.relation] != p.relation
            assert [(q.color, q.shape) for q in n.phrases] == [(q.color, q.shape) for q in p.phrases]

    def test_change_count_switches_two_and_three(self, dataset):
        """change_count keeps color and shape and names the other number."""
        for s in _of_kind(dataset, "count"):
            (ph,) = world.parse_caption(world.negatives(s)["change_count"]).phrases
            assert ph.count == 5 - len(s.objects)
            assert (ph.color, ph.shape) == (s.objects[0].color, s.objects[0].shape)

    def test_negatives_are_in_grammar_and_differ(self, dataset):
        """Every negative parses, keeps the scene's kind and differs from the caption."""
        for s in dataset:
            negs = world.negatives(s)
            assert negs
            for key, neg in negs.items():
                assert world.parse_caption(neg).kind == s.kind, (key, neg)
                assert neg != s.caption, key

    def test_negative_types_are_the_keys_negatives_returns(self, dataset):
        """world.NEGATIVE_TYPES (what train-dpt --neg-focus accepts) is exactly the set of keys negatives returns."""
        keys = {k for s in dataset for k in world.negatives(s)}
        sized = world.scene_from_caption("a big red circle", np.random.default_rng(0))
        keys |= set(world.negatives(sized))
        assert keys == set(world.NEGATIVE_TYPES) and len(world.NEGATIVE_TYPES) == len(keys)

    def test_negatives_are_deterministic(self, dataset):
        """negatives with the default generator are reproducible."""
        for s in dataset[:30]:
            assert world.negatives(s) == world.negatives(s)


class TestWordMasks:
    def test_relation_content_words_get_their_object_mask(self, dataset):
        """Color and shape words of each phrase get exactly that phrase's object mask."""
        for s in _of_kind(dataset, "relation")[:20]:
            masks, obj = world.word_masks(s), world.object_masks(s)
            for k, ph in enumerate(world.parse_caption(s.caption).phrases):
                for i in ph.word_idx:
                    np.testing.assert_array_equal(masks[i], obj[k])

    def test_relation_words_and_article_have_no_mask(self, dataset):
        """Relation words and 'a' map to None."""
        for s in _of_kind(dataset, "relation")[:20]:
            p = world.parse_caption(s.caption)
            masks = world.word_masks(s)
            for i, w in enumerate(p.words):
                if w == "a" or i in p.relation_idx:
                    assert masks[i] is None, (s.caption, w)
                else:
                    assert masks[i] is not None, (s.caption, w)

    def test_size_word_gets_object_mask(self, dataset):
        """In a single caption with a size, the size word gets the object's mask and 'a' None."""
        scenes = [s for s in _of_kind(dataset, "single") if s.size_word]
        assert scenes
        for s in scenes[:10]:
            masks, obj = world.word_masks(s), world.object_masks(s)
            assert masks[0] is None
            assert s.caption.split()[1] in world.SIZES
            for i in (1, 2, 3):
                np.testing.assert_array_equal(masks[i], obj[0])

    def test_count_words_get_union_of_objects(self, dataset):
        """Every word of a count caption gets the union of all its objects' masks."""
        for s in _of_kind(dataset, "count")[:20]:
            masks, obj = world.word_masks(s), world.object_masks(s)
            union = obj.max(0)
            assert len(masks) == 3
            for m in masks:
                np.testing.assert_array_equal(m, union)
            for o in obj:  # the union covers every object
                assert (m >= o).all()

    def test_masks_cover_objects_in_unit_range(self, dataset):
        """Object masks are [objects, 64, 64] in [0, 1] with each object's center fully covered."""
        for s in dataset[:30]:
            m = world.object_masks(s)
            assert m.shape == (len(s.objects), world.IMAGE_SIZE, world.IMAGE_SIZE)
            assert m.min() >= 0 and m.max() <= 1
            for k, o in enumerate(s.objects):
                assert m[k, int(o.center[1]), int(o.center[0])] == 1.0

    def test_word_classes_match_word_masks(self, dataset):
        """Words classed color/shape/size/count have masks; relation words and None-class words do not."""
        for s in dataset[:50]:
            for cls, m in zip(world.word_classes(s.caption), world.word_masks(s)):
                assert (m is None) == (cls in (None, "relation")), s.caption


class TestSceneRecord:
    def test_to_dict_from_dict_round_trip(self, dataset):
        """Scene.from_dict(scene.to_dict()) gives back the scene."""
        for s in dataset[:30]:
            assert world.Scene.from_dict(s.to_dict()) == s

    def test_obj_center_is_box_center(self):
        """Obj.center is the middle of its box."""
        assert world.Obj("red", "circle", "big", (2.0, 4.0, 22.0, 10.0)).center == (12.0, 7.0)

    def test_unknown_kind_raises(self):
        """sample_scene rejects an unknown kind."""
        with pytest.raises(ValueError):
            world.sample_scene(np.random.default_rng(0), "pair")  # type: ignore[arg-type]

    def test_obj_is_frozen(self):
        """Obj is immutable."""
        o = world.Obj("red", "circle", "big", (0.0, 0.0, 1.0, 1.0))
        with pytest.raises(dataclasses.FrozenInstanceError):
            o.color = "blue"  # type: ignore[misc]


class TestCompositionalSplit:
    def test_held_out_color_shapes_never_reach_the_dataset(self):
        """With the default exclusion no object of any scene has a held-out color-shape pair."""
        scenes = world.sample_dataset(0, 2000)
        assert all((o.color, o.shape) not in world.HELD_OUT_COLOR_SHAPES for s in scenes for o in s.objects)

    def test_held_out_relation_pairs_never_reach_the_dataset(self):
        """No relation scene has a held-out (subject, object) pair, though the reversed pairs occur."""
        scenes = [s for s in world.sample_dataset(0, 20_000) if s.kind == "relation"]
        ordered = {((s.objects[0].color, s.objects[0].shape), (s.objects[1].color, s.objects[1].shape)) for s in scenes}
        assert not ordered & set(world.HELD_OUT_RELATION_PAIRS)
        assert {(b, a) for a, b in world.HELD_OUT_RELATION_PAIRS} <= ordered

    def test_exclusion_only_replaces_held_out_scenes(self):
        """The excluded dataset equals the full one except where a held-out scene was (same kind there)."""
        full = world.sample_dataset(SEED, 400, exclude_compositional=False)
        kept = world.sample_dataset(SEED, 400)
        assert any(world.is_compositional_holdout(s) for s in full)
        for a, b in zip(full, kept):
            assert (a == b) != world.is_compositional_holdout(a)
            assert a.kind == b.kind

    def test_scene_and_caption_agree(self):
        """A scene and its caption fall in the same part of the split."""
        full = world.sample_dataset(SEED, 400, exclude_compositional=False)
        for s in full:
            assert world.compositional_holdout(s) == world.compositional_holdout(s.caption), s.caption

    @pytest.mark.parametrize("caption,part", [
        ("a small purple triangle", "color_shape"), ("three orange squares", "color_shape"),
        ("a red circle left of a purple triangle", "color_shape"),
        ("a green circle below a red triangle", "relation_pair"), ("a red triangle below a green circle", None),
        ("a purple circle", None), ("two orange triangles", None)])
    def test_known_captions(self, caption, part):
        assert world.compositional_holdout(caption) == part
        assert world.is_compositional_holdout(caption) == (part is not None)

    def test_split_is_well_formed(self):
        """Held-out pairs are in the grammar; relation pairs hold no held-out color-shape and are not reversed twins."""
        pairs = {(c, s) for c in world.COLORS for s in world.SHAPES}
        assert set(world.HELD_OUT_COLOR_SHAPES) <= pairs
        for a, b in world.HELD_OUT_RELATION_PAIRS:
            assert a in pairs and b in pairs and a != b
            assert a not in world.HELD_OUT_COLOR_SHAPES and b not in world.HELD_OUT_COLOR_SHAPES
            assert (b, a) not in world.HELD_OUT_RELATION_PAIRS


class TestGrammarCaptions:
    @pytest.mark.parametrize("kind,n", [("single", 54), ("relation", 1224), ("count", 36)])
    def test_counts_parse_and_are_distinct(self, kind, n):
        caps = world.grammar_captions(kind)
        assert len(caps) == len(set(caps)) == n
        assert all(world.parse_caption(c).kind == kind for c in caps)

    def test_sampled_captions_are_in_the_grammar(self, dataset):
        allowed = {c for k in world.KINDS for c in world.grammar_captions(k)}
        assert {s.caption for s in dataset} <= allowed
