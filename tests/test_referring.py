"""Referring expressions: unambiguous, exact boxes, model words."""
from __future__ import annotations

import pytest

from models.shapes import referring, world


def test_every_expression_refers_to_one_object():
    """Each expression's words single out its target among the scene's objects."""
    for ex in referring.referring_dataset(123, 20):
        w = ex.text.split()
        objs, tgt = ex.objects, ex.objects[ex.target]
        if ex.kind == "attribute":
            assert [(o.color, o.shape) for o in objs].count((w[1], w[2])) == 1 and (tgt.color, tgt.shape) == (w[1], w[2])
        elif ex.kind == "relation":
            assert tgt.shape == w[1]
            rel = " ".join(w[2:-3])
            anchor = [o for o in objs if (o.color, o.shape) == (w[-2], w[-1])]
            assert len(anchor) == 1 and referring.relation_between(tgt, anchor[0]) == rel
        else:
            same = [o for o in objs if o.shape == w[2]]
            ext = [o.box[2] - o.box[0] for o in same]
            pick = max if w[1] == "biggest" else min
            assert tgt.box[2] - tgt.box[0] == pick(ext) and len(same) >= 2


def test_kinds_and_boxes():
    ds = referring.referring_dataset(5, 4)
    assert [e.kind for e in ds] == [k for k in referring.REF_KINDS for _ in range(4)]
    e = ds[0]
    cx, cy, w, h = e.box_cxcywh()
    assert (cx - w / 2) * 64 == pytest.approx(e.box[0]) and (cy + h / 2) * 64 == pytest.approx(e.box[3])


def test_model_text_uses_caption_words_only():
    assert referring.model_text("the biggest circle") == "a big circle"
    for e in referring.referring_dataset(9, 5):
        assert all(wd in world.WORDS for wd in e.model_text.split())


def test_check_expression():
    assert referring.check_expression("  The RED circle ") == "the red circle"
    with pytest.raises(ValueError, match="outside the referring vocabulary: zebra"):
        referring.check_expression("the zebra")
    with pytest.raises(ValueError, match="empty"):
        referring.check_expression("  ")


def test_relation_between_margin():
    a = world.Obj("red", "circle", "small", (0, 0, 10, 10))
    b = world.Obj("red", "circle", "small", (20, 2, 30, 12))
    assert referring.relation_between(a, b) == "left of" and referring.relation_between(b, a) == "right of"
    c = world.Obj("red", "circle", "small", (20, 20, 30, 30))
    assert referring.relation_between(a, c) is None
