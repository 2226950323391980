"""DPT scorer: image-text matching read by a trained discriminative adapter on one UNet block (Qu et al.,
CVPR 2024): s(z, y) = max over the adapter's matching queries of cos(text_emb(y), h_i), one UNet call per
image (one batch row per caption) at the adapter's timestep.

    >>> res = DPTScorer().score(pipe, image, ["a red circle left of a blue square", "a blue square left of a red circle"])
    >>> res.ranking()[0]
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from models.limits import validate_captions
from models.training.dpt import find_reader, itm_pass
from models.unet_pass import encode_image

from interp.scorers.base import MatchOptions, ScoreResult, Scorer

__all__ = ["DPTScorer", "DPTTunedScorer"]


class DPTScorer(Scorer):
    """Matching by the shipped DPT adapter of the pipe's model (assets/adapters/<model>-dpt).

    Args:
        adapter_dir: another adapter folder (default: the pipe's model's shipped one).
        t: the timestep to read the UNet at (default: the adapter's, chosen on validation).
    """

    name = "dpt"
    label = "dpt — trained discriminative adapter (DPT)"
    description = ("A small transformer trained on one UNet block's features to match images and captions "
                   "against hard negatives (swapped roles and attributes, flipped relations, counts). One UNet "
                   "call per image; needs an adapter trained for the model (`train-dpt`).")
    shares_pass = False
    tuned = False  # read the UNet through the stage-2 LoRA copy with its stage-2 adapter (`find_reader`)

    def __init__(self, adapter_dir: str | Path | None = None, t: int | None = None):
        self.adapter_dir = adapter_dir
        self.t = t

    def score(self, pipe, image, captions: Sequence[str], options: MatchOptions = MatchOptions()) -> ScoreResult:
        """Score `captions` against `image`: one UNet call (K rows) at the adapter's t, noise from
        `options.noise_seed` (`options.timesteps` is not used: the adapter was trained for its own t).

        Raises:
            ValueError: bad captions; no adapter for the pipe's model (the message says how to train one).
        """
        caps = validate_captions(captions, min_count=1)
        pipe, adapter = find_reader(pipe, self.tuned, self.adapter_dir)
        combine = self._combiner(adapter)  # its checks run before the UNet call
        t = adapter.config.t if self.t is None else int(self.t)
        with torch.no_grad():
            s, err = itm_pass(pipe, adapter, encode_image(pipe, image), caps, t, noise_seed=options.noise_seed)
        extra = {"t": t, "adapter": str(self.adapter_dir or "shipped")}
        scores = combine(caps, s.float().cpu(), err, extra)
        return ScoreResult(self.name, caps, [float(v) for v in scores], unet_calls=1, unet_evals=len(caps),
                           extra=extra)

    def _combiner(self, adapter) -> Callable[[list[str], torch.Tensor, torch.Tensor, dict], torch.Tensor]:
        """How the call's two readings (adapter scores `[K]`, denoising errors `[K]`) become the K captions' scores,
        adding what explains them to `extra`: here the adapter's scores alone."""
        return lambda captions, s, errors, extra: s


class DPTTunedScorer(DPTScorer):
    """DPT after stage 2: the stage-2 adapter reading the UNet with its discriminatively tuned LoRA
    (assets/adapters/<model>-dpt-lora; the base weights untouched: the LoRA sits on a copy of the UNet)."""

    name = "dpt_lora"
    label = "dpt_lora — DPT adapter + its LoRA-tuned UNet (stage 2)"
    description = ("DPT's stage 2: the adapter trained together with a rank-4 LoRA on the UNet's cross-attention "
                   "(and the denoising loss). One UNet call per image, through the tuned copy; needs a stage-2 "
                   "adapter (`train-dpt --stage 2`).")
    tuned = True
