"""Routed score: the rule, one shared pass, and agreement with the scorer it routes to."""
from __future__ import annotations

import numpy as np
import pytest

from interp.lse import denoising_score
from interp.tasks.matching import MatchOptions, score_image_captions
from interp.scorers import get_scorer
from interp.scorers.routed import content_words, route
from models.shapes import world


@pytest.fixture(scope="module")
def image():
    return world.render(world.scene_from_caption("a red circle left of a blue square", np.random.default_rng(0)))


class TestRoute:
    @pytest.mark.parametrize("caps,want", [
        (["a red circle left of a blue square", "a blue square left of a red circle"], "structure"),  # roles
        (["a red circle left of a blue square", "a blue circle left of a red square"], "structure"),  # attributes
        (["a red circle left of a blue square", "a red circle right of a blue square"], "structure"),  # relation
        (["a red circle left of a blue square", "a green circle left of a blue square"], "denoise"),  # a color
        (["two red circles", "three red circles"], "denoise"),                                        # a count
        (["a red circle", "a red circle left of a blue square"], "denoise"),                          # kinds
        (["a red dog", "a dog red"], "denoise"),                                                      # off-grammar
    ])
    def test_rule(self, caps, want):
        assert route(caps) == want

    def test_content_words_drop_articles_and_relations(self):
        assert content_words("a red circle left of a blue square") == {"red": 1, "circle": 1, "blue": 1, "square": 1}
        with pytest.raises(ValueError):
            route([])


class TestScorer:
    def test_structure_branch_equals_structure_scorer(self, tiny_pipe, image):
        caps = ["a red circle left of a blue square", "a blue square left of a red circle"]
        o = MatchOptions(timesteps=(300, 600))
        got = get_scorer("auto").score(tiny_pipe, image, caps, o)
        ref = get_scorer("structure").score(tiny_pipe, image, caps, o)
        assert got.routed_to == "structure" and got.unet_calls == 2 and got.unet_evals == 4
        assert got.scores == pytest.approx(ref.scores, abs=1e-6)

    def test_denoise_branch_equals_diffusion_classifier(self, tiny_pipe, image):
        caps = ["two red circles", "three blue squares"]
        o = MatchOptions(timesteps=(300, 600))
        got = get_scorer("auto").score(tiny_pipe, image, caps, o)
        ref = score_image_captions(tiny_pipe, image, caps, MatchOptions(scorer="denoise", timesteps=(300, 600)))
        assert got.routed_to == "denoise" and got.unet_evals == 4
        assert got.scores == pytest.approx(ref.scores, abs=1e-6)
        want = denoising_score(got.pass_result.errors)
        assert got.scores == pytest.approx(list(want))
