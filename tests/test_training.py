"""Training the bundled model: the loss goes down, runs resume, the export loads with plain diffusers."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_train_config
from models.shapes import world
from models.training.bundled import AUX_HEAD_FILE, kind_shares, sample_weights, loss_layers, loss_stages, pixel_loss, token_loss, token_masks, train_bundled


def _unet_log(work, key: str = "mse"):
    rows = list(csv.DictReader(open(work / "loss_log.csv")))
    return [(int(r["step"]), float(r["value"])) for r in rows if r["stage"] == "unet" and r["key"] == key]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_train_config(tmp, vae_steps=10, unet_steps=20, export_every=10, checkpoint_every=5)
    train_bundled(cfg)
    return cfg, tmp


@pytest.mark.slow
class TestTraining:
    def test_twenty_steps_lower_the_loss(self, trained):
        """The mean v-prediction loss of the last 5 steps is below that of the first 5."""
        cfg, tmp = trained
        log = _unet_log(tmp / "work")
        assert [s for s, _ in log] == list(range(1, 21))
        first, last = sum(v for _, v in log[:5]) / 5, sum(v for _, v in log[-5:]) / 5
        assert last < first

    def test_export_loads_with_plain_diffusers(self, trained):
        """The exported folder loads with StableDiffusionPipeline.from_pretrained and generates 64x64."""
        from diffusers import StableDiffusionPipeline

        cfg, tmp = trained
        pipe = StableDiffusionPipeline.from_pretrained(cfg.out_dir)
        pipe.set_progress_bar_config(disable=True)
        img = pipe("a red circle", num_inference_steps=2, guidance_scale=3.0, output_type="np").images
        assert img.shape == (1, 64, 64, 3) and torch.isfinite(torch.from_numpy(img)).all()
        assert json.loads((tmp / "out" / "training_state.json").read_text())["unet_step"] == 20

    def test_resume_from_checkpoint_continues_the_count(self, trained):
        """A second run with a higher target resumes at the checkpoint's step."""
        cfg, tmp = trained
        cfg.unet_steps = 23
        train_bundled(cfg)
        steps = [s for s, _ in _unet_log(tmp / "work")]
        assert steps == list(range(1, 24))

    def test_resume_from_export_on_a_new_machine(self, trained, capsys):
        """Without the work-dir checkpoint, training resumes from the exported weights and step count."""
        cfg, tmp = trained
        (tmp / "work" / "unet_ckpt.pt").unlink()
        (tmp / "work" / "loss_log.csv").unlink()  # a new machine has the export only
        assert (tmp / "out" / AUX_HEAD_FILE).exists()
        cfg.unet_steps = 25
        train_bundled(cfg)
        printed = capsys.readouterr().out
        assert "resuming from exported EMA weights at step 23" in printed
        assert "text-aux probe head restored" in printed
        state = json.loads((tmp / "out" / "training_state.json").read_text())
        assert state["unet_step"] == 25
        assert [s for s, _ in _unet_log(tmp / "work")] == list(range(1, 26))  # history kept from the export
        # the EMA keeps the decay it had reached instead of restarting its warm-up at 0
        decay = dict(_unet_log(tmp / "work", "ema_decay"))
        assert 0 < decay[23] < decay[24] < decay[25]


class TestTokenLoss:
    def test_zero_for_a_map_inside_its_mask(self):
        """A token whose attention lies entirely inside its object's mask costs nothing."""
        masks = torch.zeros(1, 3, 16, 16)
        masks[0, 0, 2:6, 2:6] = 1.0
        bits = torch.zeros(1, 4, dtype=torch.int8)
        bits[0, 1] = 1  # token 1 -> object 0
        tm = token_masks(masks, bits, 16)  # [1, 4, 256]
        probs = torch.zeros(1, 2, 256, 4)
        probs[..., 0] = 1.0
        inside = tm[0, 1].bool()
        probs[0, :, inside, 0] = 0.5
        probs[0, :, inside, 1] = 0.5
        valid = (bits != 0).float()
        s, n = token_loss(probs, tm, valid)
        assert n.item() == 2 and s.item() == 0.0

    def test_positive_for_a_map_outside_its_mask(self):
        """Attention outside the mask is penalised, more when more of it is outside."""
        masks = torch.zeros(1, 3, 16, 16)
        masks[0, 0, 2:6, 2:6] = 1.0
        bits = torch.tensor([[0, 1, 0]], dtype=torch.int8)
        tm = token_masks(masks, bits, 16)
        uniform = torch.full((1, 1, 256, 3), 1 / 3)
        s, n = token_loss(uniform, tm, (bits != 0).float())
        share = 16 / 256
        assert s.item() == pytest.approx((1 - share) ** 2, rel=1e-5)

    def test_masks_downsample_to_every_resolution(self):
        """Token masks exist at 16, 8 and 4 cells a side and stay non-empty for small objects."""
        masks = torch.zeros(1, 3, 16, 16)
        masks[0, 1, 7:9, 7:9] = 1.0
        bits = torch.tensor([[0, 2]], dtype=torch.int8)
        for side in (16, 8, 4):
            tm = token_masks(masks, bits, side)
            assert tm.shape == (1, 2, side * side) and tm[0, 1].sum() >= 1 and tm[0, 0].sum() == 0


class TestPixelLossAndLayers:
    def _setup(self):
        masks = torch.zeros(1, 3, 16, 16)
        masks[0, 0, 2:6, 2:6] = 1.0
        bits = torch.tensor([[0, 1, 0]], dtype=torch.int8)
        return token_masks(masks, bits, 16), (bits != 0).float()

    def test_pixel_loss_small_for_the_mask_itself(self):
        """A map equal to the token's mask costs ~0; a uniform map costs the hand-computed BCE."""
        tm, valid = self._setup()
        probs = torch.zeros(1, 2, 256, 3)
        probs[0, :, :, 1] = tm[0, 1]
        s, n = pixel_loss(probs, tm, valid)
        assert n.item() == 1 and s.item() < 1e-4
        p = 1 / 3
        uniform = torch.full((1, 2, 256, 3), p)
        s, _ = pixel_loss(uniform, tm, valid)
        share = 16 / 256
        want = -(share * torch.log(torch.tensor(p)) + (1 - share) * torch.log(torch.tensor(1 - p)))
        assert s.item() == pytest.approx(want.item(), rel=1e-4)

    def test_stages_select_layers(self, tiny_pipe):
        """'all' selects every layer; stages select exactly their layers; bad names are refused."""
        from models.attention_capture import cross_attention_layers

        layers = cross_attention_layers(tiny_pipe.unet)
        assert loss_layers(tiny_pipe.unet, "all") is None
        got = loss_layers(tiny_pipe.unet, "mid,up")
        assert got == [l.name for l in layers if l.stage in ("mid", "up")] and 0 < len(got) < len(layers)
        assert loss_stages(" down ") == ("down",)
        for bad in ("middle", ",", "down;up"):
            with pytest.raises(ValueError, match="token_loss_layers"):
                loss_stages(bad)

    @pytest.mark.slow
    def test_training_with_pixel_loss_and_stages_logs_it(self, tmp_path):
        """A short run with the pixel term on mid+up layers logs a finite pixel loss every step."""
        cfg = tiny_train_config(tmp_path, vae_steps=2, unet_steps=3, token_loss_layers="mid,up",
                                pixel_loss_weight=0.05)
        train_bundled(cfg)
        rows = list(csv.DictReader(open(tmp_path / "work" / "loss_log.csv")))
        px = [float(r["value"]) for r in rows if r["key"] == "pixel_loss"]
        assert len(px) == 3 and all(0 < v < 10 for v in px)

    def test_cli_refuses_bad_loss_options(self, capsys):
        import cli

        for args, match in ((["--token-loss-layers", "middle"], "token_loss_layers"),
                            (["--pixel-loss-weight", "-1"], ">= 0"), (["--warmup", "0"], "--warmup"),
                            (["--lr", "0"], "--lr"), (["--ema-decay", "1"], "--ema-decay"),
                            (["--kind-weights", "counts=3"], "--kind-weights"),
                            (["--kind-weights", "count=0"], "--kind-weights"),
                            (["--kind-weights", "count"], "--kind-weights"),
                            (["--kind-weights", "count=nan"], "--kind-weights")):
            code = cli.main(["train-bundled", *args, "--out-dir", "/nonexistent/x"])
            err = capsys.readouterr().err
            assert code == 2 and match in err and err.count("\n") == 1


def test_tokenizer_build_is_identical_across_processes(tmp_path):
    """Fresh interpreters build byte-identical vocabularies (the BPE trainer alone breaks ties at random)."""
    import subprocess
    import sys

    code = "import sys; from models.shapes.vocab import build_clip_tokenizer_files as b; b(sys.argv[1])"
    texts = set()
    for i in range(3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"t{i}")], check=True, cwd=str(ROOT))
        texts.add((tmp_path / f"t{i}" / "vocab.json").read_text() + (tmp_path / f"t{i}" / "merges.txt").read_text())
    assert len(texts) == 1


def test_training_keeps_the_tokenizer_of_the_run(tmp_path):
    """A work dir's tokenizer is reused as is; without one, a resumed export's tokenizer is taken over."""
    from transformers import CLIPTokenizer

    from models.training.bundled import training_tokenizer
    from models.shapes.vocab import build_clip_tokenizer_files

    cfg = tiny_train_config(tmp_path)
    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(tmp_path / "fresh"))
    # an exported model whose "red" has another id than a fresh build's
    vocab = dict(tok.get_vocab())
    vocab["red</w>"], vocab["res</w>"] = vocab["res</w>"], vocab["red</w>"]
    exp = tmp_path / "out" / "tokenizer"
    exp.mkdir(parents=True)
    for f in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        (exp / f).write_text((tmp_path / "fresh" / f).read_text())
    (exp / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "out" / "training_state.json").write_text("{}")
    red = vocab["red</w>"]
    assert red != tok.convert_tokens_to_ids("red</w>")
    assert training_tokenizer(cfg).convert_tokens_to_ids("red</w>") == red  # from the export
    (exp / "vocab.json").unlink()  # the work dir's copy is used from now on
    assert training_tokenizer(cfg).convert_tokens_to_ids("red</w>") == red


def test_export_shards_large_weights_and_loads_them_back(tmp_path, monkeypatch):
    """With a small shard size the export writes several UNet shards + an index; from_pretrained reads them."""
    import models.training.bundled as bt
    from conftest import build_tiny_pipeline
    from models import load_pipeline

    pipe = build_tiny_pipeline(tmp_path / "src")
    monkeypatch.setattr(bt, "MAX_SHARD", "200KB")
    cfg = tiny_train_config(tmp_path)
    out = bt.export_pipeline(cfg, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae, 7, {})
    shards = sorted((out / "unet").glob("*.safetensors"))
    assert len(shards) > 1 and (out / "unet" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert all(f.stat().st_size < 400 * 2**10 for f in shards)
    back = load_pipeline(str(out), device="cpu")
    for (k, a), (_, b) in zip(pipe.unet.state_dict().items(), back.unet.state_dict().items()):
        assert torch.equal(a, b), k


class TestKindWeights:
    KINDS = np.array([0] * 25 + [1] * 45 + [2] * 30, np.int8)  # indices into world.KINDS

    def test_uniform_when_unset(self):
        assert sample_weights(self.KINDS, None) is None and sample_weights(self.KINDS, {}) is None
        assert kind_shares(self.KINDS, None) == {"single": 0.25, "relation": 0.45, "count": 0.3}

    def test_weights_follow_each_image_kind(self):
        w = sample_weights(self.KINDS, {"count": 3.0, "single": 0.5})
        assert w.shape == (100,)
        assert set(w[:25].tolist()) == {0.5} and set(w[25:70].tolist()) == {1.0} and set(w[70:].tolist()) == {3.0}
        # count: 30 * 3 / (25 * 0.5 + 45 + 90)
        assert kind_shares(self.KINDS, w)["count"] == pytest.approx(90 / 147.5, abs=1e-4)

    def test_batches_drawn_with_the_weights_match_the_shares(self):
        w = sample_weights(self.KINDS, {"count": 3.0})
        idx = torch.multinomial(w, 20_000, replacement=True, generator=torch.Generator().manual_seed(0))
        got = (torch.from_numpy(self.KINDS.astype(np.int64))[idx] == world.KINDS.index("count")).float().mean()
        assert float(got) == pytest.approx(kind_shares(self.KINDS, w)["count"], abs=0.015)

    def test_bad_weights_raise(self):
        with pytest.raises(ValueError, match="unknown scene kind"):
            sample_weights(self.KINDS, {"counts": 2.0})
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="> 0"):
                sample_weights(self.KINDS, {"count": bad})

    @pytest.mark.slow
    def test_training_with_kind_weights_records_them(self, tmp_path, capsys):
        cfg = tiny_train_config(tmp_path, vae_steps=2, unet_steps=2, kind_weights={"count": 3.0})
        out = train_bundled(cfg)
        assert "batch mix by kind" in capsys.readouterr().out
        assert json.loads((out / "training_state.json").read_text())["config"]["kind_weights"] == {"count": 3.0}



class TestCompositionalSplit:
    def test_training_data_leaves_out_the_held_out_combinations(self, tmp_path):
        """Data built now holds no held-out combination; the rule is cached with the data, and the other rule
        rebuilds the data instead of reusing it."""
        from transformers import CLIPTokenizer

        from models.shapes.vocab import build_clip_tokenizer_files
        from models.training.bundled import build_data

        tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(tmp_path / "tok"))
        cfg = tiny_train_config(tmp_path, n_images=600)
        caps = tok.batch_decode(build_data(cfg, tok)["input_ids"], skip_special_tokens=True)
        assert len(caps) == 600 and not any(world.is_compositional_holdout(c) for c in caps)
        cfg.exclude_compositional = False
        old = tok.batch_decode(build_data(cfg, tok)["input_ids"], skip_special_tokens=True)
        assert any(world.is_compositional_holdout(c) for c in old)  # the rule of the shipped model's data
        assert sum(a != b for a, b in zip(caps, old)) == sum(world.is_compositional_holdout(c) for c in old)

    def test_flag_parses_both_ways(self):
        import argparse

        from models.training.bundled import TrainConfig
        from models.training.common import add_config_flags, config_from_flags

        p = argparse.ArgumentParser()
        add_config_flags(p, TrainConfig)
        assert config_from_flags(p.parse_args([]), TrainConfig).exclude_compositional is True
        assert config_from_flags(p.parse_args(["--no-exclude-compositional"]), TrainConfig).exclude_compositional is False
