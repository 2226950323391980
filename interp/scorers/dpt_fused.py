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

import torch

from models.training.dpt import fuse_denoise

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

    def _combiner(self, adapter):
        """The adapter's scores fused with the call's relative denoising errors at the weight; `extra` gains the
        weight, both readings and each caption's two terms (the Match view draws them).

        Raises:
            ValueError: an adapter without a chosen weight (the message says how), before any UNet call.
        """
        w = self._weight(adapter)

        def combine(captions: list[str], s: torch.Tensor, errors: torch.Tensor, extra: dict) -> torch.Tensor:
            fused = fuse_denoise(s, errors, w)
            extra.update(denoise_weight=w, adapter_scores=s.tolist(), denoise_errors=errors.tolist(),
                         terms={c: {"adapter": float(a), "denoise": float(f - a)}
                                for c, a, f in zip(captions, s, fused)})
            return fused

        return combine

    def _weight(self, adapter) -> float:
        if self.denoise_weight is not None:
            return float(self.denoise_weight)
        w = adapter.config.fused_denoise_weight
        if w is None:
            raise ValueError("this DPT adapter has no fused weight chosen on validation; run `python -m bench.dpt_eval "
                             "fuse-val --write` (docs/dpt.md) or pass denoise_weight")
        return float(w)
