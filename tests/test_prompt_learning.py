"""Attention-based prompt learning: K/V deltas on cross-attention, the triplet loss, applying, saving and loading."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.tasks.matching import MatchOptions, score_image_captions
from models.shapes import world
from models.attention_capture import cross_attention_layers
from interp.tasks.prompt_learning import (AttentionPrompt, Triplet, apply_prompt, collect_triplets, load_prompt,
                                    prompt_scores, save_prompt, train_prompt, triplet_loss)
from models.unet_pass import noised_unet_pass

OPTS = MatchOptions(timesteps=(200, 600))


@pytest.fixture(scope="module")
def renders():
    """Hand-made shapes-world renders: two role-swapped relation scenes and one extra scene with its caption."""
    rng = np.random.default_rng(7)
    caps = ["a red circle left of a blue square", "a blue square left of a red circle",
            "a green triangle above a yellow circle"]
    return [(world.render(world.scene_from_caption(c, rng)), c) for c in caps]


@pytest.fixture(scope="module")
def triplets(renders):
    """Two image-negative triplets (Eq. 6) and one caption-negative triplet."""
    (x0, c0), (x1, c1), (x2, c2) = renders
    return [(x0, x1, c0), (x1, x0, c1), (x2, c2, "a yellow circle above a green triangle")]


def _inputs(pipe, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = pipe.unet.config.sample_size
    lat = torch.randn(batch, pipe.unet.config.in_channels, s, s, generator=g)
    emb = torch.randn(batch, 77, pipe.unet.config.cross_attention_dim, generator=g)
    return lat, torch.tensor([300] * batch), emb


def _unet_out(pipe, seed=0):
    lat, t, emb = _inputs(pipe, seed=seed)
    with torch.no_grad():
        return pipe.unet(lat, t, encoder_hidden_states=emb).sample


def _random_prompt(pipe, variant="additive", scale=0.05, seed=1):
    p = AttentionPrompt.for_unet(pipe, variant, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in p.params.items():
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return p


def _snapshot(pipe):
    return {f"{m}.{k}": v.detach().clone() for m in ("unet", "vae", "text_encoder")
            for k, v in getattr(pipe, m).state_dict().items()}


def _assert_same_weights(pipe, before):
    after = _snapshot(pipe)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"


def _assert_clean(pipe, processors):
    unet = pipe.unet
    now = unet.attn_processors
    assert now.keys() == processors.keys()
    assert all(now[k] is processors[k] for k in now), "attention processors were not restored"
    for l in cross_attention_layers(unet):
        attn = unet.get_submodule(l.name)
        for lin in (attn.to_k, attn.to_v):
            assert type(lin) is torch.nn.Linear, f"{l.alias}: projection still wrapped ({type(lin).__name__})"
            assert not lin._forward_hooks, f"{l.alias}: a forward hook was left behind"
    assert "peft_config" not in unet.__dict__


class TestAttentionPrompt:
    """Layout of a prompt: one K and one V matrix per cross-attention layer, shaped like to_k / to_v."""

    def test_shapes_follow_projections(self, tiny_pipe):
        """Each layer's p^k / p^v has its to_k / to_v weight shape and starts at zero; aliases and paths both work."""
        p = AttentionPrompt.for_unet(tiny_pipe)
        layers = cross_attention_layers(tiny_pipe.unet)
        assert [l.name for l in p.layers] == [l.name for l in layers]
        for l in layers:
            attn = tiny_pipe.unet.get_submodule(l.name)
            assert p.get(l.alias, "k").shape == attn.to_k.weight.shape
            assert p.get(l.name, "v").shape == attn.to_v.weight.shape
            assert not p.get(l.alias, "k").any()
        assert sum(t.numel() for t in p.parameters()) == sum(
            tiny_pipe.unet.get_submodule(l.name).to_k.weight.numel() * 2 for l in layers)

    def test_lora_layout(self, tiny_pipe):
        """LoRA factors are A [rank, in] and B [out, rank] with B = 0, so the effective delta is zero."""
        p = AttentionPrompt.for_unet(tiny_pipe, "lora", rank=2, alpha=4)
        l = p.layers[0]
        a, b = p.lora(l.alias, "k")
        assert a.shape == (2, l.k_shape[1]) and b.shape == (l.k_shape[0], 2)
        assert p.scale == 2.0 and a.abs().sum() > 0 and not p.delta(l.alias, "v").any()

    def test_bad_arguments(self, tiny_pipe):
        """Unknown variant, rank < 1 or an unknown layer raise."""
        with pytest.raises(ValueError, match="variant"):
            AttentionPrompt.for_unet(tiny_pipe, "prefix")
        with pytest.raises(ValueError, match="rank"):
            AttentionPrompt.for_unet(tiny_pipe, "lora", rank=0)
        with pytest.raises(KeyError):
            AttentionPrompt.for_unet(tiny_pipe).get("nope", "k")


class TestApplyPrompt:
    """apply_prompt: exact at zero, effective otherwise, seen by scoring, and everything restored on exit."""

    @pytest.mark.parametrize("variant", ["additive", "lora"])
    def test_zero_prompt_leaves_output_unchanged(self, tiny_pipe, variant):
        """A zero-initialised prompt (additive p = 0; LoRA B = 0) gives a bit-identical UNet output."""
        ref = _unet_out(tiny_pipe)
        with apply_prompt(tiny_pipe, AttentionPrompt.for_unet(tiny_pipe, variant)):
            got = _unet_out(tiny_pipe)
        assert torch.equal(ref, got)

    def test_zero_prompt_under_trace(self, tiny_pipe, renders):
        """Under noised_unet_pass (capture processors) a zero prompt changes neither errors nor attention logits."""
        from models.unet_pass import encode_image

        z = encode_image(tiny_pipe, renders[0][0])
        ref = noised_unet_pass(tiny_pipe, z, [renders[0][1]], [300])
        with apply_prompt(tiny_pipe, AttentionPrompt.for_unet(tiny_pipe)):
            got = noised_unet_pass(tiny_pipe, z, [renders[0][1]], [300])
        assert torch.equal(ref.errors, got.errors)
        for k, v in ref.traces[0].logits.items():
            assert torch.equal(v, got.traces[0].logits[k])

    @pytest.mark.parametrize("variant", ["additive", "lora"])
    def test_nonzero_prompt_equals_weight_update(self, tiny_pipe, variant):
        """With a prompt the UNet computes exactly what W + delta in the weights would give (Eq. 5), within 1e-5."""
        p = _random_prompt(tiny_pipe, variant)
        with apply_prompt(tiny_pipe, p):
            got = _unet_out(tiny_pipe)
        unet = tiny_pipe.unet
        saved = {}
        try:
            with torch.no_grad():
                for l in p.layers:
                    for w in ("k", "v"):
                        lin = getattr(unet.get_submodule(l.name), f"to_{w}")
                        saved[(l.name, w)] = lin.weight.detach().clone()
                        lin.weight.add_(p.delta(l.alias, w))
            want = _unet_out(tiny_pipe)
        finally:
            with torch.no_grad():
                for (name, w), W in saved.items():
                    getattr(unet.get_submodule(name), f"to_{w}").weight.copy_(W)
        assert not torch.equal(got, _unet_out(tiny_pipe)), "the prompt had no effect"
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)

    def test_scoring_runs_with_prompt(self, tiny_pipe, renders):
        """score_image_captions under apply_prompt changes, and equals the training score f (prompt_scores)."""
        p = _random_prompt(tiny_pipe)
        img, caps = renders[0][0], [renders[0][1], renders[1][1]]
        plain = score_image_captions(tiny_pipe, img, caps, OPTS).by_caption
        with apply_prompt(tiny_pipe, p):
            scored = score_image_captions(tiny_pipe, img, caps, OPTS).by_caption
        f = prompt_scores(tiny_pipe, img, caps, OPTS, prompt=p)
        for c in caps:
            assert abs(scored[c] - plain[c]) > 1e-4
            assert scored[c] == pytest.approx(f[c], abs=1e-5)

    @pytest.mark.parametrize("variant", ["additive", "lora"])
    def test_restored_after_exit_and_exception(self, tiny_pipe, variant):
        """Processors, projection modules, hooks, peft_config and requires_grad flags come back, also after a raise."""
        procs = tiny_pipe.unet.attn_processors
        flags = [q.requires_grad for q in tiny_pipe.unet.parameters()]
        p = _random_prompt(tiny_pipe, variant)
        with apply_prompt(tiny_pipe, p):
            pass
        _assert_clean(tiny_pipe, procs)
        with pytest.raises(RuntimeError, match="boom"):
            with apply_prompt(tiny_pipe, p):
                raise RuntimeError("boom")
        _assert_clean(tiny_pipe, procs)
        assert [q.requires_grad for q in tiny_pipe.unet.parameters()] == flags

    def test_nested_and_mismatched_prompts_raise(self, tiny_pipe):
        """Applying twice at once, or a prompt with the wrong shapes, raises ValueError and leaves nothing applied."""
        procs = tiny_pipe.unet.attn_processors
        p = AttentionPrompt.for_unet(tiny_pipe)
        with apply_prompt(tiny_pipe, p):
            with pytest.raises(ValueError, match="already applied"):
                with apply_prompt(tiny_pipe, p):
                    pass
        bad = AttentionPrompt([dataclass_replace(p.layers[0], k_shape=(3, 3))])
        with pytest.raises(ValueError, match="shape"):
            with apply_prompt(tiny_pipe, bad):
                pass
        _assert_clean(tiny_pipe, procs)


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


@pytest.fixture(scope="module")
def trained(tiny_pipe, triplets):
    """Additive training run (6 steps, fixed noise) with before/after snapshots."""
    before = _snapshot(tiny_pipe)
    procs = tiny_pipe.unet.attn_processors
    flags = [q.requires_grad for q in tiny_pipe.unet.parameters()]
    loss0 = triplet_loss(tiny_pipe, triplets, OPTS)
    prompt, log = train_prompt(tiny_pipe, triplets, OPTS, steps=6, lr=1e-2, margin=0.2, seed=0)
    loss1 = triplet_loss(tiny_pipe, triplets, OPTS, prompt=prompt)
    return dict(before=before, procs=procs, flags=flags, loss0=loss0, loss1=loss1, prompt=prompt, log=log)


class TestTraining:
    """train_prompt: the triplet loss goes down, only the prompt changes, the pipeline is left as it was."""

    def test_loss_decreases(self, trained):
        """Six steps on three hand-made triplets lower the (fixed-noise) triplet loss."""
        assert trained["loss0"]["n_triplets"] == 3 and trained["loss0"]["loss"] > 0
        assert trained["loss1"]["loss"] < trained["loss0"]["loss"] - 0.01
        assert trained["log"][-1]["loss"] < trained["log"][0]["loss"]
        assert trained["log"][0]["loss"] == pytest.approx(trained["loss0"]["loss"], abs=1e-6)

    def test_log_and_meta(self, trained):
        """One log entry per step; the prompt records margin, steps and the scoring options."""
        log, p = trained["log"], trained["prompt"]
        assert [e["step"] for e in log] == list(range(1, 7))
        assert {"loss", "violations", "accuracy", "triplets", "rows", "seconds"} <= set(log[0])
        assert log[0]["rows"] == 6
        assert p.meta["margin"] == 0.2 and p.meta["steps"] == 6 and p.meta["options"]["timesteps"] == [200, 600]
        assert max(n["k"] for n in p.norms().values()) > 0

    def test_frozen_weights_untouched(self, tiny_pipe, trained):
        """UNet, VAE and text-encoder tensors are bit-identical; processors and requires_grad flags restored."""
        _assert_same_weights(tiny_pipe, trained["before"])
        _assert_clean(tiny_pipe, trained["procs"])
        assert [q.requires_grad for q in tiny_pipe.unet.parameters()] == trained["flags"]
        assert not tiny_pipe.unet.training

    def test_lora_variant_trains(self, tiny_pipe, triplets):
        """The LoRA variant (peft) lowers the loss too and leaves the base weights and modules untouched."""
        before = _snapshot(tiny_pipe)
        procs = tiny_pipe.unet.attn_processors
        loss0 = triplet_loss(tiny_pipe, triplets, OPTS)["loss"]
        p, log = train_prompt(tiny_pipe, triplets, OPTS, steps=4, lr=2e-2, variant="lora", rank=2)
        assert p.variant == "lora" and any(p.lora(l.alias, "k")[1].abs().sum() > 0 for l in p.layers)
        assert triplet_loss(tiny_pipe, triplets, OPTS, prompt=p)["loss"] < loss0
        _assert_same_weights(tiny_pipe, before)
        _assert_clean(tiny_pipe, procs)

    def test_restored_after_exception_in_training(self, tiny_pipe, triplets):
        """A callback that raises stops training; weights, processors and flags are restored."""
        before = _snapshot(tiny_pipe)
        procs = tiny_pipe.unet.attn_processors
        flags = [q.requires_grad for q in tiny_pipe.unet.parameters()]

        def stop(entry):
            raise KeyboardInterrupt("stop")

        with pytest.raises(KeyboardInterrupt):
            train_prompt(tiny_pipe, triplets[:1], OPTS, steps=3, lr=1e-2, callback=stop)
        _assert_same_weights(tiny_pipe, before)
        _assert_clean(tiny_pipe, procs)
        assert [q.requires_grad for q in tiny_pipe.unet.parameters()] == flags


class TestSaveLoad:
    """save_prompt / load_prompt: small safetensors files with the metadata."""

    @pytest.mark.parametrize("variant", ["additive", "lora"])
    def test_round_trip(self, tiny_pipe, tmp_path, variant):
        """Tensors come back identical, with variant, rank, alpha, layers, base model and meta."""
        p = _random_prompt(tiny_pipe, variant)
        p.meta.update({"margin": 0.1, "options": {"timesteps": [200, 600]}})
        path = save_prompt(p, tmp_path / "p.safetensors")
        q = load_prompt(path)
        assert q.header() == p.header()
        assert q.variant == variant and q.layers == p.layers and q.base_model == p.base_model != ""
        assert q.params.keys() == p.params.keys()
        assert all(torch.equal(p.params[k], q.params[k]) for k in p.params)
        with apply_prompt(tiny_pipe, q):
            got = _unet_out(tiny_pipe)
        with apply_prompt(tiny_pipe, p):
            assert torch.equal(got, _unet_out(tiny_pipe))

    def test_not_a_prompt(self, tmp_path):
        """A safetensors file without prompt metadata, or a non-safetensors file, raises ValueError."""
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
        with pytest.raises(ValueError, match="not a DiscoLens prompt"):
            load_prompt(tmp_path / "x.safetensors")
        (tmp_path / "junk.safetensors").write_bytes(b"not a file format")
        with pytest.raises(ValueError):
            load_prompt(tmp_path / "junk.safetensors")
        with pytest.raises(FileNotFoundError):
            load_prompt(tmp_path / "missing.safetensors")


class TestInputs:
    """Training data and argument checks."""

    def test_bad_training_arguments(self, tiny_pipe, triplets):
        """No pairs, steps < 1, lr <= 0, a negative margin, an unknown variant or a non-LSE scorer raise ValueError."""
        with pytest.raises(ValueError, match="no training pairs"):
            train_prompt(tiny_pipe, [], OPTS, steps=1)
        for kw, msg in (({"steps": 0}, "steps"), ({"steps": -2}, "steps"), ({"lr": 0.0}, "lr"),
                        ({"margin": -0.1}, "margin"), ({"variant": "prefix"}, "variant"),
                        ({"batch_size": 0}, "batch_size")):
            with pytest.raises(ValueError, match=msg):
                train_prompt(tiny_pipe, triplets, OPTS, **kw)
        with pytest.raises(ValueError, match="scorer"):
            train_prompt(tiny_pipe, triplets, MatchOptions(scorer="denoise"), steps=1)

    def test_collect_triplets_forms(self, renders):
        """Tuples in both orders and Triplet objects are accepted; malformed ones raise."""
        (x0, c0), (x1, c1), _ = renders
        t = collect_triplets([(x0, x1, c0), (x0, c0, c1), Triplet(x1, c1, neg_caption=c0)])
        assert [u.kind for u in t] == ["image", "caption", "caption"]
        assert t[0].image is x0 and t[0].neg_image is x1 and t[0].caption == c0
        with pytest.raises(ValueError):
            collect_triplets([(x0, c0)])
        with pytest.raises(ValueError, match="equals the positive"):
            collect_triplets([(x0, c0, c0)])
        with pytest.raises(ValueError, match="negatives"):
            collect_triplets([(x0, c0, c1)], negatives="hard")

    def test_benchmark_train_split(self):
        """Winoground's train split gives 2 image + 2 caption negatives per item; comvg has no image negatives."""
        from models.shapes.benchmarks import DEFAULT_ROOT, load_benchmark

        if not (DEFAULT_ROOT / "winoground" / "benchmark.json").is_file():
            pytest.skip("benchmarks not built")
        b = load_benchmark("winoground")
        n = len(b.split("train"))
        assert n > 0
        assert len(collect_triplets(b, "both")) == 4 * n
        img = collect_triplets(b, "image")
        assert len(img) == 2 * n and all(t.kind == "image" for t in img)
        with pytest.raises(ValueError, match="no training pairs"):
            collect_triplets("comvg", "image")
        assert len(collect_triplets("comvg", "caption")) == len(load_benchmark("comvg").split("train"))
