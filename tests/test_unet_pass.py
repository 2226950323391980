"""Tests of models.unet_pass: the one noised pass (rows, grad mode, padded traces, block features, noise)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from interp.scorers.base import MatchOptions, PassSpec, ScoreResult, Scorer
from models.adapters.attention_prompt import AttentionPrompt, apply_prompt
from models.unet_pass import PassResult, check_pass_args, draw_noise, encode_image, noised_unet_pass

CAPS = ["a red circle", "a blue square on the left"]
TS = [250, 700]


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def latent(tiny_pipe):
    return encode_image(tiny_pipe, _image())


@pytest.fixture(scope="module")
def plain(tiny_pipe, latent):
    """The default pass: no grad, real-token traces, with the unconditional row."""
    return noised_unet_pass(tiny_pipe, latent, CAPS, TS, noise_seed=3, uncond=True)


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


class TestGradMode:
    """grad=True: the same maps, with their graph."""

    def test_maps_equal_no_grad_maps(self, tiny_pipe, latent, plain):
        """Every traced logit / prob map of the grad pass equals the no-grad pass's, and carries a graph."""
        g = noised_unet_pass(tiny_pipe, latent, CAPS, TS, noise_seed=3, uncond=True, grad=True)
        for a, b in zip(plain.traces + [plain.uncond_trace], g.traces + [g.uncond_trace]):
            assert a.tokens == b.tokens and a.token_index == b.token_index
            for kind in ("logits", "probs"):
                for alias, x in getattr(a, kind).items():
                    y = getattr(b, kind)[alias]
                    torch.testing.assert_close(y.detach().cpu(), x, rtol=0, atol=0)
        assert g.traces[0].logits["mid.attn.0"].grad_fn is not None
        torch.testing.assert_close(g.errors, plain.errors, rtol=0, atol=0)

    def test_gradients_reach_prompt_parameters(self, tiny_pipe, latent):
        """A score of the grad pass's maps back-propagates to an applied prompt's K deltas (UNet frozen)."""
        prompt = AttentionPrompt.for_unet(tiny_pipe, "additive")
        unet = tiny_pipe.unet
        flags = [p.requires_grad for p in unet.parameters()]
        unet.requires_grad_(False)
        try:
            with apply_prompt(tiny_pipe, prompt):
                res = noised_unet_pass(tiny_pipe, latent, CAPS, [400], grad=True)
                f = sum(t.logits[a].logsumexp(-1).mean() for t in res.traces for a in t.logits)
                f.backward()
        finally:
            for p, fl in zip(unet.parameters(), flags):
                p.requires_grad_(fl)
        grads = [prompt.get(l.alias, "k").grad for l in prompt.layers]
        assert all(g is not None for g in grads) and max(float(g.abs().max()) for g in grads) > 0
        assert all(p.grad is None for p in unet.parameters())

    def test_no_grad_pass_has_no_graph(self, plain):
        """Without grad the maps are plain CPU tensors."""
        x = plain.traces[0].logits["mid.attn.0"]
        assert x.grad_fn is None and not x.requires_grad and x.device.type == "cpu"


class TestPadded:
    """padded=True: every key column of the padded text."""

    @pytest.fixture(scope="class")
    def padded(self, tiny_pipe, latent):
        return noised_unet_pass(tiny_pipe, latent, CAPS, TS, noise_seed=3, uncond=True, padded=True)

    def test_max_length_columns(self, tiny_pipe, padded):
        """Caption and "" traces have max_length columns, token_index = range(max_length), named tokens."""
        L = tiny_pipe.tokenizer.model_max_length
        for t in padded.traces + [padded.uncond_trace]:
            assert t.token_index == list(range(L)) and len(t.tokens) == L
            assert all(x.shape[-1] == L for x in list(t.probs.values()) + list(t.logits.values()))
            assert all(isinstance(s, str) and s for s in t.tokens)

    def test_real_columns_equal_default_trace(self, plain, padded):
        """The first n_real columns are the default trace's columns, value for value; the prompt text is the same."""
        for a, b in zip(plain.traces + [plain.uncond_trace], padded.traces + [padded.uncond_trace]):
            n = len(a.tokens)
            assert b.n_real == n == a.n_real and b.tokens[:n] == a.tokens and b.prompt == a.prompt
            for alias in a.logits:
                torch.testing.assert_close(b.logits[alias][..., :n], a.logits[alias], rtol=0, atol=0)
                torch.testing.assert_close(b.probs[alias][..., :n], a.probs[alias], rtol=0, atol=0)

    def test_probs_sum_to_one_over_all_columns(self, padded):
        """With every column kept, the probabilities of each position sum to 1."""
        p = padded.traces[0].probs["mid.attn.0"]
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), rtol=1e-5, atol=1e-5)

    def test_scorer_passes_padded(self, tiny_pipe):
        """Scorer.score hands every PassSpec field to the pass (here: padded, uncond)."""
        seen: list[PassResult] = []

        class _Probe(Scorer):
            name = "probe"

            def needs(self, options, captions=()):
                return PassSpec(padded=True, uncond=True)

            def score_pass(self, res, options):
                seen.append(res)
                return ScoreResult(self.name, list(res.captions), [0.0] * len(res.captions), res.unet_calls,
                                   res.unet_evals)

        _Probe().score(tiny_pipe, _image(), CAPS[:1], MatchOptions(timesteps=(300,)))
        L = tiny_pipe.tokenizer.model_max_length
        assert len(seen[0].traces[0].tokens) == L and len(seen[0].uncond_trace.tokens) == L


class TestNoiseAndRows:
    """One noise draw per timestep, shared by every row; one latent per row."""

    def test_noise_is_the_seeded_draw(self, latent, plain):
        """PassResult.noise is draw_noise(seed) and has one [C, h, w] draw per timestep."""
        torch.testing.assert_close(plain.noise, draw_noise(3, len(TS), latent.shape[1:]))
        assert plain.noise.shape == (len(TS), *latent.shape[1:])

    def test_same_noise_for_all_rows(self, tiny_pipe, latent):
        """A repeated caption gets the same errors and maps as its first occurrence (same noise, same input)."""
        r = noised_unet_pass(tiny_pipe, latent, [CAPS[0], CAPS[1], CAPS[0]], [300])
        torch.testing.assert_close(r.errors[0], r.errors[2], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(r.traces[0].logits["mid.attn.0"], r.traces[2].logits["mid.attn.0"],
                                   rtol=1e-5, atol=1e-6)

    def test_rows_of_latents(self, tiny_pipe, latent):
        """With one latent per caption, row k equals the pass of caption k on latent k alone."""
        other = encode_image(tiny_pipe, _image(1))
        both = noised_unet_pass(tiny_pipe, torch.cat([latent, other]), CAPS, [300], noise_seed=1)
        for k, z in enumerate((latent, other)):
            alone = noised_unet_pass(tiny_pipe, z, [CAPS[k]], [300], noise_seed=1)
            torch.testing.assert_close(both.errors[k], alone.errors[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(both.traces[k].logits["up.1.attn.0"], alone.traces[0].logits["up.1.attn.0"],
                                       rtol=1e-4, atol=1e-5)

    def test_explicit_noise(self, tiny_pipe, latent, plain):
        """An explicit noise equal to the seeded draw gives the same errors; a wrong shape is refused."""
        r = noised_unet_pass(tiny_pipe, latent, CAPS, TS, uncond=True, noise=draw_noise(3, len(TS), latent.shape[1:]))
        torch.testing.assert_close(r.errors, plain.errors, rtol=0, atol=0)
        assert r.noise_seed == -1
        with pytest.raises(ValueError, match="noise must be"):
            noised_unet_pass(tiny_pipe, latent, CAPS, TS, noise=torch.zeros(1, 4, 16, 16))


class TestFeatures:
    """features=[block names]: block outputs through forward hooks, removed on exit."""

    def test_shapes_and_hooks_removed(self, tiny_pipe, latent):
        """[K, S, C, h, w] per block (uncond row: [S, C, h, w]); no hook left behind."""
        unet = tiny_pipe.unet
        hooks = _hooks(unet)
        names = ["down_blocks.0", "mid_block", "up_blocks.1"]
        r = noised_unet_pass(tiny_pipe, latent, CAPS, TS, uncond=True, features=names, traced=False)
        assert _hooks(unet) == hooks and r.traces == [] and r.uncond_trace is None
        h = latent.shape[-1]
        chans = unet.config.block_out_channels
        down0 = r.features["down_blocks.0"]
        assert down0.shape == (2, 2, chans[0], h // 2, h // 2)
        assert r.features["mid_block"].shape == (2, 2, chans[-1], h // 4, h // 4)
        assert r.features["up_blocks.1"].shape[:2] == (2, 2) and r.features["up_blocks.1"].dim() == 5
        assert r.uncond_features["up_blocks.1"].shape == r.features["up_blocks.1"].shape[1:]

    def test_features_with_grad(self, tiny_pipe, latent):
        """In grad mode the features keep their graph."""
        r = noised_unet_pass(tiny_pipe, latent, CAPS[:1], [300], features=["up_blocks.1"], grad=True)
        assert r.features["up_blocks.1"].grad_fn is not None

    def test_unknown_block_and_restored_after_error(self, tiny_pipe, latent):
        """An unknown block is a ValueError; a failing UNet call leaves no hook and the processors restored."""
        unet = tiny_pipe.unet
        hooks, procs = _hooks(unet), unet.attn_processors
        with pytest.raises(ValueError, match="unknown UNet blocks"):
            noised_unet_pass(tiny_pipe, latent, CAPS, [300], features=["up_blocks.9"])

        def fail(mod, inp):
            raise RuntimeError("boom")

        h = unet.mid_block.register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                noised_unet_pass(tiny_pipe, latent, CAPS, [300], features=["up_blocks.1"], grad=True)
        finally:
            h.remove()
        assert _hooks(unet) == hooks
        assert all(unet.attn_processors[k] is v for k, v in procs.items())


class TestValidation:
    """check_pass_args and the latent checks."""

    def test_check_pass_args(self):
        """Lists come back; bad captions and timesteps are ValueErrors."""
        assert check_pass_args(("a", "b"), torch.tensor([1, 2]), 10) == (["a", "b"], [1, 2])
        for caps, ts, msg in (("a", [1], "list of strings"), ([], [1], "empty"), (["a", " "], [1], "empty"),
                              (["a"], [], "timesteps is empty"), (["a"], [1.5], "not an integer"),
                              (["a"], [10], "out of range")):
            with pytest.raises(ValueError, match=msg):
                check_pass_args(caps, ts, 10)

    def test_uncond_needs_a_shared_latent(self, tiny_pipe, latent):
        """One latent per caption with uncond=True, or a latent batch of the wrong size, is refused."""
        with pytest.raises(ValueError, match="uncond"):
            noised_unet_pass(tiny_pipe, torch.cat([latent, latent]), CAPS, [300], uncond=True)
        with pytest.raises(ValueError, match="latent must be"):
            noised_unet_pass(tiny_pipe, torch.cat([latent] * 3), CAPS, [300])
