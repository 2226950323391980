"""Structure-aware attention score: binding and relation terms on hand-made traces, fallback, scorer hook."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interp.lse import lse_score
from interp.scorers import get_scorer
from interp.tasks.matching import MatchOptions
from interp.tasks.matching_eval import evaluate_matching
from interp.structure import (StructureConfig, bind_caption, histogram_intersection, learn_relation_directions,
                              relation_displacement, structure_score, structure_scores)
from models.shapes import world
from models.trace import AttentionTrace, LayerInfo

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SIDE = 8
# 2x2 blobs (top-left corner, row/col on the 8x8 grid), far enough apart that upsampled maps do not touch
LEFT, RIGHT, TOP, BOTTOM = (3, 0), (3, 6), (0, 3), (6, 3)
TRUE = "a red circle left of a blue square"


def _trace(tokens, layers):
    """A trace whose layer `alias` holds the given `[steps, heads, h, w, tokens]` tensor."""
    infos = [LayerInfo(a, a, t.shape[1], t.shape[2], t.shape[3]) for a, t in layers.items()]
    return AttentionTrace(" ".join(t for t in tokens if not t.startswith("<|")), list(tokens),
                          list(range(len(tokens))), [900.0, 500.0], infos, None,
                          {a: t.half() for a, t in layers.items()})


def _faithful(caption: str, where: dict[str, tuple[int, int]], eps: float = 0.0) -> AttentionTrace:
    """A faithful model's trace of `caption`: each word in `where` attends to a 2x2 blob at its object's place
    in the image, every other word uniformly (eps); BOS takes a constant share. Two layers (8x8 and 4x4)."""
    words = caption.split()
    tokens = [BOS, *words, EOS]
    x = torch.full((2, 2, SIDE, SIDE, len(tokens)), eps)
    x[..., 0] = 0.5
    for k, w in enumerate(words, start=1):
        if w in where:
            r, c = where[w]
            x[:, :, r:r + 2, c:c + 2, k] = 0.3
    low = F.avg_pool2d(x.permute(0, 1, 4, 2, 3).reshape(-1, 1, SIDE, SIDE), 2)
    low = low.reshape(2, 2, len(tokens), SIDE // 2, SIDE // 2).permute(0, 1, 3, 4, 2)
    return _trace(tokens, {"hi": x, "lo": low})


# The image: a red circle on the left, a blue square on the right. A faithful model puts each attribute
# word where the object having that attribute is, whatever the caption says.
IMAGE_LR = {"red": LEFT, "circle": LEFT, "blue": RIGHT, "square": RIGHT}


def _score(caption, where=IMAGE_LR, eps=0.002, **cfg):
    return structure_score(_faithful(caption, where, eps), caption, StructureConfig(**cfg))


class TestHardNegatives:
    def test_true_caption_beats_world_negatives(self):
        """The true caption scores above its role-swapped, color-swapped and relation-flipped versions."""
        scene = world.Scene("relation", (world.Obj("red", "circle", "big", (2, 22, 20, 40)),
                                         world.Obj("blue", "square", "big", (44, 22, 62, 40))), TRUE, "left of")
        negs = world.negatives(scene)
        assert negs["swap_roles"] == "a blue square left of a red circle"
        assert negs["swap_attributes"] == "a blue circle left of a red square"
        assert negs["flip_relation"] == "a red circle right of a blue square"
        true = _score(TRUE).score
        for key in ("swap_roles", "swap_attributes", "flip_relation"):
            assert true > _score(negs[key]).score, key

    def test_role_swap_only_loses_on_relation(self):
        """Swapping the roles keeps the binding and negates the relation term."""
        t, s = _score(TRUE), _score("a blue square left of a red circle")
        assert s.binding == pytest.approx(t.binding, abs=1e-9)
        assert t.relation > 0
        assert s.relation == pytest.approx(-t.relation, abs=1e-9)

    def test_flipped_relation_negates_relation(self):
        """Flipping the relation word keeps the maps and negates the relation term."""
        t, s = _score(TRUE), _score("a red circle right of a blue square")
        assert s.binding == pytest.approx(t.binding, abs=1e-9)
        assert s.relation == pytest.approx(-t.relation, abs=1e-9)

    def test_color_swap_loses_on_binding(self):
        """Swapped colors split each phrase across both objects: lower within, higher cross overlap."""
        t, s = _score(TRUE), _score("a blue circle left of a red square")
        assert s.within < t.within
        assert s.cross > t.cross
        assert s.binding < 0 < t.binding

    def test_vertical_relations_use_image_y_down(self):
        """With the red circle on top, "above" gets a positive relation term and "below" a negative one."""
        where = {"red": TOP, "circle": TOP, "blue": BOTTOM, "square": BOTTOM}
        above = _score("a red circle above a blue square", where)
        below = _score("a red circle below a blue square", where)
        assert above.relation > 0 > below.relation
        assert above.direction == (0.0, -1.0)
        assert above.displacement[1] < 0 and abs(above.displacement[0]) < 1e-9

    def test_relation_is_normalised_by_image_size(self):
        """The relation term is the centroid displacement in image units, so it lies in (-1, 1)."""
        t = _score(TRUE)
        (x1, y1), (x2, y2) = t.phrases[0].centroid, t.phrases[1].centroid
        assert 0 < x1 < 0.5 < x2 < 1
        assert t.relation == pytest.approx(x2 - x1, abs=1e-9)  # "left of": direction (-1, 0)
        assert 0 < t.relation < 1

    def test_score_combines_terms_with_w_rel(self):
        """score = binding + w_rel * relation."""
        for w in (0.0, 1.0, 2.5):
            s = _score(TRUE, w_rel=w)
            assert s.score == pytest.approx(s.binding + w * s.relation, abs=1e-12)
            assert s.binding == pytest.approx(s.within - s.cross, abs=1e-12)


class TestBinding:
    def test_histogram_intersection(self):
        """HI is the sum of elementwise minima: 1 for equal, 0 for disjoint distributions."""
        assert histogram_intersection([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(0.5)
        assert histogram_intersection([1.0, 0.0], [1.0, 0.0]) == pytest.approx(1.0)
        assert histogram_intersection([1.0, 0.0], [0.0, 1.0]) == 0.0

    def test_shared_map_binds_maximally(self):
        """A phrase whose words share one map has within-phrase overlap 1."""
        where = {"small": LEFT, "red": LEFT, "circle": LEFT}
        s = _score("a small red circle", where)
        assert s.kind == "single"
        assert s.phrases[0].overlap == pytest.approx(1.0, abs=1e-9)
        assert set(s.phrases[0].pair_overlaps) == {"small-red", "small-circle", "red-circle"}
        assert s.binding == pytest.approx(1.0, abs=1e-9) and s.relation is None

    def test_split_phrase_binds_less(self):
        """Words of one phrase on different objects overlap less than words sharing a map."""
        shared = _score("a small red circle", {"small": LEFT, "red": LEFT, "circle": LEFT})
        split = _score("a small red circle", {"small": LEFT, "red": LEFT, "circle": RIGHT})
        assert split.binding < shared.binding
        assert split.phrases[0].pair_overlaps["small-red"] == pytest.approx(1.0, abs=1e-9)
        assert split.phrases[0].pair_overlaps["red-circle"] < 0.1

    def test_relation_binding_max_is_one(self):
        """Disjoint phrases, each on one shared map: binding 1 (within 1, cross 0)."""
        s = _score(TRUE, eps=0.0)
        assert s.within == pytest.approx(1.0, abs=1e-9)
        assert s.cross == pytest.approx(0.0, abs=1e-9)
        assert s.binding == pytest.approx(1.0, abs=1e-9)

    def test_random_maps_stay_in_range(self):
        """On random maps the binding lies in [-1, 1] and the relation in (-1, 1)."""
        g = torch.Generator().manual_seed(0)
        words = TRUE.split()
        x = torch.rand(2, 2, SIDE, SIDE, len(words) + 2, generator=g)
        s = structure_score(_trace([BOS, *words, EOS], {"L": x}), TRUE)
        assert -1 <= s.binding <= 1 and -1 < s.relation < 1

    def test_count_caption_is_binding_only(self):
        """A count caption binds number, color and plural shape into one phrase; no relation term."""
        s = _score("two red circles", {"two": LEFT, "red": LEFT, "circles": LEFT})
        assert s.kind == "count" and s.relation is None and s.cross is None
        assert s.phrases[0].words == ["two", "red", "circles"]
        assert s.score == pytest.approx(1.0, abs=1e-9)

    def test_as_dict_is_json_ready(self):
        """as_dict holds the terms, the phrases' overlaps and centroids, and serialises to JSON."""
        import json

        d = json.loads(json.dumps(_score(TRUE).as_dict()))
        assert d["method"] == "structure" and d["relation_word"] == "left of"
        assert [p["words"] for p in d["phrases"]] == [["red", "circle"], ["blue", "square"]]
        assert len(d["displacement"]) == 2 and d["lse"] is None


class TestOutsideGrammar:
    def test_unbindable_caption_falls_back_to_lse(self):
        """A caption with nothing to bind gets the LSE score of its trace, with a note."""
        cap = "a dog on the grass"
        tr = _faithful(cap, {}, eps=0.01)
        tr.probs["hi"][..., 2] = torch.rand(2, 2, SIDE, SIDE, generator=torch.Generator().manual_seed(1)).half()
        s = structure_score(tr, cap)
        assert s.method == "lse" and "LSE" in s.note
        assert s.score == lse_score(tr, source="probs", tokens="words").score
        assert s.binding is None and s.bound_words == []

    def test_tokens_not_spelling_caption_fall_back(self):
        """A trace of other words cannot be read for the caption: LSE fallback with a note."""
        s = structure_score(_faithful("a blue square", {}), TRUE)
        assert s.method == "lse" and "spell" in s.note

    def test_lenient_binding_reports_bound_words(self):
        """Outside the grammar, runs of content words are bound and reported; an unknown relation is skipped."""
        cap = "the big red circle next to a small blue square"
        b = bind_caption(cap)
        assert b.kind == "lenient" and b.relation is None
        assert b.bound_words == ["big", "red", "circle", "small", "blue", "square"]
        where = {"big": LEFT, "red": LEFT, "circle": LEFT, "small": RIGHT, "blue": RIGHT, "square": RIGHT}
        s = _score(cap, where)
        assert s.method == "structure" and s.relation is None and "outside the grammar" in s.note
        assert s.bound_words == b.bound_words

    def test_lenient_relation_is_used(self):
        """A known relation between two leniently bound phrases gives a relation term."""
        cap = "a big red circle left of a small blue square"
        where = {"big": LEFT, "red": LEFT, "circle": LEFT, "small": RIGHT, "blue": RIGHT, "square": RIGHT}
        s = _score(cap, where)
        assert s.kind == "lenient" and s.relation_word == "left of" and s.relation > 0

    def test_mixed_set_is_scored_on_one_scale(self):
        """When one caption falls back, every caption of the set is scored with LSE (all_or_none)."""
        caps = [TRUE, "a dog"]
        trs = [_faithful(c, IMAGE_LR, eps=0.01) for c in caps]
        out = structure_scores(trs, caps)
        assert all(s.method == "lse" for s in out.values())
        assert "a dog" in out[TRUE].note
        mixed = structure_scores(trs, caps, all_or_none=False)
        assert mixed[TRUE].method == "structure" and mixed["a dog"].method == "lse"


class TestRegisteredScorer:
    def test_scorer_on_tiny_pipe(self, tiny_pipe):
        """The registered "structure" scorer runs one batched pass and returns its structure terms."""
        scene = world.scene_from_caption(TRUE, np.random.default_rng(0))
        caps = [TRUE, "a blue square left of a red circle"]
        opts = MatchOptions(timesteps=(300, 600), source="probs")
        res = get_scorer("structure").score(tiny_pipe, world.render(scene), caps, opts)
        assert res.captions == caps
        assert all(math.isfinite(v) for v in res.scores)
        assert res.unet_calls == 2 and res.unet_evals == 4
        assert all(b.method == "structure" for b in res.structure.values())
        assert res.scores == [res.structure[c].score for c in caps]

    def test_evaluate_matching_accepts_it(self, tiny_pipe):
        """evaluate_matching runs the "structure" scorer by name and reports its name and cost."""
        r = evaluate_matching(tiny_pipe, "comvg", MatchOptions(scorer="structure", timesteps=(300,)), limit=1,
                              per_item=False)
        assert r["scorer"] == "structure" and r["n_items"] == 1
        assert r["unet_evals_per_pair"] == 1


class TestLearnedDirections:
    def test_learned_directions_are_normalised_means(self):
        """Each relation's direction is its mean displacement, normalised; relations are kept apart."""
        got = dict(learn_relation_directions([("left of", (-0.3, 0.1)), ("left of", (-0.1, -0.1)),
                                              ("above", (0.0, -0.2))]))
        assert got["left of"] == pytest.approx((-1.0, 0.0)) and got["above"] == pytest.approx((0.0, -1.0))
        with pytest.raises(ValueError, match="zero"):
            learn_relation_directions([("below", (0.1, 0.0)), ("below", (-0.1, 0.0))])

    def test_directions_learned_from_the_maps_replace_the_hard_coded_ones(self):
        """Directions learned from a trace's own displacement reproduce the hard-coded score; reversed ones
        flip the relation term; an unseen relation gets no relation term."""
        tr = _faithful(TRUE, IMAGE_LR, 0.002)
        rel, d = relation_displacement(tr, TRUE)
        assert rel == "left of" and d[0] < 0
        learned = learn_relation_directions([(rel, d)])
        hard = structure_score(tr, TRUE)
        same = structure_score(tr, TRUE, StructureConfig(directions=learned))
        assert same.relation == pytest.approx(hard.relation, rel=0.2) and same.relation > 0
        flipped = StructureConfig(directions=(("left of", (1.0, 0.0)),))
        assert structure_score(tr, TRUE, flipped).relation == pytest.approx(-hard.relation)
        unseen = structure_score(tr, TRUE, StructureConfig(directions=(("above", (0.0, -1.0)),)))
        assert unseen.relation is None and unseen.score == pytest.approx(unseen.binding)
