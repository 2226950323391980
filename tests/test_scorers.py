"""The scorer registry: every registered scorer runs on the tiny pipeline and returns a consistent ScoreResult."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from interp.scorers import DEFAULT_SCORER, MatchOptions, PassSpec, ScoreResult, Scorer, get_scorer, scorer_names, scorers
from models.adapters.dpt import save_adapter
from models.shapes import world
from models.training import dpt as tdpt

CAPTIONS = ["a red circle left of a blue square", "a blue square left of a red circle", "two green triangles"]
OPTS = MatchOptions(timesteps=(300, 600))


@pytest.fixture(scope="module")
def dpt_dir(tiny_pipe, tmp_path_factory):
    """A small untrained DPT adapter for the tiny pipeline (the shipped one fits the bundled model only)."""
    torch.manual_seed(0)
    adapter = tdpt.new_adapter(tiny_pipe, ("up_blocks.1",), width=32, heads=2, ff=64, n_queries=6, n_match=2,
                               sem_dim=8, dropout=0.0).eval()
    return save_adapter(adapter, tmp_path_factory.mktemp("dpt") / "tiny-dpt")


@pytest.fixture(scope="module")
def dpt_lora_dir(tiny_pipe, dpt_dir, tmp_path_factory):
    """The same adapter as a stage-2 one: with a rank-2 LoRA (non-zero B) saved beside it."""
    import copy

    from safetensors.torch import save_file

    from models.adapters.dpt import add_lora, load_adapter, lora_state_dict

    torch.manual_seed(1)
    unet = copy.deepcopy(tiny_pipe.unet)
    for p in add_lora(unet, rank=2):
        p.data.normal_(0, 0.2)
    adapter = load_adapter(dpt_dir)
    adapter.config.lora_rank, adapter.config.stage = 2, 2
    d = save_adapter(adapter, tmp_path_factory.mktemp("dpt") / "tiny-dpt-lora")
    save_file(lora_state_dict(unet), d / "lora.safetensors")
    return d


def _scorer(name: str, dpt_dir, dpt_lora_dir=None):
    if name in ("dpt", "dpt_lora"):
        return get_scorer(name, adapter_dir=dpt_dir if name == "dpt" else dpt_lora_dir)
    if name == "dpt_fused":
        return get_scorer(name, adapter_dir=dpt_lora_dir, denoise_weight=0.5)
    return get_scorer(name)


@pytest.fixture(scope="module")
def image():
    return world.render(world.scene_from_caption(CAPTIONS[0], np.random.default_rng(0)))


class TestRegistry:
    def test_names_are_unique_and_match_the_instances(self):
        names = scorer_names()
        assert len(set(names)) == len(names) and DEFAULT_SCORER in names
        assert [s.name for s in scorers()] == list(names)

    def test_every_scorer_explains_itself(self):
        for s in scorers():
            assert s.label.startswith(s.name) and len(s.description) > 40, s.name

    def test_unknown_name_lists_the_known_ones(self):
        with pytest.raises(ValueError, match="choose one of auto"):
            get_scorer("nope")

    def test_instances_pass_through(self):
        s = get_scorer("denoise")
        assert get_scorer(s) is s
        assert get_scorer("head_weighted", variant="gxa").variant == "gxa"

    def test_pass_specs_merge(self):
        assert PassSpec(logits=True).merge(PassSpec(uncond=True)) == PassSpec(logits=True, uncond=True)


@pytest.mark.parametrize("name", scorer_names())
def test_scorer_runs_and_ranks_by_its_scores(name, tiny_pipe, image, dpt_dir, dpt_lora_dir):
    """Each registered scorer returns one finite score per caption, a ranking sorted by them, and its cost."""
    res = _scorer(name, dpt_dir, dpt_lora_dir).score(tiny_pipe, image, CAPTIONS, OPTS)
    assert isinstance(res, ScoreResult) and res.scorer == name
    assert res.captions == CAPTIONS and len(res.scores) == 3 and all(math.isfinite(v) for v in res.scores)
    ranked = res.ranking()
    assert sorted(c for c, _ in ranked) == sorted(CAPTIONS)
    assert [v for _, v in ranked] == sorted(res.scores, reverse=True)
    calls = 1 if name.startswith("dpt") else len(OPTS.timesteps)  # dpt reads the UNet once, at its adapter's t
    assert res.unet_calls == calls and res.unet_evals >= res.unet_calls * len(CAPTIONS)


def test_dpt_lora_reads_the_tuned_copy(tiny_pipe, image, dpt_dir, dpt_lora_dir, tmp_path):
    """dpt_lora reads the UNet through its LoRA (same adapter weights, other scores than dpt), on a copy: the
    pipeline's own UNet keeps no LoRA and its weights; a folder without a LoRA says how to train one."""
    from models.adapters.dpt import has_lora

    base = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    plain = get_scorer("dpt", adapter_dir=dpt_dir).score(tiny_pipe, image, CAPTIONS, OPTS).scores
    tuned = get_scorer("dpt_lora", adapter_dir=dpt_lora_dir).score(tiny_pipe, image, CAPTIONS, OPTS).scores
    assert not np.allclose(plain, tuned, atol=1e-6)
    assert not has_lora(tiny_pipe.unet)
    sd = tiny_pipe.unet.state_dict()
    assert sd.keys() == base.keys() and all(torch.equal(sd[k], base[k]) for k in base)
    assert get_scorer("dpt", adapter_dir=dpt_dir).score(tiny_pipe, image, CAPTIONS, OPTS).scores == plain
    with pytest.raises(ValueError, match="train-dpt --stage 2"):
        get_scorer("dpt_lora", adapter_dir=dpt_dir).score(tiny_pipe, image, CAPTIONS, OPTS)


class TestDPTFused:
    """dpt_fused: the stage-2 adapter's scores minus w x the same call's relative denoising errors."""

    def test_is_dpt_lora_minus_the_relative_error_of_the_same_call(self, tiny_pipe, image, dpt_lora_dir):
        from models.unet_pass import encode_image, noised_unet_pass

        lora = get_scorer("dpt_lora", adapter_dir=dpt_lora_dir).score(tiny_pipe, image, CAPTIONS, OPTS)
        res = get_scorer("dpt_fused", adapter_dir=dpt_lora_dir, denoise_weight=0.7).score(tiny_pipe, image, CAPTIONS,
                                                                                          OPTS)
        assert res.unet_calls == 1 and res.unet_evals == len(CAPTIONS) and res.extra["denoise_weight"] == 0.7
        assert np.allclose(res.extra["adapter_scores"], lora.scores, atol=1e-6)
        tuned, adapter = tdpt.find_tuned(tiny_pipe, dpt_lora_dir)  # the errors are the tuned UNet's, at the adapter's t
        err = noised_unet_pass(tuned, encode_image(tuned, image), CAPTIONS, [adapter.config.t], traced=False,
                               noise_seed=OPTS.noise_seed).errors[:, 0].numpy()
        assert np.allclose(res.extra["denoise_errors"], err, rtol=1e-5)
        want = np.array(lora.scores) - 0.7 * err / err.mean()
        assert np.allclose(res.scores, want, atol=1e-5)
        terms = res.extra["terms"]  # the two readings the app draws, summing to the score
        assert all(abs(terms[c]["adapter"] + terms[c]["denoise"] - v) < 1e-6 for c, v in zip(CAPTIONS, res.scores))

    def test_weight_zero_is_dpt_lora_and_a_huge_weight_ranks_by_the_error(self, tiny_pipe, image, dpt_lora_dir):
        lora = get_scorer("dpt_lora", adapter_dir=dpt_lora_dir).score(tiny_pipe, image, CAPTIONS, OPTS)
        zero = get_scorer("dpt_fused", adapter_dir=dpt_lora_dir, denoise_weight=0.0).score(tiny_pipe, image, CAPTIONS,
                                                                                           OPTS)
        assert np.allclose(zero.scores, lora.scores, atol=1e-7)
        big = get_scorer("dpt_fused", adapter_dir=dpt_lora_dir, denoise_weight=1e6).score(tiny_pipe, image, CAPTIONS,
                                                                                          OPTS)
        assert [c for c, _ in big.ranking()] == [CAPTIONS[i] for i in np.argsort(big.extra["denoise_errors"])]

    def test_weight_comes_from_the_adapter_config(self, tiny_pipe, image, dpt_lora_dir, tmp_path):
        import json
        import shutil

        with pytest.raises(ValueError, match="fuse-val"):  # the fixture's adapter has no weight chosen
            get_scorer("dpt_fused", adapter_dir=dpt_lora_dir).score(tiny_pipe, image, CAPTIONS, OPTS)
        d = shutil.copytree(dpt_lora_dir, tmp_path / "with-weight")
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "fused_denoise_weight": 0.7}))
        res = get_scorer("dpt_fused", adapter_dir=d).score(tiny_pipe, image, CAPTIONS, OPTS)
        explicit = get_scorer("dpt_fused", adapter_dir=dpt_lora_dir, denoise_weight=0.7).score(tiny_pipe, image,
                                                                                               CAPTIONS, OPTS)
        assert res.extra["denoise_weight"] == 0.7 and res.scores == explicit.scores

    @pytest.mark.parametrize("w", [-0.1, float("nan"), float("inf")])
    def test_bad_weight(self, w):
        with pytest.raises(ValueError, match="denoise_weight"):
            get_scorer("dpt_fused", denoise_weight=w)

    def test_pair_accuracy_fuses_and_counts_by_type(self):
        """Hand-made readings: the adapter alone misses one pair, the error fixes it at a large enough weight."""
        readings = [{"types": ["true", "swap_roles", "change_color"], "scores": [0.5, 0.6, 0.1],
                     "errors": [1.0, 1.2, 1.0]}]
        alone = tdpt.pair_accuracy(readings, 0.0)
        assert alone["overall"] == {"k": 1, "n": 2} and alone["by_type"]["swap_roles"] == {"k": 0, "n": 1}
        # fused: 0.5 - w * 1/1.0667 vs 0.6 - w * 1.2/1.0667: the true caption wins once w * 0.2 / 1.0667 > 0.1
        assert tdpt.pair_accuracy(readings, 0.5)["overall"] == {"k": 1, "n": 2}
        assert tdpt.pair_accuracy(readings, 0.6)["overall"] == {"k": 2, "n": 2}


@pytest.mark.parametrize("name", [n for n in scorer_names() if get_scorer(n).shares_pass])
def test_shared_pass_scores_equal_own_pass(name, tiny_pipe, image):
    """score_pass on a pass run for this scorer's needs gives the same scores as .score()."""
    from models.unet_pass import encode_image, noised_unet_pass

    sc = get_scorer(name)
    spec = sc.needs(OPTS, CAPTIONS).merge(PassSpec(logits=True, uncond=True))  # a richer pass changes nothing
    res = noised_unet_pass(tiny_pipe, encode_image(tiny_pipe, image), CAPTIONS, list(OPTS.timesteps),
                           noise_seed=OPTS.noise_seed, logits=spec.logits, cosine=spec.cosine, uncond=spec.uncond,
                           padded=spec.padded)
    assert sc.score_pass(res, OPTS).scores == pytest.approx(sc.score(tiny_pipe, image, CAPTIONS, OPTS).scores,
                                                            rel=1e-6, abs=1e-9)


class TestScoreResult:
    def test_ranking_and_lookup(self):
        r = ScoreResult("x", ["a", "b", "c"], [0.1, 0.5, -1.0], unet_calls=1, unet_evals=3)
        assert r.ranking() == [("b", 0.5), ("a", 0.1), ("c", -1.0)]
        assert r.by_caption == {"a": 0.1, "b": 0.5, "c": -1.0}

    def test_refuses_mismatched_or_non_finite_scores(self):
        with pytest.raises(ValueError, match="2 scores for 3 captions"):
            ScoreResult("x", ["a", "b", "c"], [0.1, 0.5], unet_calls=1, unet_evals=3)
        with pytest.raises(ValueError, match="non-finite"):
            ScoreResult("x", ["a"], [math.nan], unet_calls=1, unet_evals=1)

    def test_a_new_scorer_is_one_class(self, tiny_pipe, image):
        """A Scorer subclass with needs + score_pass works through the base's one pass."""

        class MinusError(Scorer):
            name = "minus_error"

            def needs(self, options, captions=()):
                return PassSpec()

            def score_pass(self, res, options):
                return ScoreResult(self.name, res.captions, [-float(e.mean()) for e in res.errors],
                                   unet_calls=res.unet_calls, unet_evals=res.unet_evals, pass_result=res)

        got = MinusError().score(tiny_pipe, image, CAPTIONS[:2], OPTS)
        ref = get_scorer("denoise").score(tiny_pipe, image, CAPTIONS[:2], OPTS)
        assert got.scores == pytest.approx(ref.scores, rel=1e-6)
        assert dataclasses.is_dataclass(got)
