"""The Discffusion authors' score (interp.scorers.discffusion): timesteps, layers, a hand-computed pass, end to end."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interp.scorers.base import DEFAULT_TIMESTEPS, MatchOptions, PassSpec
from interp.scorers.discffusion import DiscffusionScorer, authors_timesteps, denoise_term, discffusion_layers
from models.trace import AttentionTrace, LayerInfo
from models.unet_pass import PassResult

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
ln = math.log


# ----------------------------------------------------------------------------------------------
# A hand-made padded pass: 6 layers (4 of them the authors'), 2 heads, 1x2 positions, 4 key columns
# ----------------------------------------------------------------------------------------------
NAMES = {  # alias -> module path; the authors' layers: down.1.attn.0, mid.attn.0, up.2.attn.0, up.2.attn.1
    "down.0.attn.0": "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down.1.attn.0": "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "mid.attn.0": "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up.1.attn.0": "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up.2.attn.0": "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "up.2.attn.1": "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
}
AUTHORS = ["down.1.attn.0", "mid.attn.0", "up.2.attn.0", "up.2.attn.1"]
S, HEADS = 2, 2


def _maps(rows: dict[str, list[list[float]]]) -> dict[str, torch.Tensor]:
    """Per alias, the per-head key-column values v (positive); logits = log(v), so a row's logsumexp is ln(sum v).
    Every step and both positions get the same row."""
    out = {}
    for alias, per_head in rows.items():
        x = torch.tensor(per_head, dtype=torch.float64).log()  # [heads, keys]
        out[alias] = x[None, :, None, None, :].expand(S, HEADS, 1, 2, 4).float().clone()
    return out


def _trace(prompt: str, tokens: list[str], rows) -> AttentionTrace:
    layers = [LayerInfo(NAMES[a], a, HEADS, 1, 2) for a in NAMES]
    logits = _maps(rows)
    probs = {a: v.softmax(-1) for a, v in logits.items()}
    return AttentionTrace(prompt, tokens, list(range(len(tokens))), [100.0, 500.0], layers, [0, 1], probs, logits)


BIG = [[1e6] * 4] * HEADS  # the layers the authors do not read: would swamp the score if read


def _rows(authors: dict[str, list[list[float]]]) -> dict:
    return {a: authors.get(a, BIG) for a in NAMES}


def fake_pass(uncond_tokens: int = 4) -> PassResult:
    red = _rows({"down.1.attn.0": [[1, 2, 3, 4]] * 2,                 # ln 10 per head
                 "mid.attn.0": [[1, 2, 3, 4], [5, 5, 5, 5]],          # heads ln 10, ln 20
                 "up.2.attn.0": [[1, 2, 3, 4]] * 2,                   # ln 10
                 "up.2.attn.1": [[1, 1, 1, 1]] * 2})                  # ln 4
    blue = _rows({a: [[2, 2, 2, 2]] * 2 for a in AUTHORS})           # ln 8 everywhere
    empty = _rows({a: [[1, 1, 1, 1]] * 2 for a in AUTHORS})          # ln 4 everywhere
    tr_u = _trace("", [BOS, EOS, EOS, EOS], empty)
    if uncond_tokens != 4:  # an unpadded "" row: BOS, EOS only
        tr_u = AttentionTrace("", [BOS, EOS], [0, 1], tr_u.timesteps, tr_u.layers, [0, 1],
                              {a: v[..., :2] for a, v in tr_u.probs.items()},
                              {a: v[..., :2] for a, v in tr_u.logits.items()})
    # epsilon-space MSEs over a latent of 1*2*2 = 4 numbers: ||e|| = sqrt(4 * mse)
    errors_eps = torch.tensor([[1.0, 0.25],    # red:  norms 2, 1
                               [4.0, 1.0]])    # blue: norms 4, 2
    uncond_eps = torch.tensor([2.25, 1.0])     # "":   norms 3, 2
    return PassResult(captions=["red", "blue"], timesteps=[100, 500],
                      traces=[_trace("red", [BOS, "red", EOS, EOS], red), _trace("blue", [BOS, "blue", EOS, EOS], blue)],
                      errors=errors_eps.clone(), errors_eps=errors_eps, noise=torch.zeros(S, 1, 2, 2),
                      prediction_type="v_prediction", unet_calls=S, unet_evals=S * 3, noise_seed=0,
                      uncond_errors=uncond_eps.clone(), uncond_errors_eps=uncond_eps, uncond_trace=tr_u)


class TestAuthorsTimesteps:
    def test_default_is_their_30(self):
        """dsd_infer's 30 sampling steps: rate int(1000/30) = 33 from index 10, t = 999 - index, ascending."""
        ts = authors_timesteps()
        assert ts == tuple(range(32, 990, 33))
        assert len(ts) == 30 and ts[0] == 32 and ts[-1] == 989

    def test_demo_50(self):
        """model.py's demo: 50 sampling steps, rate 20: 49 timesteps 29 ... 989."""
        ts = authors_timesteps(50)
        assert ts == tuple(range(29, 990, 20)) and len(ts) == 49

    def test_bad_steps(self):
        with pytest.raises(ValueError):
            authors_timesteps(0)


class TestLayers:
    def test_fake_names(self):
        """Last cross-attention block per stage, every attention in it."""
        layers = [LayerInfo(n, a, 1, 1, 1) for a, n in NAMES.items()]
        assert discffusion_layers(layers) == [NAMES[a] for a in AUTHORS]

    def test_tiny_pipeline(self, tiny_pipe):
        """The bundled layout: down.1.attn.0, mid.attn.0, up.2.attn.0, up.2.attn.1."""
        from models.attention_capture import cross_attention_layers

        ls = cross_attention_layers(tiny_pipe.unet)
        keep = set(discffusion_layers(ls))
        assert [l.alias for l in ls if l.name in keep] == AUTHORS

    @pytest.mark.parametrize("arch,want", [
        ("sd15", ["down.2.attn.0", "down.2.attn.1", "mid.attn.0", "up.3.attn.0", "up.3.attn.1", "up.3.attn.2"]),
        ("sd21base", ["down.2.attn.0", "down.2.attn.1", "mid.attn.0", "up.3.attn.0", "up.3.attn.1", "up.3.attn.2"]),
    ])
    def test_reference_unets(self, arch, want):
        """SD 1.5 / 2.1 structure (real configs, scaled down): derived from the UNet, not a list."""
        from diffusers import UNet2DConditionModel

        from models.attention_capture import cross_attention_layers
        from models.reference_configs import load_reference_config, scaled_config

        unet = UNet2DConditionModel.from_config(scaled_config(load_reference_config(arch, "unet"), 8))
        ls = cross_attention_layers(unet)
        keep = set(discffusion_layers(ls))
        assert [l.alias for l in ls if l.name in keep] == want

    def test_last_transformer_block_only(self):
        """Stacked transformer blocks (SDXL): each attention counts by its last block's cross-attention."""
        names = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.attentions.0.transformer_blocks.1.attn2",
                 "mid_block.attentions.0.transformer_blocks.0.attn2", "mid_block.attentions.0.transformer_blocks.1.attn2",
                 "up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up_blocks.0.attentions.0.transformer_blocks.1.attn2",
                 "up_blocks.0.attentions.1.transformer_blocks.0.attn2", "up_blocks.0.attentions.1.transformer_blocks.1.attn2"]
        layers = [LayerInfo(n, n, 1, 1, 1) for n in names]
        assert discffusion_layers(layers) == [names[1], names[3], names[5], names[7]]

    def test_missing_stage(self):
        layers = [LayerInfo(NAMES[a], a, 1, 1, 1) for a in ("down.1.attn.0", "up.2.attn.0")]
        with pytest.raises(ValueError, match="mid"):
            discffusion_layers(layers)


class TestDenoiseTerm:
    def test_norms_from_mse(self):
        """||e|| = sqrt(numel * mse): uncond norms 3, 2 minus caption norms 2, 1."""
        np.testing.assert_allclose(denoise_term([[1.0, 0.25]], [2.25, 1.0], numel=4), [[1.0, 1.0]])

    def test_shapes_checked(self):
        with pytest.raises(ValueError):
            denoise_term([[1.0, 0.25]], [2.25], numel=4)


class TestScorePass:
    def test_hand_computed(self):
        """score = 1/2 (caption LSE + "" LSE) over the authors' layers, all 4 columns, + mean norm difference."""
        res = DiscffusionScorer().score_pass(fake_pass(), MatchOptions())
        a_red = (ln(10) + (ln(10) + ln(20)) / 2 + ln(10) + ln(4)) / 4   # mean over 4 layers (mid: mean of 2 heads)
        a_blue, a_empty = ln(8), ln(4)
        d_red = ((3 - 2) + (2 - 1)) / 2                                  # mean over the 2 steps
        d_blue = ((3 - 4) + (2 - 2)) / 2
        want = [(a_red + a_empty) / 2 + d_red, (a_blue + a_empty) / 2 + d_blue]
        np.testing.assert_allclose(res.scores, want, rtol=0, atol=1e-6)
        np.testing.assert_allclose(res.extra["attention_caption"], [a_red, a_blue], atol=1e-6)
        assert res.extra["attention_uncond"] == pytest.approx(a_empty, abs=1e-6)
        np.testing.assert_allclose(res.extra["denoise"], [d_red, d_blue])
        assert res.extra["layers"] == AUTHORS
        assert res.unet_calls == S and res.unet_evals == S * 3
        assert res.breakdown["red"].tokens == [BOS, "red", EOS, EOS]

    def test_without_bias(self):
        """bias=False (their --bias flag): the attention term alone."""
        res = DiscffusionScorer(bias=False).score_pass(fake_pass(), MatchOptions())
        np.testing.assert_allclose(res.scores[1], (ln(8) + ln(4)) / 2, atol=1e-6)

    def test_layers_option(self):
        """MatchOptions.layers other than None replaces the authors' layers."""
        res = DiscffusionScorer(bias=False).score_pass(fake_pass(), MatchOptions(layers=["down.0.attn.0"]))
        np.testing.assert_allclose(res.scores, [ln(4e6)] * 2, rtol=1e-6)

    def test_unpadded_pass_refused(self):
        with pytest.raises(ValueError, match="padded"):
            DiscffusionScorer().score_pass(fake_pass(uncond_tokens=2), MatchOptions())

    def test_cosine_refused(self):
        with pytest.raises(ValueError, match="cosine"):
            DiscffusionScorer().score_pass(fake_pass(), MatchOptions(pooling="cosine"))


class TestOptions:
    def test_needs(self):
        assert DiscffusionScorer().needs(MatchOptions()) == PassSpec(logits=True, uncond=True, padded=True)
        assert DiscffusionScorer().needs(MatchOptions(source="probs")) == PassSpec(uncond=True, padded=True)

    def test_timesteps_rule(self):
        """Unset (the project default) -> the scorer's own (the authors' 30); anything else as given."""
        sc = DiscffusionScorer()
        assert sc.timesteps_for(MatchOptions()) == authors_timesteps()
        assert sc.timesteps_for(MatchOptions(timesteps=(100, 700))) == (100, 700)
        assert DiscffusionScorer(timesteps=DEFAULT_TIMESTEPS).timesteps_for(MatchOptions()) == DEFAULT_TIMESTEPS


# ----------------------------------------------------------------------------------------------
# End to end on the tiny pipeline
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image():
    from models.shapes import world

    return world.render(world.scene_from_caption("a red circle left of a blue square", np.random.default_rng(0)))


CAPS = ["a red circle left of a blue square", "a green triangle"]


class TestEndToEnd:
    def test_authors_timesteps_and_padded_pass(self, tiny_pipe, image):
        """Default options: 30 UNet calls at t = 32 ... 989, every padded column traced, K + 1 rows each."""
        res = DiscffusionScorer().score(tiny_pipe, image, CAPS, MatchOptions())
        pr = res.pass_result
        assert pr.timesteps == list(authors_timesteps())
        assert res.unet_calls == 30 and res.unet_evals == 30 * 3
        n = tiny_pipe.tokenizer.model_max_length
        assert all(len(t.tokens) == n for t in [*pr.traces, pr.uncond_trace])
        assert res.extra["layers"] == AUTHORS
        assert all(math.isfinite(s) for s in res.scores)

    def test_recomputed_from_the_unet(self, tiny_pipe, image):
        """The score from the pass equals a direct recomputation: logsumexp of the traced logits over all
        columns, and the norms of eps - eps_hat from fresh UNet calls (v-prediction converted to epsilon)."""
        from models.unet_pass import encode_image, to_epsilon

        ts = (100, 700)
        res = DiscffusionScorer().score(tiny_pipe, image, CAPS, MatchOptions(timesteps=ts, noise_seed=3))
        pr = res.pass_result
        assert pr.timesteps == list(ts)

        def attn(tr):
            return np.mean([torch.logsumexp(tr.logits[a].double(), dim=-1).mean().item() for a in AUTHORS])

        a_u = attn(pr.uncond_trace)
        pipe, sched = tiny_pipe, tiny_pipe.scheduler
        z = encode_image(pipe, image)
        tok = pipe.tokenizer
        ids = tok(CAPS + [""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        emb = pipe.text_encoder(ids)[0]
        acp = sched.alphas_cumprod.float()
        d = np.zeros((len(CAPS) + 1, len(ts)))
        with torch.no_grad():
            for s, t in enumerate(ts):
                eps = pr.noise[s : s + 1].expand(3, -1, -1, -1)
                tt = torch.full((3,), t, dtype=torch.long)
                x_t = sched.add_noise(z.expand(3, -1, -1, -1), eps, tt)
                pred = pipe.unet(x_t, tt, encoder_hidden_states=emb).sample.float()
                eps_hat = to_epsilon(pred, x_t, acp[t], sched.config.prediction_type)
                d[:, s] = (eps - eps_hat).flatten(1).norm(dim=1).numpy()
        want = [(attn(tr) + a_u) / 2 + float(np.mean(d[-1] - d[k])) for k, tr in enumerate(pr.traces)]
        np.testing.assert_allclose(res.scores, want, rtol=1e-4, atol=1e-4)
