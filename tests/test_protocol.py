"""The evaluation protocol in code (interp.tasks.generation_eval splits and seeds) and in docs/protocol.md."""
from __future__ import annotations

import hashlib

import pytest

from conftest import ROOT
from interp.tasks import generation_eval as ge
from interp.tasks import grounding_eval
from models.shapes import world

# sha256 of the test prompts ("kind\tcaption" lines) behind the committed readings (EVAL_SEED, 100 per kind)
TEST_PROMPTS_SHA256 = "9d3e6c7945b4e318e4c075818bf4cbe136c022bd7d070e3e94e0a8c153cc5689"


def _captions(pairs, kind=None) -> set[str]:
    return {c for k, c in pairs if kind is None or k == kind}


def _noise_seeds(split: str, n_per_kind: int) -> set[int]:
    return {ge.NOISE_SEEDS[split] + i for i in range(3 * n_per_kind)}


@pytest.fixture(scope="module")
def test_prompts():
    return ge.eval_prompts("test", ge.TEST_N_PER_KIND)


@pytest.fixture(scope="module")
def val_prompts():
    return ge.eval_prompts("validation", 100)


class TestTestSplit:
    def test_is_the_committed_draw(self, test_prompts):
        """The test prompts are exactly those of the committed readings: same seed, same order."""
        assert test_prompts == ge.held_out_prompts(100, 10_007)
        digest = hashlib.sha256("\n".join(f"{k}\t{c}" for k, c in test_prompts).encode()).hexdigest()
        assert digest == TEST_PROMPTS_SHA256

    def test_noise_seeds_are_the_committed_ones(self):
        """Prompt i of the test split is generated with seed 1234 + i, as `cli.py eval-generation` did."""
        assert ge.NOISE_SEEDS["test"] == 1234


class TestValidationSplit:
    @pytest.mark.parametrize("kind", world.KINDS)
    def test_no_caption_of_the_test_split(self, test_prompts, val_prompts, kind):
        assert not _captions(val_prompts, kind) & _captions(test_prompts, kind)

    def test_no_compositional_caption(self, val_prompts):
        assert not any(world.is_compositional_holdout(c) for _, c in val_prompts)

    def test_noise_seeds_disjoint_from_every_other_split(self):
        n = ge.NOISE_RANGE // 3
        seeds = {s: _noise_seeds(s, n) for s in ge.SPLITS}
        assert not seeds["validation"] & seeds["test"]
        assert not seeds["validation"] & seeds["compositional"]
        assert not seeds["test"] & seeds["compositional"]

    def test_shape_and_determinism(self, val_prompts):
        """n per kind in kind order, the same draw twice, and a smaller n is a prefix per kind."""
        assert [k for k, _ in val_prompts] == [k for k in world.KINDS for _ in range(100)]
        assert ge.eval_prompts("validation", 100) == val_prompts
        small = ge.eval_prompts("validation", 10)
        for kind in world.KINDS:
            assert [c for k, c in small if k == kind] == [c for k, c in val_prompts if k == kind][:10]

    def test_relation_captions_mostly_distinct(self, val_prompts):
        """Relations have 1 224 captions: the validation ones barely repeat."""
        assert len(_captions(val_prompts, "relation")) >= 90


class TestCompositionalSplit:
    def test_every_prompt_holds_a_held_out_combination(self):
        prompts = ge.eval_prompts("compositional", 40)
        assert [k for k, _ in prompts] == [k for k in world.KINDS for _ in range(40)]
        assert all(world.parse_caption(c).kind == k and world.is_compositional_holdout(c) for k, c in prompts)

    def test_relations_cover_both_parts(self):
        rel = [c for k, c in ge.eval_prompts("compositional", 40) if k == "relation"]
        parts = [world.compositional_holdout(c) for c in rel]
        assert parts[0::2] == ["relation_pair"] * 20 and set(parts[1::2]) == {"color_shape"}


class TestSeeds:
    def test_every_evaluation_has_its_own_seed(self):
        """Prompt and scene seeds are distinct and none is a training seed (data 0, VAE stage 1)."""
        seeds = list(ge.EVAL_SEEDS.values())
        assert len(set(seeds)) == len(seeds) and not {0, 1} & set(seeds)
        assert grounding_eval.GROUNDING_SEED == ge.EVAL_SEEDS["grounding_scenes"] == 20_011
        assert grounding_eval.GROUNDING_PROMPT_SEED == ge.EVAL_SEEDS["grounding_prompts"] == 20_012

    def test_unknown_split_and_oversized_n_raise(self):
        with pytest.raises(ValueError):
            ge.eval_prompts("train", 3)
        with pytest.raises(ValueError):
            ge.eval_prompts("validation", ge.NOISE_RANGE)


class TestProtocolDoc:
    def test_names_every_seed_and_split(self):
        """docs/protocol.md states each split's prompt and noise seed and the held-out combinations."""
        text = " ".join((ROOT / "docs" / "protocol.md").read_text().split())
        for seed in [*ge.EVAL_SEEDS.values(), *ge.NOISE_SEEDS.values()]:
            assert f"{seed:_}" in text or str(seed) in text, seed
        for c, s in world.HELD_OUT_COLOR_SHAPES:
            assert f"{c} {s}" in text
        for (c1, s1), (c2, s2) in world.HELD_OUT_RELATION_PAIRS:
            assert f"{c1} {s1}" in text and f"{c2} {s2}" in text
