"""Discffusion scoring: Eq. 4 pooling, score breakdowns, ranking, the denoising baseline and the noised UNet pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from interp.lse import denoising_score, lse_pool, lse_score, pool, rank_captions, select_layers
from models.trace import AttentionTrace, LayerInfo

A23 = [[0.0, 1.0, 2.0], [3.0, 0.0, 1.0]]  # 2 positions x 3 tokens


def _row_lse(row, lam=1.0):
    return math.log(sum(math.exp(lam * a) for a in row)) / lam


def _synthetic_trace(with_logits=False, stages=("down_blocks.0", "mid_block", "up_blocks.0")):
    """3 tokens (BOS, 'red', EOS), 2 steps, 2 heads; layer l, step s, head h is constant c = 10l + s + h,
    except the 'red' column, which holds -c."""
    tokens = ["<|startoftext|>", "red", "<|endoftext|>"]
    layers, probs = [], {}
    for l, prefix in enumerate(stages):
        stage = prefix.split("_")[0]
        alias = "mid.attn.0" if stage == "mid" else f"{stage}.0.attn.0"
        layers.append(LayerInfo(f"{prefix}.attentions.0.transformer_blocks.0.attn2", alias, 2, 2, 2))
        x = torch.zeros(2, 2, 2, 2, 3)
        for s in range(2):
            for h in range(2):
                c = 10 * l + s + h
                x[s, h] = c
                x[s, h, ..., 1] = -c
        probs[alias] = x
    logits = {k: v.clone() for k, v in probs.items()} if with_logits else {}
    return AttentionTrace("red", tokens, [0, 1, 2], [900.0, 100.0], layers, None, probs, logits)


def _cell(c, lam=1.0):
    """Eq. 4 of a constant-c map whose 'red' column holds -c (3 tokens)."""
    return _row_lse([c, -c, c], lam)


class TestLsePool:
    def test_eq4_on_hand_example(self):
        """A 2x3 map scores the mean over rows of log sum_j exp(A_ij)."""
        expected = (_row_lse(A23[0]) + _row_lse(A23[1])) / 2
        assert lse_pool(torch.tensor(A23)).item() == pytest.approx(expected, abs=1e-12)

    def test_lam_scales_inside_and_outside(self):
        """lam = 2 gives the mean of (1/2) log sum_j exp(2 A_ij)."""
        expected = (0.5 * math.log(math.exp(0) + math.exp(2) + math.exp(4))
                    + 0.5 * math.log(math.exp(6) + math.exp(0) + math.exp(2))) / 2
        assert lse_pool(A23, lam=2.0).item() == pytest.approx(expected, abs=1e-12)

    def test_large_lam_tends_to_row_max(self):
        """With a large lam, Eq. 4 approaches the mean of the row maxima."""
        assert lse_pool(A23, lam=200.0).item() == pytest.approx((2.0 + 3.0) / 2, abs=1e-3)

    def test_batched_equals_each_map(self):
        """A [2, n, m] batch scores each map as it does alone."""
        B = [[1.0, 1.0, 1.0], [0.5, -0.5, 2.0]]
        got = lse_pool(torch.tensor([A23, B]))
        assert got.shape == (2,)
        assert got[0].item() == pytest.approx(lse_pool(A23).item(), abs=1e-12)
        assert got[1].item() == pytest.approx(lse_pool(B).item(), abs=1e-12)

    def test_nonpositive_lam_is_rejected(self):
        """lam <= 0 is a ValueError."""
        with pytest.raises(ValueError, match="lam"):
            lse_pool(A23, lam=0.0)


class TestPoolingVariants:
    def test_mean(self):
        """'mean' averages all entries."""
        assert pool(A23, "mean").item() == pytest.approx(7 / 6, abs=1e-12)

    def test_max_rows(self):
        """'max_rows' takes each position's max over tokens, then the mean over positions."""
        assert pool(A23, "max_rows").item() == pytest.approx((2 + 3) / 2, abs=1e-12)

    def test_max_cols(self):
        """'max_cols' takes each token's max over positions, then the mean over tokens."""
        assert pool(A23, "max_cols").item() == pytest.approx((3 + 1 + 2) / 3, abs=1e-12)

    def test_unknown_pooling_is_rejected(self):
        """An unknown pooling name is a ValueError naming it."""
        with pytest.raises(ValueError, match="median"):
            pool(A23, "median")


class TestLseScore:
    def test_table_is_layers_by_steps_mean_over_heads(self):
        """Cell (l, s) is the mean over the two heads of Eq. 4."""
        b = lse_score(_synthetic_trace())
        expected = [[(_cell(10 * l + s) + _cell(10 * l + s + 1)) / 2 for s in range(2)] for l in range(3)]
        assert b.table.shape == (3, 2)
        np.testing.assert_allclose(b.table, expected, atol=1e-9)

    def test_score_is_the_mean_of_the_table(self):
        """The total score weighs every layer and step equally."""
        b = lse_score(_synthetic_trace())
        assert b.score == pytest.approx(float(np.mean(b.table)), abs=1e-12)

    def test_metadata_names_rows_and_columns(self):
        """The breakdown carries layer aliases, timesteps and the pooled tokens as plain data."""
        d = lse_score(_synthetic_trace(), steps=[1]).as_dict()
        assert d["layers"] == ["down.0.attn.0", "mid.attn.0", "up.0.attn.0"]
        assert d["timesteps"] == [100.0]
        assert d["tokens"] == ["<|startoftext|>", "red", "<|endoftext|>"]
        assert isinstance(d["table"], list) and len(d["table"]) == 3 and len(d["table"][0]) == 1

    def test_words_drop_bos_and_eos(self):
        """tokens='words' pools over 'red' only: one token, so Eq. 4 is its value (-c)."""
        b = lse_score(_synthetic_trace(), layers=["mid.attn.0"], steps=[0], heads=[1], tokens="words")
        assert b.tokens == ["red"]
        assert b.score == pytest.approx(-(10 * 1 + 0 + 1), abs=1e-9)

    def test_step_head_and_layer_selection(self):
        """Selecting a layer, step and head scores only that cell."""
        b = lse_score(_synthetic_trace(), layers=["up.0.attn.0"], steps=[1], heads=[0])
        assert b.score == pytest.approx(_cell(21), abs=1e-9)

    def test_lam_reaches_the_pooling(self):
        """lam is passed down to Eq. 4."""
        b = lse_score(_synthetic_trace(), layers=[0], steps=[0], heads=[0], lam=3.0)
        assert b.score == pytest.approx(_cell(0, lam=3.0), abs=1e-9)

    def test_other_pooling(self):
        """pooling='max_rows' is used per map (row max of [c, -c, c] is c)."""
        b = lse_score(_synthetic_trace(), layers=[1], steps=[1], heads=[1], pooling="max_rows")
        assert b.score == pytest.approx(12.0, abs=1e-9)

    def test_logits_source_reads_the_logits(self):
        """source='logits' reads trace.logits, not trace.probs."""
        tr = _synthetic_trace(with_logits=True)
        tr.logits = {k: v + 1.0 for k, v in tr.logits.items()}
        assert lse_score(tr, source="logits").score == pytest.approx(lse_score(tr).score + 1.0, abs=1e-9)

    def test_logits_missing_is_an_error(self):
        """Asking for logits from a trace without them is a ValueError."""
        with pytest.raises(ValueError, match="logits=True"):
            lse_score(_synthetic_trace(), source="logits")

    def test_last_per_stage_needs_every_stage(self):
        """'last_per_stage' on a trace without a mid layer is a ValueError naming the stage."""
        with pytest.raises(ValueError, match="mid"):
            select_layers(_synthetic_trace(stages=("down_blocks.0", "up_blocks.0")), "last_per_stage")

    def test_out_of_range_step_is_an_error(self):
        """A step index beyond the trace is a ValueError."""
        with pytest.raises(ValueError, match="steps"):
            lse_score(_synthetic_trace(), steps=[5])


class TestRanking:
    def test_best_first(self):
        """Captions come sorted by score, highest first."""
        got = rank_captions({"a": -1.0, "b": 2.5, "c": 0.0})
        assert got == [{"caption": "b", "score": 2.5}, {"caption": "c", "score": 0.0}, {"caption": "a", "score": -1.0}]

    def test_nan_is_rejected(self):
        """A NaN score cannot be ranked."""
        with pytest.raises(ValueError, match="NaN"):
            rank_captions({"a": 1.0, "b": float("nan")})


class TestDenoisingScore:
    def test_negative_mean_error(self):
        """Without normalisation the score is -mean error over steps, per caption."""
        np.testing.assert_allclose(denoising_score([[1.0, 3.0], [0.5, 0.5]]), [-2.0, -0.5])

    def test_normalised_by_uncond(self):
        """With the unconditional errors the score is mean(error(uncond) - error(cond))."""
        np.testing.assert_allclose(denoising_score([[1.0, 3.0], [0.5, 0.5]], [2.0, 2.0]), [0.0, 1.5])

    def test_single_caption_gives_a_float(self):
        """A [steps] input gives one float."""
        assert denoising_score([1.0, 2.0, 6.0]) == pytest.approx(-3.0)


# ---- the model pass on the tiny pipeline ----
CAPTIONS = ["a red circle", "two blue squares", "a big green triangle"]
TIMESTEPS = [100, 600]


@pytest.fixture(scope="module")
def latent(tiny_pipe):
    from models.unet_pass import encode_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    return encode_image(tiny_pipe, img)


@pytest.fixture(scope="module")
def batched(tiny_pipe, latent):
    from models.unet_pass import noised_unet_pass

    return noised_unet_pass(tiny_pipe, latent, CAPTIONS, TIMESTEPS, noise_seed=3, uncond=True)


def _score(tr):
    return lse_score(tr, source="logits").score


class TestScoringPass:
    def test_encode_resizes_to_native_latent(self, latent):
        """A 52x40 image becomes a [1, 4, 16, 16] latent (64x64 native size)."""
        assert latent.shape == (1, 4, 16, 16)

    def test_shapes_and_eval_count(self, batched):
        """K traces over S steps, errors [K, S], uncond [S], S * (K + 1) sample-forwards."""
        K, S = len(CAPTIONS), len(TIMESTEPS)
        assert [t.prompt for t in batched.traces] == CAPTIONS
        assert all(t.timesteps == [float(x) for x in TIMESTEPS] for t in batched.traces)
        assert batched.errors.shape == batched.errors_eps.shape == (K, S)
        assert batched.uncond_errors.shape == (S,)
        assert batched.uncond_trace.tokens == ["<|startoftext|>", "<|endoftext|>"]
        assert (batched.unet_calls, batched.unet_evals) == (S, S * (K + 1))

    def test_batching_equals_one_by_one(self, tiny_pipe, latent, batched):
        """Each caption alone gets the same attention score and errors as in the 3-caption batch."""
        from models.unet_pass import noised_unet_pass

        for k, cap in enumerate(CAPTIONS):
            alone = noised_unet_pass(tiny_pipe, latent, [cap], TIMESTEPS, noise_seed=3)
            assert _score(alone.traces[0]) == pytest.approx(_score(batched.traces[k]), abs=1e-5)
            torch.testing.assert_close(alone.errors[0], batched.errors[k], atol=1e-5, rtol=0)

    def test_fixed_noise_is_shared(self, tiny_pipe, latent):
        """The same caption twice in one batch gets identical scores and errors."""
        from models.unet_pass import noised_unet_pass

        r = noised_unet_pass(tiny_pipe, latent, ["a red circle", "a blue square", "a red circle"], TIMESTEPS)
        assert _score(r.traces[0]) == _score(r.traces[2]) != _score(r.traces[1])
        assert torch.equal(r.errors[0], r.errors[2])

    def test_eps_error_is_abar_times_v_error(self, tiny_pipe, batched):
        """For this v-prediction model, ||eps_hat - eps||^2 = abar_t ||v_hat - v||^2."""
        assert batched.prediction_type == "v_prediction"
        abar = tiny_pipe.scheduler.alphas_cumprod[TIMESTEPS].float()
        torch.testing.assert_close(batched.errors_eps, batched.errors * abar, atol=1e-6, rtol=1e-4)

    def test_last_per_stage_on_tiny_pipe(self, batched):
        """'last_per_stage' picks the last down layer, the mid layer and the last up layer."""
        assert select_layers(batched.traces[0], "last_per_stage") == ["down.1.attn.0", "mid.attn.0", "up.2.attn.1"]


class TestScoringPassValidation:
    def test_no_captions(self, tiny_pipe, latent):
        """An empty caption list is a ValueError."""
        from models.unet_pass import noised_unet_pass

        with pytest.raises(ValueError, match="captions is empty"):
            noised_unet_pass(tiny_pipe, latent, [], TIMESTEPS)

    def test_empty_caption(self, tiny_pipe, latent):
        """An empty caption string is a ValueError naming its index."""
        from models.unet_pass import noised_unet_pass

        with pytest.raises(ValueError, match="caption 1 is empty"):
            noised_unet_pass(tiny_pipe, latent, ["a red circle", "  "], TIMESTEPS)

    @pytest.mark.parametrize("t", [-1, 1000])
    def test_timestep_out_of_range(self, tiny_pipe, latent, t):
        """A timestep outside [0, num_train_timesteps) is a ValueError."""
        from models.unet_pass import noised_unet_pass

        with pytest.raises(ValueError, match="out of range"):
            noised_unet_pass(tiny_pipe, latent, ["a red circle"], [10, t])
