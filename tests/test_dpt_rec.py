"""DPT's regression grounding head and its training on cached features (tiny pipeline)."""
from __future__ import annotations

import json

import pytest
import torch

from models.adapters.dpt import (DPTAdapter, DPTConfig, box_cxcywh_to_xyxy, box_iou, load_adapter,
                                 rec_regression_loss, save_adapter)
from models.training import dpt as tdpt
from models.training import dpt_rec

SMALL = dict(width=32, heads=2, ff=64, n_queries=6, n_match=2, sem_dim=8, dropout=0.0)


def _cfg(**kw) -> DPTConfig:
    return DPTConfig(block_channels=(8,), feature_size=(4, 4), text_dim=16, **{**SMALL, **kw})


class TestRegressionHead:
    def test_output_shapes(self):
        """One box, logit and semantic vector a row with tokens; none without (matching only)."""
        a = DPTAdapter(_cfg(rec_head="regression", vl_layers=1))
        f, t = [torch.randn(3, 8, 4, 4)], torch.tensor([1, 2, 3])
        out = a(f, t, torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool))
        assert out.match.shape == (3, 2, 16) and out.logits.shape == (3, 1) and out.boxes.shape == (3, 1, 4)
        assert out.sem.shape == (3, 1, 8) and bool(((out.boxes > 0) & (out.boxes < 1)).all())
        bare = a(f, t)
        assert bare.logits.shape == (3, 0) and bare.boxes.shape == (3, 0, 4) and bare.sem.shape == (3, 0, 8)

    def test_box_depends_on_the_expression_and_padding_is_ignored(self):
        """The [REG] output reads the text; padded token positions do not change it."""
        a = DPTAdapter(_cfg(rec_head="regression", vl_layers=1)).eval()
        f, t = [torch.randn(2, 8, 4, 4)], torch.tensor([5, 5])
        tok = torch.randn(2, 5, 16)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
        with torch.no_grad():
            base = a(f, t, tok, mask).boxes
            tok2 = tok.clone()
            tok2[:, 4] = torch.randn(2, 16)  # padding only
            assert torch.allclose(a(f, t, tok2, mask).boxes, base, atol=1e-6)
            tok3 = tok.clone()
            tok3[:, 1] = torch.randn(2, 16)  # a real word
            assert not torch.allclose(a(f, t, tok3, mask).boxes, base)

    def test_unknown_head_refused(self):
        with pytest.raises(ValueError, match="rec_head must be one of"):
            _cfg(rec_head="anchors")

    def test_loss_hand_computed(self):
        """L1 and GIoU of the one box; confidence target = own IoU >= 0.5; no align term without tokens."""
        from models.adapters.dpt import DPTOutput

        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
        pred = torch.tensor([[[0.5, 0.5, 0.2, 0.2]], [[0.6, 0.5, 0.2, 0.2]]])  # exact; shifted by half a width
        out = DPTOutput(match=torch.zeros(2, 1, 4), logit_scale=torch.tensor(1.0), logits=torch.zeros(2, 1),
                        boxes=pred, sem=torch.zeros(2, 1, 3), hidden=torch.zeros(2, 1, 4))
        r = rec_regression_loss(out, boxes)
        assert r["l1"].item() == pytest.approx(0.05)  # (0 + 0.1) / 2
        iou = 0.1 * 0.2 / (0.08 - 0.02)  # overlap 0.02 over a union of 0.06: 1/3, hull = union
        assert r["giou"].item() == pytest.approx((0 + 1 - iou) / 2, abs=1e-6)
        # logits 0: BCE = log 2 for both targets (1 for the exact box, 0 for IoU 1/3)
        assert r["prob"].item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
        assert r["align"].item() == 0.0
        assert r["loss"].item() == pytest.approx(r["prob"].item() + 5 * 0.05 + 2 * r["giou"].item(), abs=1e-6)


@pytest.fixture(scope="module")
def trained_dir(tiny_pipe, tmp_path_factory):
    torch.manual_seed(0)
    a = tdpt.new_adapter(tiny_pipe, ("up_blocks.1",), **SMALL).eval()
    return save_adapter(a, tmp_path_factory.mktemp("dptrec") / "tiny-dpt")


class TestTrainRecHead:
    def test_adapter_copy_keeps_matching(self, tiny_pipe, trained_dir):
        """The regression copy scores captions exactly as the adapter it came from."""
        base = load_adapter(trained_dir)
        new = dpt_rec.rec_adapter_from(base, "regression", 1).eval()
        lat = torch.randn(1, 4, 16, 16)
        caps = ["a red circle", "a blue square"]
        assert torch.equal(tdpt.itm_scores(tiny_pipe, base, lat, caps), tdpt.itm_scores(tiny_pipe, new, lat, caps))

    def test_cache_rows(self, tiny_pipe, trained_dir, tmp_path):
        """One row per expression; positives name the referred words; a second call reads the file."""
        cfg = load_adapter(trained_dir).config
        c = dpt_rec.build_rec_cache(tiny_pipe, cfg, 5, 2, tmp_path / "c.pt", chunk=4, progress=False)
        assert c["feats"][0].shape[0] == 6 and c["tokens"].shape[:2] == (6, dpt_rec.CACHE_TOKENS)
        assert c["kinds"] == ["attribute"] * 2 + ["relation"] * 2 + ["size"] * 2
        assert bool((c["positive"] <= c["valid"]).all()) and bool(c["positive"].any(-1).all())
        again = dpt_rec.build_rec_cache(tiny_pipe, cfg, 5, 2, tmp_path / "c.pt", progress=False)
        assert torch.equal(again["feats"][0], c["feats"][0])

    def test_training_lowers_loss_keeps_matching_and_resumes(self, tiny_pipe, trained_dir, tmp_path):
        """A few steps lower the box loss, s(z, y) is bit-identical, snapshots carry a validation reading,
        and a second call resumes."""
        cfg = dpt_rec.RecTrainConfig(init_adapter=str(trained_dir), vl_layers=1, n_train=8, n_val=2, steps=40,
                                     batch=16, lr=3e-3, warmup=1, snapshot_every=20)
        a = dpt_rec.train_rec_head(tiny_pipe, cfg, tmp_path, progress=False)
        rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
        assert len(rows) == 40
        first = sum(r["l1"] + r["giou"] for r in rows[:5]) / 5
        last = sum(r["l1"] + r["giou"] for r in rows[-5:]) / 5
        assert last < first
        assert "val_acc" in rows[19] and (tmp_path / "snap-00040" / "adapter.safetensors").exists()
        lat = torch.randn(1, 4, 16, 16)
        caps = ["a red circle", "two green squares"]
        assert torch.equal(tdpt.itm_scores(tiny_pipe, load_adapter(trained_dir), lat, caps),
                           tdpt.itm_scores(tiny_pipe, load_adapter(tmp_path / "snap-00040"), lat, caps))
        snap = json.loads((tmp_path / "snap-00040" / "config.json").read_text())
        assert snap["rec_head"] == "regression" and snap["extra"]["validation"]["overall"]["n"] == 6
        dpt_rec.train_rec_head(tiny_pipe, dpt_rec.RecTrainConfig(**{**cfg.__dict__, "steps": 45}), tmp_path,
                               progress=False)
        assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 45

    def test_metrics_agree_with_ground_boxes(self, tiny_pipe, trained_dir, tmp_path):
        """The cached reading equals the UNet-backed one (same noise seed, same rows)."""
        a = dpt_rec.rec_adapter_from(load_adapter(trained_dir), "regression", 1).eval()
        c = dpt_rec.build_rec_cache(tiny_pipe, a.config, 9, 2, tmp_path / "c.pt", chunk=64, progress=False)
        from models.shapes import referring

        exprs = referring.referring_dataset(9, 2)
        lat = tdpt.encode_images(tiny_pipe, [referring.render_objects(e.objects) for e in exprs])
        boxes, _ = tdpt.ground_boxes(tiny_pipe, a, lat, [e.model_text for e in exprs], noise_seed=9 * 1000)
        true = torch.tensor([e.box_cxcywh() for e in exprs])
        ious = torch.diagonal(box_iou(boxes, box_cxcywh_to_xyxy(true))[0])
        m = dpt_rec.rec_metrics(a, c)
        assert m["overall"]["k"] == int((ious >= 0.5).sum()) and m["mean_iou"] == pytest.approx(
            float(ious.mean()), abs=2e-3)
