"""DPT + denoising error from the same UNet call: the stage-2 adapter's score minus a weight times each caption's
denoising error (relative to the candidates' mean error). The adapter reads one block's features and the UNet's
output is the noise prediction of that very call, so the second signal costs nothing: still one UNet call per
image, one batch row per caption.

    >>> caps = ["a red circle left of a blue square", "a blue circle left of a red square"]
    >>> res = DPTFusedScorer().score(pipe, image, caps)
    >>> res.ranking()[0], res.extra["denoise_weight"]

The weight is the adapter's validation choice (`bench/dpt_eval.py fuse-val --write`, stored in its config as
`fused_denoise_weight`; docs/dpt.md "One call, two readings").
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from models.limits import validate_captions
from models.training.dpt import fuse_denoise, itm_pass
from models.unet_pass import encode_image

from interp.scorers.base import MatchOptions, ScoreResult
from interp.scorers.dpt import DPTTunedScorer

__all__ = ["DPTFusedScorer"]


class DPTFusedScorer(DPTTunedScorer):
    """The stage-2 adapter (LoRA-tuned UNet) fused with the denoising error of its own UNet call.

    Args:
        adapter_dir: another stage-2 adapter folder (default: the pipe's model's shipped one).
        t: the timestep (default: the adapter's).
        denoise_weight: the error's weight (default: the adapter's validation choice, `DPTConfig.fused_denoise_weight`).
    """

    name = "dpt_fused"
    label = "dpt_fused — DPT-tuned adapter + the same call's denoising error"
    description = ("The stage-2 DPT adapter's match score minus the caption's relative denoising error, both read "
                   "from the same single UNet call (the adapter sees the features, the error comes from the "
                   "output). Needs a stage-2 adapter whose weight was chosen on validation (`bench/dpt_eval.py "
                   "fuse-val`).")

    def __init__(self, adapter_dir: str | Path | None = None, t: int | None = None,
                 denoise_weight: float | None = None):
        super().__init__(adapter_dir, t)
        if denoise_weight is not None and not (math.isfinite(denoise_weight) and denoise_weight >= 0):
            raise ValueError(f"denoise_weight must be a finite number >= 0, got {denoise_weight}")
        self.denoise_weight = denoise_weight

    def score(self, pipe, image, captions: Sequence[str], options: MatchOptions = MatchOptions()) -> ScoreResult:
        """Score `captions` against `image`: one UNet call (K rows) at the adapter's t, noise from
        `options.noise_seed`.

        Raises:
            ValueError: bad captions; no stage-2 adapter, or one without a chosen weight (the message says how).
        """
        caps = validate_captions(captions, min_count=1)
        pipe, adapter = self._reader(pipe)
        w = self._weight(adapter)
        t = adapter.config.t if self.t is None else int(self.t)
        with torch.no_grad():
            s, err = itm_pass(pipe, adapter, encode_image(pipe, image), caps, t, noise_seed=options.noise_seed)
        fused = fuse_denoise(s, err, w)
        s = s.float().cpu()
        terms = {c: {"adapter": float(a), "denoise": float(f - a)} for c, a, f in zip(caps, s, fused)}
        return ScoreResult(self.name, caps, [float(v) for v in fused], unet_calls=1, unet_evals=len(caps),
                           extra={"t": t, "adapter": str(self.adapter_dir or "shipped"), "denoise_weight": w,
                                  "adapter_scores": s.tolist(), "denoise_errors": err.tolist(), "terms": terms})

    def _weight(self, adapter) -> float:
        if self.denoise_weight is not None:
            return float(self.denoise_weight)
        w = adapter.config.fused_denoise_weight
        if w is None:
            raise ValueError("this DPT adapter has no fused weight chosen on validation; run `python -m bench.dpt_eval "
                             "fuse-val --write` (docs/dpt.md) or pass denoise_weight")
        return float(w)
