"""Denoising-error scorers (Diffusion Classifier): the caption under which the UNet predicts the noise best."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from models.unet_pass import PassResult

from interp.lse import denoising_score
from interp.scorers.base import MatchOptions, PassSpec, ScoreResult, Scorer

__all__ = ["DenoiseScorer", "DenoiseNormScorer"]


class DenoiseScorer(Scorer):
    """score = -mean over timesteps of the caption's noise-prediction MSE (the model's prediction space)."""

    name = "denoise"
    label = "denoise — denoising error (Diffusion Classifier)"
    description = ("Minus the noise-prediction error under each caption. Tells apart captions that name different "
                   "colours, shapes or counts; reads relations only as far as the model draws them.")
    uncond = False

    def needs(self, options: MatchOptions, captions: Sequence[str] = ()) -> PassSpec:
        return PassSpec(uncond=self.uncond)

    def score_pass(self, res: PassResult, options: MatchOptions) -> ScoreResult:
        s = np.atleast_1d(denoising_score(res.errors, res.uncond_errors if self.uncond else None))
        K = len(res.captions)
        return ScoreResult(self.name, list(res.captions), [float(v) for v in s], unet_calls=res.unet_calls,
                           unet_evals=res.unet_calls * (K + int(self.uncond)), pass_result=res)


class DenoiseNormScorer(DenoiseScorer):
    """The denoising error normalised by the unconditional ("") row's error."""

    name = "denoise_norm"
    label = "denoise_norm — denoising error relative to the empty prompt"
    description = ("The denoising error relative to the unconditional prediction (one extra batch row). Same "
                   "abilities as denoise; comparable across images.")
    uncond = True
