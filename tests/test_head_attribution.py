"""Tests of interp.scorers.head_weighted: captum probe gradients, Eq. 7 head weighting, the scorer hook."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from interp.scorers.head_weighted import (HeadWeightedScorer, attribute_maps, head_weighted_score, matching_objective,
                                          probe_gradients)
from interp.lse import lse_pool
from interp.tasks.matching import MatchOptions, score_image_captions
from interp.lse import SPECIAL
from models.attention_capture import (AttentionProbe, CaptureProcessor, ProbeProcessor, capture_cross_attention,
                                     cross_attention_layers, probed_attention)
from models.trace import real_token_count

CAPTIONS = ["a red circle", "a blue square on the left"]
OPTS = MatchOptions(timesteps=(250, 700))


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))


def _processors(unet):
    return {l.name: dict(unet.named_modules())[l.name].processor for l in cross_attention_layers(unet)}


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in module.modules())


class _Tiny(torch.nn.Module):
    """A two-'layer' toy: the first map goes through a probe and also shapes a second map."""

    def __init__(self, heads: int, n: int = 5, m: int = 3, d: int = 4) -> None:
        super().__init__()
        self.heads, self.n, self.m = heads, n, m
        self.to_map = torch.nn.Linear(d, heads * n * m)
        self.mix = torch.nn.Linear(heads * n * m, n * m)
        self.probe = AttentionProbe("toy")

    def rest(self, A: torch.Tensor) -> torch.Tensor:
        """f per row from the probed map A `[B, heads, n, m]` (direct pooling + a downstream map)."""
        second = torch.tanh(self.mix(A.flatten(1))).view(A.shape[0], 1, self.n, self.m)
        return lse_pool(A, 2.0).mean(dim=1) + lse_pool(second, 1.0).mean(dim=1)

    def raw_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_map(x).view(x.shape[0], self.heads, self.n, self.m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.probe(self.raw_map(x)))


class TestCaptumPath:
    """The captum gradient at a probe against hand-written autograd."""

    def test_gradient_equals_manual_autograd(self):
        """probe_gradients gives d(sum f)/dA exactly as torch.autograd.grad on the detached map does."""
        torch.manual_seed(0)
        net = _Tiny(heads=3).double()
        x = torch.randn(2, 4, dtype=torch.float64)
        got = probe_gradients(net, [net.probe], x)[0]
        A0 = net.raw_map(x).detach().requires_grad_(True)
        (want,) = torch.autograd.grad(net.rest(A0).sum(), A0)
        assert got.shape == want.shape == (2, 3, 5, 3)
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    def test_gxa_equals_captum_multiply_by_inputs(self):
        """attribute_maps(..., 'gxa') equals captum's LayerGradientXActivation with multiply_by_inputs."""
        torch.manual_seed(1)
        net = _Tiny(heads=2).double()
        x = torch.randn(3, 4, dtype=torch.float64)
        grad = probe_gradients(net, [net.probe], x)[0]
        gxa = probe_gradients(net, [net.probe], x, multiply_by_inputs=True)[0]
        torch.testing.assert_close(attribute_maps(net.raw_map(x), grad, "gxa"), gxa)

    def test_unused_probe_gets_zero_gradient(self):
        """A probe the output does not depend on gets zeros, not an error."""
        net = _Tiny(heads=2).double()
        idle = AttentionProbe("idle")
        x = torch.randn(2, 4, dtype=torch.float64)

        def fn(inp):
            idle(inp * 3)
            return net(inp)

        g_net, g_idle = probe_gradients(fn, [net.probe, idle], x)
        assert torch.count_nonzero(g_idle) == 0 and g_net.abs().max() > 0

    def test_no_hooks_left_after_exception(self):
        """captum's forward hooks on the probe are removed when the forward raises."""
        net = _Tiny(heads=2).double()

        def boom(inp):
            net(inp)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            probe_gradients(boom, [net.probe], torch.randn(2, 4, dtype=torch.float64))
        assert len(net.probe._forward_hooks) == 0 and len(net.probe._forward_pre_hooks) == 0


class TestVariants:
    """Eq. 7 (gradient summed over heads) against plain gradient x activation."""

    def test_eq7_by_hand(self):
        """eq7 multiplies each head's map by the head-summed gradient; gxa by its own."""
        A = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # [1, 2 heads, 1, 2]
        G = torch.tensor([[[[10.0, 20.0]], [[1.0, -1.0]]]])
        eq7 = attribute_maps(A, G, "eq7")
        gxa = attribute_maps(A, G, "gxa")
        torch.testing.assert_close(eq7, torch.tensor([[[[11.0, 38.0]], [[33.0, 76.0]]]]))
        torch.testing.assert_close(gxa, torch.tensor([[[[10.0, 40.0]], [[3.0, -4.0]]]]))

    def test_differ_with_several_heads(self):
        """With several heads and head-specific gradients the two variants differ."""
        g = torch.Generator().manual_seed(0)
        A, G = torch.rand(2, 4, 6, 3, generator=g), torch.randn(2, 4, 6, 3, generator=g)
        assert not torch.allclose(attribute_maps(A, G, "eq7"), attribute_maps(A, G, "gxa"))

    def test_agree_with_one_head(self):
        """With a single head the sum over heads is the head itself: eq7 == gxa, maps and pooled scores."""
        g = torch.Generator().manual_seed(1)
        A, G = torch.rand(2, 1, 6, 3, generator=g), torch.randn(2, 1, 6, 3, generator=g)
        eq7, gxa = attribute_maps(A, G, "eq7"), attribute_maps(A, G, "gxa")
        torch.testing.assert_close(eq7, gxa)
        cols = [[0, 1, 2], [1, 2]]
        torch.testing.assert_close(matching_objective({"l": eq7}, cols, ["l"]), matching_objective({"l": gxa}, cols, ["l"]))

    def test_one_head_through_captum(self):
        """A one-head toy probed with captum gives the same eq7 and gxa maps (and differs with 3 heads)."""
        torch.manual_seed(2)
        x = torch.randn(2, 4, dtype=torch.float64)
        for heads, same in ((1, True), (3, False)):
            net = _Tiny(heads=heads).double()
            A, G = net.raw_map(x), probe_gradients(net, [net.probe], x)[0]
            assert torch.allclose(attribute_maps(A, G, "eq7"), attribute_maps(A, G, "gxa")) is same

    def test_unknown_variant(self):
        """An unknown variant is an error."""
        with pytest.raises(ValueError, match="variant"):
            attribute_maps(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), "sum")
        with pytest.raises(ValueError, match="variant"):
            HeadWeightedScorer(variant="sum")


@pytest.fixture(scope="module")
def unet64(tiny_pipe):
    """A float64 copy of the tiny UNet with frozen parameters (the probe outputs are then graph leaves)."""
    u = copy.deepcopy(tiny_pipe.unet).double().eval()
    u.requires_grad_(False)
    return u


def _emb_cols(pipe, captions, tokens="words"):
    tok = pipe.tokenizer
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0].double()
    cols = []
    for row in ids:  # the real tokens (BOS ... EOS), or the words among them, as padded-sequence positions
        keep = list(range(real_token_count(row.tolist(), tok.eos_token_id)))
        names = [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(row[keep].tolist())]
        cols.append([j for j, t in zip(keep, names) if tokens == "all" or t not in SPECIAL])
    return emb, cols


class TestFiniteDifference:
    """The gradient used for head weighting against central differences through the real UNet."""

    @pytest.mark.parametrize("source", ["logits", "probs"])
    def test_gradient_matches_central_difference(self, tiny_pipe, unet64, source):
        """(f(A+e) - f(A-e)) / 2e at one map entry, injected by a probe hook, matches captum's gradient for
        every head of the first layer (gxa), and their sum matches the eq7 gradient."""
        emb, cols = _emb_cols(tiny_pipe, CAPTIONS)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
        t = torch.full((2,), 300, dtype=torch.long)
        with probed_attention(unet64, source) as ps:
            sel = ps.names

            def f_of(inp):
                ps.maps.clear()
                unet64(inp, t, encoder_hidden_states=emb)
                return matching_objective(ps.maps, cols, sel)

            grads = probe_gradients(f_of, ps.probes, x)
            maps0 = {n: m.detach() for n, m in ps.maps.items()}
            k, i, j, eps = 1, 7, cols[1][1], 1e-5
            probe, g0 = ps.probes[0], grads[0]  # first layer: its map also shapes every later map
            fd = []
            for h in range(g0.shape[1]):
                vals = []
                for sign in (1.0, -1.0):
                    def bump(mod, inp, out, h=h, sign=sign):
                        out = out.clone()
                        out[k, h, i, j] += sign * eps
                        return out
                    handle = probe.register_forward_hook(bump)
                    try:
                        with torch.no_grad():
                            vals.append(f_of(x))
                    finally:
                        handle.remove()
                fd.append((vals[0][k] - vals[1][k]) / (2 * eps))
                torch.testing.assert_close(vals[0][0], vals[1][0], rtol=0, atol=1e-13)  # rows independent
            fd = torch.stack(fd)
            used_gxa = g0[k, :, i, j]
            used_eq7 = g0[k, :, i, j].sum()
            assert fd.abs().max() > 1e-6
            torch.testing.assert_close(used_gxa, fd, rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(used_eq7, fd.sum(), rtol=1e-5, atol=1e-9)
            # the gradient is the total derivative, not just the direct pooling term of this layer
            A0 = maps0[ps.names[0]].clone().requires_grad_(True)
            (direct,) = torch.autograd.grad(matching_objective({**maps0, ps.names[0]: A0}, cols, sel).sum(), A0)
            assert not torch.allclose(direct[k, :, i, j], used_gxa, rtol=1e-3, atol=0)
        assert all(len(p._forward_hooks) == 0 for p in ps.probes)

    def test_probe_processor_keeps_unet_output(self, tiny_pipe):
        """ProbeProcessor computes the same UNet output as CaptureProcessor, for both probe placements."""
        unet = tiny_pipe.unet
        emb, _ = _emb_cols(tiny_pipe, CAPTIONS)
        emb = emb.float()
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
        t = torch.full((2,), 500, dtype=torch.long)
        with torch.no_grad():
            with capture_cross_attention(unet, lambda *a: None):
                ref = unet(x, t, encoder_hidden_states=emb).sample
            for source in ("logits", "probs"):
                with probed_attention(unet, source) as ps:
                    out = unet(x, t, encoder_hidden_states=emb).sample
                    assert len(ps.maps) == 7 and all(isinstance(p, AttentionProbe) for p in ps.probes)
                torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


class TestScorer:
    """head_weighted_score on the tiny pipeline."""

    @pytest.fixture(scope="class")
    def result(self, tiny_pipe):
        return head_weighted_score(tiny_pipe, _image(), CAPTIONS, OPTS)

    def test_scorer_fn_contract(self, result):
        """The result has the keys evaluate_matching reads, a float per caption, and honest counts."""
        assert set(result["scores"]) == set(CAPTIONS)
        assert all(isinstance(v, float) and np.isfinite(v) for v in result["scores"].values())
        S, K = len(OPTS.timesteps), len(CAPTIONS)
        assert result["unet_calls"] == S and result["unet_evals"] == S * K
        assert result["unet_backward_calls"] == S and result["unet_backwards"] == S * K
        sc = HeadWeightedScorer(variant="gxa", grad_norm="mean_abs")
        assert (sc.name, sc.variant, sc.grad_norm, sc.shares_pass) == ("head_weighted", "gxa", "mean_abs", False)

    def test_table_shape(self, result):
        """The attribution table is [7 layers, 4 heads] per caption, per step [S, 7, 4], finite."""
        assert len(result["layers"]) == 7 and result["heads"] == 4
        for c in CAPTIONS:
            pc = result["per_caption"][c]
            assert pc["table"].shape == (7, 4)
            assert pc["table_per_step"].shape == (len(OPTS.timesteps), 7, 4)
            assert np.isfinite(pc["table_per_step"]).all() and np.abs(pc["table"]).max() > 0
            np.testing.assert_allclose(pc["table"], pc["table_per_step"].mean(axis=0))
            assert pc["score"] == pytest.approx(np.mean(pc["by_step"]))

    def test_plain_score_equals_lse_scorer(self, tiny_pipe, result):
        """The plain score is score_image_captions' LSE score (same noise, options and batch)."""
        ref = score_image_captions(tiny_pipe, _image(), CAPTIONS, OPTS, scorer="lse").by_caption
        for c in CAPTIONS:
            assert result["plain_scores"][c] == pytest.approx(ref[c], rel=1e-5, abs=1e-6)

    def test_variants_differ_on_unet(self, tiny_pipe, result):
        """On the 4-head UNet eq7 and gxa give different tables and scores."""
        gxa = head_weighted_score(tiny_pipe, _image(), CAPTIONS, OPTS, variant="gxa")
        c = CAPTIONS[0]
        assert not np.allclose(gxa["per_caption"][c]["table"], result["per_caption"][c]["table"])
        assert gxa["plain_scores"] == pytest.approx(result["plain_scores"])

    def test_mean_abs_keeps_map_scale(self, tiny_pipe, result):
        """grad_norm='mean_abs' differs from the raw Eq. 7 score, which sits near log(m) of the tokens."""
        normed = head_weighted_score(tiny_pipe, _image(), CAPTIONS, OPTS, grad_norm="mean_abs")
        for c in CAPTIONS:
            assert normed["scores"][c] != pytest.approx(result["scores"][c], rel=1e-3)

    def test_leaves_no_state(self, tiny_pipe):
        """Processors are the same objects after, no hooks are left, no parameter gradient accumulates."""
        unet = tiny_pipe.unet
        before, hooks = _processors(unet), _hook_count(unet)
        head_weighted_score(tiny_pipe, _image(), CAPTIONS[:1], MatchOptions(timesteps=(400,), layers="last_per_stage"))
        after = _processors(unet)
        assert all(after[n] is before[n] for n in before)
        assert _hook_count(unet) == hooks
        assert all(p.grad is None for p in unet.parameters())


class TestRestoration:
    """Processors and hooks come back after an exception."""

    def test_exception_mid_forward(self, tiny_pipe):
        """A failure inside the UNet forward restores the processors and leaves no hook on the probes."""
        unet = tiny_pipe.unet
        before, hooks = _processors(unet), _hook_count(unet)
        seen = []

        def fail(mod, inp):
            procs = _processors(unet)
            seen.extend(p.probe for p in procs.values() if isinstance(p, ProbeProcessor))
            assert all(len(p._forward_hooks) == 1 for p in seen)  # captum's hooks are on while it runs
            raise RuntimeError("mid block failed")

        handle = unet.mid_block.register_forward_pre_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="mid block failed"):
                head_weighted_score(tiny_pipe, _image(), CAPTIONS, MatchOptions(timesteps=(400,)))
        finally:
            handle.remove()
        assert len(seen) == 7
        assert all(len(p._forward_hooks) == 0 and len(p._forward_pre_hooks) == 0 for p in seen)
        after = _processors(unet)
        assert all(after[n] is before[n] for n in before)
        assert not any(isinstance(p, CaptureProcessor) for p in after.values())
        assert _hook_count(unet) == hooks

    def test_probed_attention_restores(self, tiny_pipe):
        """probed_attention restores the processors when its block raises."""
        unet = tiny_pipe.unet
        before = _processors(unet)
        with pytest.raises(KeyError):
            with probed_attention(unet, "probs"):
                assert all(isinstance(p, ProbeProcessor) for p in _processors(unet).values())
                raise KeyError("x")
        after = _processors(unet)
        assert all(after[n] is before[n] for n in before)
