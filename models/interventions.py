"""Causal edits of cross-attention: scale chosen token columns of the attention probabilities.

`intervene(pipe, edits)` installs `EditProcessor` on the cross-attention layers (`attn2`) through diffusers'
processor API (`Attention.set_processor`, the per-module form of `unet.set_attn_processor`) and restores
the original processors on exit, also after an exception. Each `AttentionEdit` multiplies the attention
probabilities `P[query, token]` of its token columns by `scale` (0: suppress, >1: amplify):

* where: everywhere, or only at the image positions (queries) of a box given in image fractions
  `(x0, y0, x1, y1)`; a layer's cell (i, j) of its h x w grid is inside when its centre
  `((j + .5) / w, (i + .5) / h)` lies in `[x0, x1) x [y0, y1)`, so a coarse layer may have no cell in
  a small box (the edit then does nothing there);
* when: all denoising steps, or chosen step indices (the position of the UNet call's timestep in
  `pipe.scheduler.timesteps`) or chosen timestep values;
* which layers: all, or indices / aliases / module paths as in `models.attention_capture`
  (`select_layer_names`);
* which prompts of the batch: all, or prompt indices (rows of the conditional half).

Renormalisation: by default the edited rows are NOT renormalised (P' = P * s, rows no longer sum to 1),
as prompt-to-prompt's "reweighting" does: suppressing a word then removes its value vector's share from
the layer's output instead of handing it to the other tokens. `intervene(..., renormalize=True)` divides
each edited row by its new sum (rows the edits do not touch are left bit-identical either way).

Classifier-free guidance: the UNet batch holds the unconditional half first; only the conditional half
is edited. Whether a call is a CFG pair is read from the pipeline (`pipe.do_classifier_free_guidance`,
set by its `__call__`) unless `cfg=` is given (pass it when calling the UNet yourself).

Calls that no edit with a factor other than 1 applies to (other layers, other steps, scale 1) run the
original processor unchanged, so `scale=1` is bit-identical to no intervention whatever the original
processor is. A call an edit applies to runs the explicit attention maths of `CaptureProcessor` (which
differs from the fused default `AttnProcessor2_0` by float rounding, ~1e-6 in the image on the tiny test
pipeline): to compare edited and unedited runs with exactly the same maths on unedited entries, run both
inside `capture_cross_attention(unet, sink)` (or a trace); the edit then keeps its processor's maths.

Inside `models.trace.trace(...)` the edit composes with the tracer: `intervene` keeps the tracer's sink, so
the trace records the edited maps (enter `trace` first, then `intervene`).

Example:
    >>> cols = word_columns(pipe.tokenizer, "a red circle left of a blue square", 2)   # "circle" -> [3]
    >>> with intervene(pipe, [AttentionEdit(tokens=cols, scale=0.0)]):
    ...     image = pipe("a red circle left of a blue square", generator=g).images[0]
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Sequence

import torch
from diffusers.models.attention_processor import Attention

from .attention_capture import CaptureProcessor, CrossAttnLayer, cross_attention_layers, select_layer_names

__all__ = ["AttentionEdit", "EditProcessor", "intervene", "region_mask", "word_columns"]


@dataclasses.dataclass(frozen=True)
class AttentionEdit:
    """One edit: multiply the attention probabilities of some token columns by `scale`.

    Attributes:
        tokens: token positions in the padded text sequence (keys), e.g. from `word_columns`; BOS is 0.
        scale: factor applied to those columns' probabilities (0 suppresses, >1 amplifies; >= 0).
        box: `(x0, y0, x1, y1)` in image fractions (0..1, x to the right, y down), or None for every
            image position. Cells are chosen by their centre (see the module docstring).
        steps: denoising step indices (0 = first UNet call of the schedule), or None for all.
        timesteps: scheduler timestep values instead of step indices (give at most one of the two).
        layers: layer indices / aliases / module paths (`select_layer_names`), or None for all.
        prompts: prompt indices of the batch (rows of the conditional half), or None for all.
    """

    tokens: tuple[int, ...]
    scale: float = 0.0
    box: tuple[float, float, float, float] | None = None
    steps: tuple[int, ...] | None = None
    timesteps: tuple[float, ...] | None = None
    layers: tuple[int | str, ...] | None = None
    prompts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for f in ("tokens", "steps", "timesteps", "layers", "prompts", "box"):  # lists -> tuples (hashable)
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        if not self.tokens or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.tokens):
            raise ValueError(f"tokens must be non-negative token positions, got {self.tokens!r}")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"scale must be finite and >= 0, got {self.scale!r}")
        if self.steps is not None and self.timesteps is not None:
            raise ValueError("give steps (indices) or timesteps (values), not both")
        if self.box is not None:
            if len(self.box) != 4:
                raise ValueError(f"box must be (x0, y0, x1, y1), got {self.box!r}")
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
                raise ValueError(f"box must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, got {self.box!r}")


def word_columns(tokenizer, prompt: str, word: int) -> list[int]:
    """Token positions (in the padded sequence, BOS = 0) of the `word`-th whitespace word of `prompt`.

    Tokenizes word by word (CLIP's BPE never merges across spaces); words cut off by truncation give [].

    Args:
        tokenizer: the pipeline's tokenizer (with a BOS token).
        prompt: the prompt text.
        word: index into `prompt.split()`.
    Returns:
        the positions, e.g. [3] for "circle" in "a red circle ..." with the bundled one-token-a-word vocab.
    """
    words = prompt.split()
    if not 0 <= word < len(words):
        raise ValueError(f"word index {word} out of range for {len(words)} words of {prompt!r}")
    pos = 1  # after BOS
    for i, w in enumerate(words):
        n = len(tokenizer(w, add_special_tokens=False).input_ids)
        if i == word:
            last = tokenizer.model_max_length - 1  # the last position holds EOS when truncated
            return [p for p in range(pos, pos + n) if p < last]
        pos += n
    return []


def region_mask(box: tuple[float, float, float, float] | None, h: int, w: int) -> torch.Tensor:
    """Cells of an h x w grid whose centre lies in the box (image fractions), flattened row-major.

    Args:
        box: `(x0, y0, x1, y1)` in [0, 1], or None (every cell).
        h, w: the layer's grid.
    Returns:
        bool `[h*w]` (query order of the layer: row-major over `[h, w]`).
    """
    if box is None:
        return torch.ones(h * w, dtype=torch.bool)
    x0, y0, x1, y1 = box
    cy = (torch.arange(h, dtype=torch.float64) + 0.5) / h  # [h]
    cx = (torch.arange(w, dtype=torch.float64) + 0.5) / w  # [w]
    iy = (cy >= y0) & (cy < y1)
    ix = (cx >= x0) & (cx < x1)
    return (iy[:, None] & ix[None, :]).reshape(-1)


class _RunState:
    """Per-UNet-call state shared by the processors: timestep, step index, latent size, CFG layout."""

    def __init__(self, pipe, cfg: bool | None) -> None:
        self.pipe, self.cfg_given = pipe, cfg
        self.timestep: float | None = None
        self.step: int | None = None
        self.latent_hw: tuple[int, int] = (0, 0)
        self.cfg = False

    def unet_hook(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.latent_hw = tuple(sample.shape[-2:])
        self.timestep = float(t.flatten()[0].item()) if torch.is_tensor(t) else float(t)
        ts = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        self.step = None
        if ts is not None and len(ts):
            hit = (torch.as_tensor(ts).double() - self.timestep).abs() < 1e-3
            if hit.any():
                self.step = int(hit.nonzero()[0, 0])
        if self.cfg_given is not None:
            self.cfg = self.cfg_given
        else:
            self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) if hasattr(
                self.pipe, "_guidance_scale") else False
        if self.cfg and sample.shape[0] % 2:
            raise RuntimeError(f"intervene: a CFG batch must be even, got {sample.shape[0]}; pass cfg=False")


def _noop_sink(name: str, probs: torch.Tensor, logits: torch.Tensor | None, **kw: torch.Tensor) -> None:
    return None


class EditProcessor(CaptureProcessor):
    """Cross-attention processor that scales token columns of the attention probabilities.

    Calls no edit with a factor other than 1 applies to are handed to `original` untouched. Otherwise the explicit attention maths of
    `CaptureProcessor` runs, and `maps` multiplies the conditional rows' probabilities
    `[batch, heads, queries, keys]` by the edits' factors (and renormalises edited rows when asked). When
    `original` is itself a `CaptureProcessor` (a trace is active), its sink and `maps` are kept, so the
    trace records the edited probabilities.
    """

    def __init__(self, layer: CrossAttnLayer, index: int, edits: Sequence[AttentionEdit], layer_of: dict,
                 state: _RunState, original, renormalize: bool = False) -> None:
        cap = original if isinstance(original, CaptureProcessor) else None
        super().__init__(layer.name, cap.sink if cap else _noop_sink,
                         want_logits=cap.want_logits if cap else False,
                         want_cosine=cap.want_cosine if cap else False)
        self.layer, self.index, self.original, self.state = layer, index, original, state
        self.edits = [e for e in edits if layer_of[e] is None or layer.name in layer_of[e]]
        self.renormalize = renormalize
        self._active: list[AttentionEdit] = []

    def _applies(self, e: AttentionEdit) -> bool:
        st = self.state
        if e.steps is not None:
            return st.step is not None and st.step in e.steps
        if e.timesteps is not None:
            return st.timestep is not None and any(abs(st.timestep - float(v)) < 1e-3 for v in e.timesteps)
        return True

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._active = [e for e in self.edits if e.scale != 1.0 and self._applies(e)]
        if not self._active:
            return self.original(attn, hidden_states, *args, **kwargs)
        return super().__call__(attn, hidden_states, *args, **kwargs)

    def multiplier(self, batch: int, queries: int, keys: int, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
        """Factors of this call, `[batch, 1, queries, keys]` (1 where nothing is edited, incl. the uncond half)."""
        H, W = self.state.latent_hw
        f = math.isqrt(max((H * W) // queries, 1))
        h, w = (H // f, W // f) if H and W and (H // f) * (W // f) == queries else (queries, 1)
        if self.state.cfg:
            n, first = batch // 2, batch // 2
        else:
            n, first = batch, 0
        m = torch.ones(batch, 1, queries, keys, dtype=dtype, device=device)
        for e in self._active:
            rows = range(n) if e.prompts is None else [p for p in e.prompts if p < n]
            cells = region_mask(e.box, h, w).to(device)  # [queries]
            cols = torch.tensor([t for t in e.tokens if t < keys], dtype=torch.long, device=device)
            if not len(cols) or not cells.any():
                continue
            for r in rows:
                sub = m[first + r, 0]  # [queries, keys] view
                sub[cells.nonzero()[:, 0][:, None], cols[None, :]] *= e.scale
        return m

    def maps(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[batch, heads, queries, keys]` -> (logits, edited probabilities) as the layer uses them."""
        logits, probs = (self.original.maps(logits, dtype) if isinstance(self.original, CaptureProcessor)
                         else super().maps(logits, dtype))
        b, _, q, k = probs.shape
        m = self.multiplier(b, q, k, probs.dtype, probs.device)  # [batch, 1, queries, keys]
        touched = (m != 1).any(-1, keepdim=True)  # [batch, 1, queries, 1]: rows some edit changes
        edited = probs * m
        if self.renormalize:
            s = edited.sum(-1, keepdim=True)
            edited = torch.where(touched & (s > 0), edited / s.clamp_min(torch.finfo(s.dtype).tiny), edited)
        return logits, torch.where(touched, edited, probs)


@contextlib.contextmanager
def intervene(pipe, edits: Sequence[AttentionEdit], renormalize: bool = False,
              cfg: bool | None = None) -> Iterator[list[CrossAttnLayer]]:
    """Edit cross-attention of a pipeline's UNet while the context is active.

    Args:
        pipe: a diffusers Stable-Diffusion-family pipeline (`unet`, `scheduler`); a bare UNet works too
            (then step indices never match: use `timesteps`, and pass `cfg`).
        edits: the edits; several edits on the same entries multiply.
        renormalize: divide every edited row (a query of a prompt whose factors are not all 1) by its new
            sum; default False (prompt-to-prompt-style reweighting, see the module docstring).
        cfg: whether each UNet batch is a CFG pair (unconditional half first); None reads
            `pipe.do_classifier_free_guidance` at every UNet call.
    Yields:
        the cross-attention layers at least one edit targets, in UNet order.
    Raises:
        ValueError: an unknown layer in an edit (checked before anything is installed).

    Example:
        >>> with intervene(pipe, [AttentionEdit(tokens=(2,), scale=0.0, box=(0, 0, .5, 1))]):
        ...     img = pipe("a red circle", guidance_scale=3.0, generator=g).images[0]
    """
    unet = pipe.unet if hasattr(pipe, "unet") else pipe
    layers = cross_attention_layers(unet)
    edits = list(edits)
    layer_of = {e: (None if e.layers is None else set(select_layer_names(layers, list(e.layers)))) for e in edits}
    targeted = [l for l in layers if any(v is None or l.name in v for v in layer_of.values())]
    modules = dict(unet.named_modules())
    originals = {l.name: modules[l.name].processor for l in targeted}
    state = _RunState(pipe, cfg)
    handle = unet.register_forward_pre_hook(state.unet_hook, with_kwargs=True)
    try:
        for i, l in enumerate(layers):
            if l.name in originals:
                modules[l.name].set_processor(EditProcessor(l, i, edits, layer_of, state, originals[l.name],
                                                            renormalize))
        yield targeted
    finally:
        handle.remove()
        for name, proc in originals.items():
            modules[name].set_processor(proc)
