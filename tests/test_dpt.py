"""DPT adapter, losses, training, scorer and grounding on the tiny pipeline."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from models.adapters.dpt import (DPTConfig, DPTAdapter, DPTOutput, add_lora, box_cxcywh_to_xyxy, generalized_box_iou,
                                 has_lora, itm_score, load_adapter, match_queries, rec_loss, remove_lora, save_adapter)
from models.shapes import world
from models.training import dpt as tdpt

SMALL = dict(width=32, heads=2, ff=64, n_queries=6, n_match=2, sem_dim=8, dropout=0.0)


@pytest.fixture(scope="module")
def adapter(tiny_pipe):
    torch.manual_seed(0)
    return tdpt.new_adapter(tiny_pipe, ("up_blocks.1",), **SMALL).eval()


@pytest.fixture(scope="module")
def adapter_dir(adapter, tmp_path_factory):
    return save_adapter(adapter, tmp_path_factory.mktemp("dpt") / "tiny-dpt")


class TestHeads:
    def test_output_shapes(self):
        """Every head's output has its documented shape."""
        a = DPTAdapter(DPTConfig(block_channels=(8,), feature_size=(4, 4), text_dim=16, **SMALL))
        out = a([torch.randn(3, 8, 4, 4)], torch.tensor([10, 500, 900]))
        assert out.match.shape == (3, 2, 16)
        assert out.logits.shape == (3, 4) and out.probs.shape == (3, 4)
        assert out.boxes.shape == (3, 4, 4) and bool(((out.boxes >= 0) & (out.boxes <= 1)).all())
        assert out.sem.shape == (3, 4, 8) and torch.allclose(out.sem.norm(dim=-1), torch.ones(3, 4), atol=1e-5)
        assert out.hidden.shape == (3, 6, 32) and out.logit_scale.shape == ()
        assert a.project_tokens(torch.randn(3, 5, 16)).shape == (3, 5, 8)

    def test_matching_ignores_text_memory(self):
        """The grounding queries read the expression's tokens; the matching queries never do."""
        a = DPTAdapter(DPTConfig(block_channels=(8,), feature_size=(4, 4), text_dim=16, **SMALL)).eval()
        f, t = [torch.randn(2, 8, 4, 4)], torch.tensor([3, 4])
        tok, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
        with torch.no_grad():
            plain, with_text = a(f, t), a(f, t, tok, mask)
            other = a(f, t, torch.randn(2, 5, 16), mask)
        assert torch.allclose(plain.match, with_text.match, atol=1e-6)
        assert not torch.allclose(with_text.boxes, other.boxes)

    def test_fusion_of_several_blocks(self):
        """Several blocks of different sizes are resized and summed."""
        a = DPTAdapter(DPTConfig(blocks=("a", "b"), block_channels=(8, 12), feature_size=(4, 4), text_dim=16, **SMALL))
        out = a([torch.randn(2, 8, 4, 4), torch.randn(2, 12, 2, 2)], torch.tensor([1, 2]))
        assert out.match.shape == (2, 2, 16)
        with pytest.raises(ValueError, match="expects 2 feature maps"):
            a([torch.randn(2, 8, 4, 4)], torch.tensor([1, 2]))

    def test_itm_score_is_max_cosine(self):
        """s = max over matching queries of the cosine with the text embedding."""
        m = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
        assert itm_score(m, torch.tensor([[0.0, 2.0]])).item() == pytest.approx(2 ** -0.5)


class TestBoxes:
    def test_giou_hand_computed(self):
        """IoU 1/7, hull 9, union 7: GIoU = 1/7 - 2/9."""
        a, b = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]])
        assert generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)
        assert generalized_box_iou(a, a).item() == pytest.approx(1.0)
        far = torch.tensor([[4.0, 0, 6, 2]])  # disjoint: IoU 0, hull 12, union 8
        assert generalized_box_iou(a, far).item() == pytest.approx(-4 / 12)

    def test_l1_and_giou_losses_hand_computed(self):
        """The matched query's L1 (cxcywh) and 1 - GIoU against the true box."""
        boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]])
        out = DPTOutput(torch.zeros(1, 1, 4), torch.tensor(1.0), torch.zeros(1, 2), boxes, torch.zeros(1, 2, 4),
                        torch.zeros(1, 3, 8))
        true = torch.tensor([[0.4, 0.4, 0.2, 0.2]])
        r = rec_loss(out, true, idx=torch.tensor([1]))
        assert r["l1"].item() == pytest.approx(0.2)
        g = generalized_box_iou(box_cxcywh_to_xyxy(boxes[0, 1:]), box_cxcywh_to_xyxy(true)).item()
        assert g == pytest.approx(0.01 / 0.07 - (0.09 - 0.07) / 0.09, abs=1e-6)
        assert r["giou"].item() == pytest.approx(1 - g, abs=1e-6)

    def test_matching_picks_the_true_box(self):
        """The matcher picks the query whose box is the true box, whatever the order."""
        boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.9, 0.9]]] * 2)
        out = DPTOutput(torch.zeros(2, 1, 4), torch.tensor(1.0), torch.zeros(2, 3), boxes, torch.zeros(2, 3, 4),
                        torch.zeros(2, 4, 8))
        idx = match_queries(out, torch.tensor([[0.7, 0.6, 0.3, 0.2], [0.2, 0.2, 0.1, 0.1]]))
        assert idx.tolist() == [1, 0]
        r = rec_loss(out, torch.tensor([[0.7, 0.6, 0.3, 0.2], [0.2, 0.2, 0.1, 0.1]]))
        assert r["l1"].item() == pytest.approx(0.0, abs=1e-6) and r["giou"].item() == pytest.approx(0.0, abs=1e-6)


class TestFeatures:
    def test_features_at_reproduces_the_latent(self, tiny_pipe):
        """features_at(z_t) equals the UNet's block output on z_t itself (x_t = z_t through the one pass)."""
        z = torch.randn(1, 4, 16, 16)
        f = tdpt.features_at(tiny_pipe, z, ["a red circle"], 400, ["up_blocks.1"], grad=False)[0]
        got = {}
        h = tiny_pipe.unet.up_blocks[1].register_forward_hook(lambda m, a, o: got.setdefault("f", o))
        try:
            with torch.no_grad():
                ids = tiny_pipe.tokenizer(["a red circle"], padding="max_length",
                                          max_length=tiny_pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
                tiny_pipe.unet(z, torch.tensor([400]), encoder_hidden_states=tiny_pipe.text_encoder(ids)[0])
        finally:
            h.remove()
        assert torch.allclose(f, got["f"], atol=1e-5)

    def test_gradient_step_raises_the_score(self, tiny_pipe, adapter):
        """Finite differences: z + eps * ds/dz has a higher s than z (the self-correction step goes uphill)."""
        torch.manual_seed(1)
        z = torch.randn(1, 4, 16, 16, requires_grad=True)
        s = tdpt.itm_scores_at(tiny_pipe, adapter, z, "a red circle", 300)
        g = torch.autograd.grad(s.sum(), z)[0]
        assert g.abs().sum() > 0
        eps = 1e-2 / g.norm()
        with torch.no_grad():
            s1 = tdpt.itm_scores_at(tiny_pipe, adapter, z + eps * g, "a red circle", 300)
            s2 = tdpt.itm_scores_at(tiny_pipe, adapter, z - eps * g, "a red circle", 300)
        assert s1.item() > s.item() > s2.item()
        assert (s1 - s).item() == pytest.approx(eps.item() * g.norm().item() ** 2, rel=0.2)


class TestTraining:
    def test_steps_lower_both_losses(self, tiny_pipe):
        """A few steps on a fixed batch lower the ITM and the REC loss."""
        torch.manual_seed(0)
        a = tdpt.new_adapter(tiny_pipe, ("up_blocks.1",), **SMALL).train()
        cfg = tdpt.DPTTrainConfig(batch=4)
        batch = tdpt.make_batch(np.random.default_rng(0), 4)
        noise = torch.randn(4, 16, 16)
        opt = torch.optim.Adam(a.parameters(), lr=3e-3)
        first = None
        for _ in range(15):
            r = tdpt._losses(tiny_pipe, a, batch, 300, noise, cfg)
            itm = float((r["t2i"] + r["i2t"]).detach())
            rec = float(r["loss"].detach()) - itm
            first = first or (itm, rec)
            opt.zero_grad()
            r["loss"].backward()
            opt.step()
        assert itm < first[0] and rec < first[1]

    def test_train_resumes_and_snapshots(self, tiny_pipe, tmp_path):
        """train_dpt writes state and snapshots, and a second call resumes to the new step count."""
        cfg = tdpt.DPTTrainConfig(batch=2, steps=2, checkpoint_every=1, snapshot_every=2, warmup=1,
                                  **{k: v for k, v in SMALL.items() if k != "dropout"})
        tdpt.train_dpt(tiny_pipe, cfg, tmp_path, progress=False)
        assert (tmp_path / "state.pt").exists() and (tmp_path / "snap-00002" / "adapter.safetensors").exists()
        tdpt.train_dpt(tiny_pipe, cfg.__class__(**{**cfg.__dict__, "steps": 3}), tmp_path, progress=False)
        assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 3
        assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3

    def test_stage2_from_a_saved_adapter(self, tiny_pipe, adapter_dir, tmp_path):
        """Stage 2 starts from a saved adapter (its architecture and weights), snapshots the LoRA apart, resumes,
        and leaves the pipeline's UNet as it came (no LoRA, base weights bit-identical)."""
        from safetensors.torch import load_file

        base = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
        cfg = tdpt.DPTTrainConfig(batch=2, steps=2, checkpoint_every=1, snapshot_every=2, warmup=1, lora_rank=2,
                                  lora_lr=1e-2)  # the config's own width etc. (128) differ from the saved adapter's
        a = tdpt.train_dpt(tiny_pipe, cfg, tmp_path, progress=False, init_from=adapter_dir)
        saved = load_adapter(adapter_dir)
        assert a.config.width == saved.config.width == SMALL["width"] and a.config.stage == 2
        snap = tmp_path / "snap-00002"
        assert load_adapter(snap).config.lora_rank == 2
        lora = load_file(snap / "lora.safetensors")
        assert lora and any("lora_B" in k and v.abs().sum() > 0 for k, v in lora.items())
        assert not has_lora(tiny_pipe.unet)
        sd = tiny_pipe.unet.state_dict()
        assert sd.keys() == base.keys() and all(torch.equal(sd[k], base[k]) for k in base)
        first = torch.load(tmp_path / "state.pt", weights_only=False)
        assert any(not torch.equal(first["adapter"][k], v) for k, v in saved.state_dict().items())
        tdpt.train_dpt(tiny_pipe, cfg.__class__(**{**cfg.__dict__, "steps": 3}), tmp_path, progress=False,
                       init_from=adapter_dir)
        st = torch.load(tmp_path / "state.pt", weights_only=False)
        assert st["step"] == 3 and st["lora"].keys() == lora.keys() and not has_lora(tiny_pipe.unet)

    def test_negative_focus(self):
        """With neg_focus_p = 1 every relation sample's hard negative is one of the focus keys' captions; with the
        defaults the batch is the one of the old stream (same captions as neg_focus_p = 0 with keys given)."""
        keys = ("subject_color", "object_shape")
        b = tdpt.make_batch(np.random.default_rng(3), 24, keys, 1.0)
        rng = np.random.default_rng(0)
        rel = 0
        for cap, neg in zip(b["captions"], b["neg"]):
            scene = world.scene_from_caption(cap, rng)
            if scene.kind != "relation":
                continue
            rel += 1
            a, o = scene.objects
            n = world.scene_from_caption(neg, rng)
            na, no = n.objects
            subject_color = na.color != a.color and (na.shape, no.shape, no.color) == (a.shape, o.shape, o.color)
            object_shape = no.shape != o.shape and (na.shape, na.color, no.color) == (a.shape, a.color, o.color)
            assert (subject_color or object_shape) and n.relation == scene.relation
        assert rel >= 5
        plain = tdpt.make_batch(np.random.default_rng(3), 24)
        off = tdpt.make_batch(np.random.default_rng(3), 24, keys, 0.0)
        assert plain["neg"] == off["neg"] and plain["texts"] == off["texts"]
        assert b["neg"] != plain["neg"]

    def test_cosine_schedule_in_training(self, tiny_pipe, tmp_path):
        """lr_schedule="cosine": the learning rate falls to 0 at the last step (the log holds the losses; the
        optimizer state holds the last rate)."""
        cfg = tdpt.DPTTrainConfig(batch=2, steps=3, checkpoint_every=1, snapshot_every=3, warmup=1,
                                  lr_schedule="cosine", **{k: v for k, v in SMALL.items() if k != "dropout"})
        tdpt.train_dpt(tiny_pipe, cfg, tmp_path, progress=False)
        st = torch.load(tmp_path / "state.pt", weights_only=False)
        lrs = [g["lr"] for g in st["opt"]["param_groups"]]
        # step index 2 of 3 with warm-up 1: half way down the cosine
        assert lrs[0] == pytest.approx(cfg.lr * 0.5 * (1 + np.cos(np.pi * 1 / 2)))

    def test_stage2_continues_a_stage2_snapshot(self, tiny_pipe, adapter_dir, tmp_path):
        """A stage-2 snapshot given as init_from starts the next run with its LoRA (not a fresh one)."""
        from safetensors.torch import load_file

        cfg = tdpt.DPTTrainConfig(batch=2, steps=1, checkpoint_every=1, snapshot_every=1, warmup=1, lora_rank=2,
                                  lora_lr=1e-2)
        tdpt.train_dpt(tiny_pipe, cfg, tmp_path / "a", progress=False, init_from=adapter_dir)
        snap = tmp_path / "a" / "snap-00001"
        first = load_file(snap / "lora.safetensors")
        tdpt.train_dpt(tiny_pipe, cfg.__class__(**{**cfg.__dict__, "lora_lr": 1e-12, "lr": 1e-12}), tmp_path / "b",
                       progress=False, init_from=snap)
        second = load_file(tmp_path / "b" / "snap-00001" / "lora.safetensors")
        assert second.keys() == first.keys()
        assert all(torch.allclose(second[k], first[k], atol=1e-6) for k in first)
        assert not has_lora(tiny_pipe.unet)

    def test_adapter_save_load_round_trip(self, adapter, adapter_dir):
        """Saved and loaded adapters give identical outputs."""
        b = load_adapter(adapter_dir)
        f = [torch.randn(2, *adapter.input_proj[0].weight.shape[1:2], *adapter.config.feature_size)]
        t = torch.tensor([5, 7])
        with torch.no_grad():
            assert torch.equal(adapter(f, t).match, b(f, t).match)


class TestLora:
    def test_lora_leaves_base_untouched_and_unloads(self, tiny_pipe):
        """Training the LoRA changes the output, not the base weights; removing it restores the base model."""
        unet = copy.deepcopy(tiny_pipe.unet)
        base = {k: v.clone() for k, v in unet.state_dict().items()}
        x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
        e = torch.randn(1, tiny_pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
        with torch.no_grad():
            y0 = unet(x, t, encoder_hidden_states=e).sample
        params = add_lora(unet, rank=4)
        assert params and all(p.requires_grad for p in params)
        assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
        opt = torch.optim.SGD(params, lr=1.0)
        unet(x, t, encoder_hidden_states=e).sample.pow(2).mean().backward()
        opt.step()
        with torch.no_grad():
            assert not torch.allclose(unet(x, t, encoder_hidden_states=e).sample, y0)
        remove_lora(unet)
        assert not has_lora(unet)
        sd = unet.state_dict()
        assert sd.keys() == base.keys() and all(torch.equal(sd[k], base[k]) for k in base)
        with torch.no_grad():
            assert torch.equal(unet(x, t, encoder_hidden_states=e).sample, y0)


class TestScorerAndGrounding:
    def test_scorer(self, tiny_pipe, adapter_dir):
        """DPTScorer scores every caption with one UNet call."""
        from PIL import Image

        from interp.scorers.dpt import DPTScorer

        img = Image.new("RGB", (64, 64), (200, 30, 30))
        res = DPTScorer(adapter_dir).score(tiny_pipe, img, ["a red circle", "a blue square"])
        assert len(res.scores) == 2 and res.unet_calls == 1 and res.unet_evals == 2 and res.scorer == "dpt"

    def test_scorer_without_adapter_says_how_to_train(self, tiny_pipe, tmp_path):
        from PIL import Image

        from interp.scorers.dpt import DPTScorer

        with pytest.raises(ValueError, match="train-dpt"):
            DPTScorer(tmp_path / "none").score(tiny_pipe, Image.new("RGB", (64, 64)), ["a red circle"])

    def test_ground(self, tiny_pipe, adapter_dir):
        """ground returns a box in image pixels and a probability; OOV words are refused clearly."""
        from PIL import Image

        from interp.tasks.grounding_dpt import ground

        img = Image.new("RGB", (128, 96), (235, 235, 235))
        r = ground(tiny_pipe, img, "the red circle", adapter_dir=adapter_dir)
        x0, y0, x1, y1 = r["box"]
        assert 0 <= x0 <= x1 <= 128 and 0 <= y0 <= y1 <= 96 and 0 <= r["score"] <= 1
        assert r["model_text"] == "a red circle"
        with pytest.raises(ValueError, match="outside the referring vocabulary: zebra"):
            ground(tiny_pipe, img, "the red zebra", adapter_dir=adapter_dir)
