"""Attention-based prompt learning (Discffusion Eq. 5-6): learnable deltas on the cross-attention K/V projections.

Every cross-attention layer (`attn2`) gets two learnable matrices, added to its frozen key and value projections

    W'_k = W_k + p^k,    W'_v = W_v + p^v          (Eq. 5; p initialised to zero)

trained few-shot with the margin triplet loss on the LSE matching score f (Eq. 4, `interp.lse`)

    L = mean over triplets of max(0, f(x_neg, y) - f(x_pos, y) + M)          (Eq. 6, image negatives)
                           or max(0, f(x, y_neg) - f(x, y_pos) + M)          (caption negatives)

(the paper writes a sum; the mean only rescales the learning rate and keeps it independent of the batch size).
M = 0.2 by default; the authors' code used M = 0.1 and LoRA processors, offered here as `variant="lora"` (peft).

    prompt, log = train_prompt(pipe, load_benchmark("winoground"), MatchOptions(), steps=50, lr=1e-3)
    save_prompt(prompt, "wino.prompt.safetensors")
    with apply_prompt(pipe, load_prompt("wino.prompt.safetensors")):
        score_image_captions(pipe, image, captions)        # any scoring / tracing / generation runs with it

How a prompt is applied (no monkey-patching, frozen weights untouched, everything restored on exit, also after an
exception):
  * "additive": a PyTorch forward hook on each `attn2.to_k` / `attn2.to_v` adds `F.linear(x, p)` to the
    projection's output: x W^T + b + x p^T = F.linear(x, W + p, b), i.e. exactly Eq. 5. A hook (rather than an
    attention processor) because `noised_unet_pass` / `trace` install their own `CaptureProcessor`s on the
    cross-attention layers, which would replace a prompt processor; a hook on the projection works under any
    processor (CaptureProcessor, SDPA, the pipeline's own) and the trace still sees the probabilities. A zero
    prompt adds exact zeros, so the UNet output is bit-identical.
  * "lora": peft's `inject_adapter_in_model(LoraConfig(target_modules=[... attn2.to_k, ... attn2.to_v]))` wraps
    those Linear layers (the original modules become `base_layer`); the adapter's lora_A / lora_B parameters are
    the prompt's own tensors (shared, so they train in place). On exit the original Linear modules are put back,
    `unet.peft_config` and the parameters' `requires_grad` flags are restored. p = (alpha / rank) B A.

Tensor shapes (per cross-attention layer, keyed by its module path; `alias` as in models.attention_capture):
    additive:  p_k  [inner_dim, cross_attention_dim]  = attn2.to_k.weight.shape  (out_features, in_features)
               p_v  [inner_dim, cross_attention_dim]  = attn2.to_v.weight.shape
    lora:      A_k  [rank, cross_attention_dim],  B_k [inner_dim, rank]   (likewise A_v, B_v); B starts at 0

Training (`train_prompt`): UNet, VAE and text encoder are frozen (requires_grad False for the run, the flags
restored afterwards); images are encoded once (VAE posterior mean, as `encode_image`), captions once; each step
noises the batch's latents at every `options.timesteps` timestep with one noise draw per timestep shared by all
rows (by default the scoring's own noise, `options.noise_seed`, so the trained objective is the test-time score),
runs the UNet once per timestep on the batch's unique (image, caption) rows with capture processors whose sink
keeps the (differentiable) attention maps, and computes f exactly as `interp.lse.lse_score` does (same source,
layers, pooling, lambda and token columns as `options`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention_capture import capture_cross_attention, cross_attention_layers, select_layer_names
from models.trace import real_token_count

__all__ = ["VARIANTS", "NEGATIVES", "FORMAT_VERSION", "PromptLayer", "AttentionPrompt", "Triplet", "apply_prompt",
           "collect_triplets", "prompt_scores", "triplet_loss", "train_prompt", "save_prompt", "load_prompt"]

VARIANTS = ("additive", "lora")
NEGATIVES = ("both", "image", "caption")
FORMAT_VERSION = 1
_META_KEY = "discolens_prompt"
_ADAPTER = "discolens_prompt"
Variant = Literal["additive", "lora"]


# ----------------------------------------------------------------------------------------------
# The prompt
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptLayer:
    """A cross-attention layer a prompt adapts: module path, alias, and the to_k / to_v weight shapes."""

    name: str  # e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    alias: str  # e.g. "down.0.attn.0"
    k_shape: tuple[int, int]  # attn2.to_k.weight.shape = (out_features, in_features)
    v_shape: tuple[int, int]  # attn2.to_v.weight.shape


def _key(alias: str, which: str, part: str | None = None) -> str:
    """ParameterDict key (no dots allowed there): 'down.0.attn.0', 'k', 'A' -> 'down_0_attn_0__k__A'."""
    return f"{alias.replace('.', '_')}__{which}" + (f"__{part}" if part else "")


class AttentionPrompt(nn.Module):
    """Learnable K/V deltas for every cross-attention layer of a UNet (see the module docstring for shapes).

    Build one with `AttentionPrompt.for_unet(unet, variant)`; parameters live in `self.params` (a ParameterDict);
    read them by layer alias or module path with `get(layer, "k"|"v")` (additive) / `lora(layer, "k"|"v")`, or the
    effective weight delta (both variants) with `delta(layer, "k"|"v")`.

    Attributes:
        variant: "additive" | "lora"
        layers: the adapted layers, in UNet order
        rank, alpha: LoRA rank and alpha (scale = alpha / rank); 0 for "additive"
        base_model: the model the prompt was made for (pipe.name_or_path), "" if unknown
        meta: free JSON-ready metadata (training settings: margin, steps, lr, options, ...)
    """

    def __init__(self, layers: Sequence[PromptLayer], variant: Variant = "additive", rank: int = 4,
                 alpha: float | None = None, base_model: str = "", meta: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        layers = list(layers)
        if not layers:
            raise ValueError("a prompt needs at least one cross-attention layer")
        self.variant = variant
        self.layers = layers
        self.base_model = str(base_model or "")
        self.meta = dict(meta or {})
        self.params = nn.ParameterDict()
        if variant == "additive":
            self.rank, self.alpha = 0, 0.0
            for l in layers:
                self.params[_key(l.alias, "k")] = nn.Parameter(torch.zeros(l.k_shape))
                self.params[_key(l.alias, "v")] = nn.Parameter(torch.zeros(l.v_shape))
        else:
            rank = int(rank)
            if rank < 1:
                raise ValueError(f"LoRA rank must be at least 1, got {rank}")
            self.rank = rank
            self.alpha = float(alpha) if alpha is not None else float(rank)
            if not math.isfinite(self.alpha) or self.alpha <= 0:
                raise ValueError(f"LoRA alpha must be a positive number, got {alpha}")
            g = torch.Generator().manual_seed(int(seed))
            for l in layers:
                for which, (out_f, in_f) in (("k", l.k_shape), ("v", l.v_shape)):
                    # peft's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0
                    bound = 1.0 / math.sqrt(in_f)
                    a = (torch.rand(rank, in_f, generator=g) * 2 - 1) * bound
                    self.params[_key(l.alias, which, "A")] = nn.Parameter(a)
                    self.params[_key(l.alias, which, "B")] = nn.Parameter(torch.zeros(out_f, rank))

    # ---- construction ----
    @staticmethod
    def layers_of(unet: nn.Module) -> list[PromptLayer]:
        """The UNet's cross-attention layers with their to_k / to_v weight shapes."""
        out = []
        for l in cross_attention_layers(unet):
            attn = unet.get_submodule(l.name)
            if getattr(attn, "to_k", None) is None or getattr(attn, "to_v", None) is None:
                raise ValueError(f"{l.name} has no to_k / to_v projections")
            out.append(PromptLayer(l.name, l.alias, tuple(attn.to_k.weight.shape), tuple(attn.to_v.weight.shape)))
        if not out:
            raise ValueError("the UNet has no cross-attention (attn2) layers")
        return out

    @classmethod
    def for_unet(cls, unet_or_pipe, variant: Variant = "additive", rank: int = 4, alpha: float | None = None,
                 seed: int = 0, base_model: str | None = None) -> "AttentionPrompt":
        """A fresh prompt for a UNet (or a pipeline): zeros ("additive"), or B = 0 and random A ("lora")."""
        unet = getattr(unet_or_pipe, "unet", unet_or_pipe)
        if base_model is None:
            base_model = _model_id(unet_or_pipe)
        return cls(cls.layers_of(unet), variant, rank, alpha, base_model, seed=seed)

    # ---- access ----
    def layer(self, key: str) -> PromptLayer:
        """A layer by alias or module path."""
        for l in self.layers:
            if key in (l.alias, l.name):
                return l
        raise KeyError(f"no layer {key!r} in the prompt; layers: {[l.alias for l in self.layers]}")

    def get(self, layer: str, which: str) -> nn.Parameter:
        """The additive delta p^k ("k") or p^v ("v") of a layer (alias or module path)."""
        if self.variant != "additive":
            raise ValueError("get() is for additive prompts; use lora() or delta()")
        return self.params[_key(self.layer(layer).alias, _which(which))]

    def lora(self, layer: str, which: str) -> tuple[nn.Parameter, nn.Parameter]:
        """The LoRA factors (A [rank, in], B [out, rank]) of a layer's to_k ("k") or to_v ("v")."""
        if self.variant != "lora":
            raise ValueError("lora() is for LoRA prompts; use get() or delta()")
        alias = self.layer(layer).alias
        w = _which(which)
        return self.params[_key(alias, w, "A")], self.params[_key(alias, w, "B")]

    @property
    def scale(self) -> float:
        """LoRA scaling alpha / rank (1.0 for additive prompts)."""
        return self.alpha / self.rank if self.variant == "lora" else 1.0

    def delta(self, layer: str, which: str) -> torch.Tensor:
        """The effective weight delta of a layer's to_k / to_v: p (additive) or (alpha / rank) B A (lora)."""
        if self.variant == "additive":
            return self.get(layer, which)
        a, b = self.lora(layer, which)
        return self.scale * (b @ a)

    def norms(self) -> dict[str, dict[str, float]]:
        """Frobenius norm of each layer's effective K and V deltas: {alias: {"k": .., "v": ..}}."""
        with torch.no_grad():
            return {l.alias: {w: float(self.delta(l.alias, w).float().norm()) for w in ("k", "v")}
                    for l in self.layers}

    def header(self) -> dict:
        """JSON-ready description (what `save_prompt` writes as metadata)."""
        return {"format_version": FORMAT_VERSION, "variant": self.variant, "rank": self.rank, "alpha": self.alpha,
                "base_model": self.base_model,
                "layers": [{"name": l.name, "alias": l.alias, "k_shape": list(l.k_shape), "v_shape": list(l.v_shape)}
                           for l in self.layers],
                "meta": self.meta}

    def extra_repr(self) -> str:
        r = f", rank={self.rank}, alpha={self.alpha}" if self.variant == "lora" else ""
        return f"variant={self.variant!r}, layers={len(self.layers)}{r}"


def _which(which: str) -> str:
    if which not in ("k", "v"):
        raise ValueError(f"which must be 'k' or 'v', got {which!r}")
    return which


def _model_id(pipe_or_unet) -> str:
    for obj in (pipe_or_unet, getattr(pipe_or_unet, "unet", None)):
        if obj is None:
            continue
        v = getattr(obj, "name_or_path", None)
        if not v:
            cfg = getattr(obj, "config", None)
            v = cfg.get("_name_or_path") if isinstance(cfg, dict) else getattr(cfg, "_name_or_path", None)
        if v:
            return str(v)
    return ""


# ----------------------------------------------------------------------------------------------
# Applying a prompt
# ----------------------------------------------------------------------------------------------
_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _check_compatible(unet: nn.Module, prompt: AttentionPrompt) -> None:
    mods = dict(unet.named_modules())
    for l in prompt.layers:
        attn = mods.get(l.name)
        if attn is None:
            raise ValueError(f"the UNet has no layer {l.name} ({l.alias}); the prompt was made for another "
                             f"architecture (base model {prompt.base_model or 'unknown'})")
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"{l.name} uses fused QKV projections; call unet.unfuse_qkv_projections() first")
        for which, shape in (("k", l.k_shape), ("v", l.v_shape)):
            lin = getattr(attn, f"to_{which}", None)
            got = tuple(lin.weight.shape) if lin is not None and hasattr(lin, "weight") else None
            if got != tuple(shape):
                raise ValueError(f"{l.alias}.to_{which}: the prompt expects a weight of shape {tuple(shape)}, "
                                 f"the UNet has {got} (base model {prompt.base_model or 'unknown'})")
    ours = {l.name for l in prompt.layers}
    theirs = {l.name for l in cross_attention_layers(unet)}
    if ours != theirs:
        warnings.warn(f"the prompt adapts {len(ours)} of the UNet's {len(theirs)} cross-attention layers", stacklevel=3)


def _additive_hook(delta: torch.Tensor):
    def hook(module, args, output):
        x = args[0]
        return output + F.linear(x, delta.to(device=x.device, dtype=x.dtype))  # x W^T + b + x p^T = x (W+p)^T + b
    return hook


@contextlib.contextmanager
def _apply_additive(unet: nn.Module, prompt: AttentionPrompt) -> Iterator[None]:
    handles = []
    try:
        for l in prompt.layers:
            attn = unet.get_submodule(l.name)
            for which in ("k", "v"):
                handles.append(getattr(attn, f"to_{which}").register_forward_hook(
                    _additive_hook(prompt.get(l.alias, which))))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _apply_lora(unet: nn.Module, prompt: AttentionPrompt) -> Iterator[None]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    originals: dict[tuple[str, str], nn.Module] = {}
    for l in prompt.layers:
        attn = unet.get_submodule(l.name)
        for which in ("k", "v"):
            lin = getattr(attn, f"to_{which}")
            if isinstance(lin, BaseTunerLayer):
                raise ValueError(f"{l.name}.to_{which} already carries a peft adapter; unload it first")
            originals[(l.name, which)] = lin
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    had_cfg = "peft_config" in unet.__dict__
    old_cfg = unet.__dict__.get("peft_config")
    cfg = LoraConfig(r=prompt.rank, lora_alpha=prompt.alpha, lora_dropout=0.0, bias="none",
                     target_modules=[f"{n}.to_{w}" for (n, w) in originals], init_lora_weights=True)
    try:
        inject_adapter_in_model(cfg, unet, adapter_name=_ADAPTER)
        for l in prompt.layers:
            attn = unet.get_submodule(l.name)
            for which in ("k", "v"):
                mod = getattr(attn, f"to_{which}")
                if not isinstance(mod, BaseTunerLayer) or _ADAPTER not in mod.lora_A:
                    raise RuntimeError(f"peft did not wrap {l.name}.to_{which}")  # pragma: no cover
                if abs(float(mod.scaling[_ADAPTER]) - prompt.scale) > 1e-12:
                    raise RuntimeError("peft's LoRA scaling differs from alpha / rank")  # pragma: no cover
                a, b = prompt.lora(l.alias, which)
                dev = originals[(l.name, which)].weight.device
                # share the prompt's parameters (same objects: they train in place) when on the right device
                mod.lora_A[_ADAPTER].weight = a if a.device == dev else nn.Parameter(a.detach().to(dev))
                mod.lora_B[_ADAPTER].weight = b if b.device == dev else nn.Parameter(b.detach().to(dev))
        yield
    finally:
        for (name, which), lin in originals.items():
            setattr(unet.get_submodule(name), f"to_{which}", lin)
        for p, rg in flags:
            p.requires_grad_(rg)
        if had_cfg:
            unet.__dict__["peft_config"] = old_cfg
        else:
            unet.__dict__.pop("peft_config", None)


@contextlib.contextmanager
def apply_prompt(pipe_or_unet, prompt: AttentionPrompt | None) -> Iterator[AttentionPrompt | None]:
    """Run a pipeline's UNet with a prompt applied (see the module docstring); everything restored on exit.

    Args:
        pipe_or_unet: a diffusers pipeline (its `unet` is used) or a UNet.
        prompt: an AttentionPrompt, or None (a no-op context, handy for optional CLI flags).
    Raises:
        ValueError: the prompt does not fit the UNet (layers or shapes), fused projections, or a prompt is already
            applied to this UNet (nesting would apply it twice).
    """
    if prompt is None:
        yield None
        return
    if not isinstance(prompt, AttentionPrompt):
        raise ValueError(f"apply_prompt expects an AttentionPrompt, got {type(prompt).__name__}")
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    _check_compatible(unet, prompt)
    here = _model_id(pipe_or_unet)
    if prompt.base_model and here and Path(prompt.base_model).name != Path(here).name:
        warnings.warn(f"the prompt was trained on {prompt.base_model!r}, applying it to {here!r}", stacklevel=3)
    if unet in _ACTIVE:
        raise ValueError("a prompt is already applied to this UNet (nested apply_prompt)")
    _ACTIVE.add(unet)
    try:
        with (_apply_additive if prompt.variant == "additive" else _apply_lora)(unet, prompt):
            yield prompt
    finally:
        _ACTIVE.discard(unet)


# ----------------------------------------------------------------------------------------------
# Training data
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Triplet:
    """A positive pair (image, caption) and its negative (neg_image or image, neg_caption or caption).

    Image negative (Eq. 6): neg_image set, the caption shared. Caption negative: neg_caption set, the image shared.
    """

    image: Any  # PIL image
    caption: str
    neg_image: Any = None
    neg_caption: str | None = None

    @property
    def kind(self) -> str:
        return "image" if self.neg_caption is None else ("caption" if self.neg_image is None else "both")


def _triplets_from_items(items, negatives: str) -> list[Triplet]:
    out = []
    for it in items:
        imgs = it.load_images()
        for k, img in enumerate(imgs):
            pos = it.captions[it.answers[k]]
            if negatives in ("both", "caption"):
                out += [Triplet(img, pos, neg_caption=c) for j, c in enumerate(it.captions) if j != it.answers[k]]
            if negatives in ("both", "image"):
                out += [Triplet(img, pos, neg_image=imgs[k2]) for k2 in range(len(imgs))
                        if it.answers[k2] != it.answers[k]]
    return out


def collect_triplets(data, negatives: str = "both", split: str = "train") -> list[Triplet]:
    """Training triplets from a benchmark (its `split`, default "train"), benchmark items, or explicit triplets.

    Args:
        data: a Benchmark, a benchmark name or folder (loaded with `load_benchmark`), an Item or list of Items, or
            a list of Triplet / tuples: `(x_pos, x_neg, y)` (image negative, Eq. 6 order) or
            `(x, y_pos, y_neg)` (caption negative).
        negatives: for benchmark items: "both" (every negative an item offers), "image" (other images of the item
            whose true caption differs: winoground) or "caption" (every other caption of the item).
    Raises:
        ValueError: unknown `negatives`, a malformed tuple, or no triplets at all.
    """
    from models.shapes.benchmarks import Benchmark, Item, load_benchmark

    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of {NEGATIVES}")
    if isinstance(data, (str, Path)):
        data = load_benchmark(data)
    if isinstance(data, Benchmark):
        out = _triplets_from_items(data.split(split), negatives)
        where = f"the {split!r} split of {data.name}"
    elif isinstance(data, Item):
        out, where = _triplets_from_items([data], negatives), f"item {data.id}"
    else:
        if data is None:
            raise ValueError("no training pairs given")
        out, where = [], "the given pairs"
        for i, d in enumerate(data):
            if isinstance(d, Item):
                out += _triplets_from_items([d], negatives)
            elif isinstance(d, Triplet):
                out.append(d)
            elif isinstance(d, (tuple, list)) and len(d) == 3:
                a, b, c = d
                if isinstance(b, str) and isinstance(c, str):
                    out.append(Triplet(a, b, neg_caption=c))
                elif not isinstance(b, str) and isinstance(c, str):
                    out.append(Triplet(a, c, neg_image=b))
                else:
                    raise ValueError(f"pair {i}: expected (x_pos, x_neg, caption) or (image, caption, neg_caption)")
            else:
                raise ValueError(f"pair {i}: expected a Triplet, an Item or a 3-tuple, got {type(d).__name__}")
    for i, t in enumerate(out):
        if t.neg_image is None and t.neg_caption is None:
            raise ValueError(f"triplet {i} has no negative (set neg_image or neg_caption)")
        for c in (t.caption, t.neg_caption):
            if c is not None and (not isinstance(c, str) or not c.strip()):
                raise ValueError(f"triplet {i} has an empty or non-string caption: {c!r}")
        same_img = t.neg_image is None or t.neg_image is t.image
        same_cap = t.neg_caption is None or " ".join(t.neg_caption.split()) == " ".join(t.caption.split())
        if same_img and same_cap:
            raise ValueError(f"triplet {i}: the negative equals the positive")
    if not out:
        raise ValueError(f"no training pairs in {where} (negatives={negatives!r})")
    return out


# ----------------------------------------------------------------------------------------------
# Differentiable matching score
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Rows:
    """Unique (image, caption) rows of a triplet set, and each triplet's positive / negative row."""

    latents: torch.Tensor  # [I, C, h, w]
    emb: torch.Tensor  # [J, 77, D]
    cols: list[list[int]]  # per caption, the pooled token positions
    rows: list[tuple[int, int]]  # (image index, caption index)
    pos: list[int]  # per triplet, its positive row
    neg: list[int]  # per triplet, its negative row


def _token_columns(tokenizer, ids: torch.Tensor, tokens: str) -> list[int]:
    from interp.lse import SPECIAL

    n = real_token_count(ids.tolist(), tokenizer.eos_token_id)
    if tokens == "all":
        return list(range(n))
    if tokens != "words":
        raise ValueError(f"unknown tokens option {tokens!r}; use 'all' or 'words'")
    toks = [t.replace("</w>", "") for t in tokenizer.convert_ids_to_tokens(ids[:n].tolist())]
    cols = [j for j, t in enumerate(toks) if t not in SPECIAL]
    if not cols:
        raise ValueError(f"tokens='words': a caption has no word tokens ({toks})")
    return cols


def _encode_pairs(pipe, pairs: Sequence[tuple[Any, str]], tokens: str) -> _Rows:
    """Encode unique images and captions once (frozen VAE / text encoder, no gradients); one row per pair."""
    from models.unet_pass import encode_image

    img_index: dict[int, int] = {}
    images: list = []
    cap_index: dict[str, int] = {}
    rows = []
    for x, c in pairs:
        if id(x) not in img_index:
            img_index[id(x)] = len(images)
            images.append(x)
        rows.append((img_index[id(x)], cap_index.setdefault(" ".join(c.split()), len(cap_index))))
    with torch.no_grad():
        latents = torch.cat([encode_image(pipe, x) for x in images])
        caps = list(cap_index)
        tok = pipe.tokenizer
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        cols = [_token_columns(tok, r, tokens) for r in ids]
        emb = pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].to(pipe.unet.device, pipe.unet.dtype)
    return _Rows(latents, emb, cols, rows, list(range(len(rows))), [])


def _prepare(pipe, triplets: Sequence[Triplet], tokens: str) -> _Rows:
    """Rows for the unique (image, caption) pairs of the triplets, with each triplet's positive / negative row."""
    index: dict[tuple[int, str], int] = {}
    pairs: list[tuple[Any, str]] = []
    pos, neg = [], []

    def row(x, c: str) -> int:
        k = (id(x), " ".join(c.split()))
        if k not in index:
            index[k] = len(pairs)
            pairs.append((x, c))
        return index[k]

    for t in triplets:
        pos.append(row(t.image, t.caption))
        neg.append(row(t.neg_image if t.neg_image is not None else t.image,
                       t.neg_caption if t.neg_caption is not None else t.caption))
    data = _encode_pairs(pipe, pairs, tokens)
    data.pos, data.neg = pos, neg
    return data


def _score_layers(unet, layers) -> list[str]:
    """Module paths of the layers a score averages, for MatchOptions.layers (None, 'last_per_stage', a list)."""
    return select_layer_names(cross_attention_layers(unet), layers)


def _check_options(options) -> None:
    from interp.lse import POOLINGS

    if options.scorer != "lse":
        raise ValueError(f"prompt learning trains the LSE score; options.scorer must be 'lse', got {options.scorer!r}")
    if options.source not in ("probs", "logits"):
        raise ValueError(f"unknown source {options.source!r}; use 'probs' or 'logits'")
    if options.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {options.pooling!r}; choose one of {POOLINGS}")
    if not options.timesteps:
        raise ValueError("options.timesteps is empty")


def _fixed_noise(latents: torch.Tensor, n_steps: int, seed: int) -> torch.Tensor:
    """The noise `noised_unet_pass` draws for `noise_seed=seed`: [S, C, h, w]."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n_steps, *latents.shape[1:]), generator=g).to(latents.device)


def _row_scores(pipe, data: _Rows, rows: Sequence[int], options, noise: torch.Tensor) -> torch.Tensor:
    """f (Eq. 4, as `lse_score` with `options`) of the given rows, differentiable w.r.t. the prompt: [R] float64."""
    from interp.lse import pool

    unet, sched = pipe.unet, pipe.scheduler
    dev, dt = unet.device, unet.dtype
    names = _score_layers(unet, options.layers)
    n_train = int(sched.config.num_train_timesteps)
    for t in options.timesteps:
        if isinstance(t, bool) or int(t) != t or not 0 <= int(t) < n_train:
            raise ValueError(f"timestep {t!r} is not an integer in [0, {n_train})")
    lat = data.latents[[data.rows[r][0] for r in rows]].to(dev)
    emb = data.emb[[data.rows[r][1] for r in rows]]
    cols = [data.cols[data.rows[r][1]] for r in rows]
    R = len(rows)
    want_logits = options.source == "logits"
    store: dict[str, torch.Tensor] = {}

    def sink(name, probs, logits):
        store[name] = logits if want_logits else probs

    total = torch.zeros(R, dtype=torch.float64, device=dev)
    with capture_cross_attention(unet, sink, want_logits=want_logits, layers=names):
        for s, t in enumerate(options.timesteps):
            tt = torch.full((R,), int(t), dtype=torch.long, device=dev)
            x_t = sched.add_noise(lat, noise[s : s + 1].expand(R, -1, -1, -1), tt)
            store.clear()
            unet(x_t.to(dt), tt, encoder_hidden_states=emb)
            for name in names:
                x = store[name]  # [R, heads, h*w, 77]
                total = total + torch.stack([pool(x[r][..., cols[r]], options.pooling, options.lam).mean()
                                             for r in range(R)])
    return total / (len(options.timesteps) * len(names))


def _hinge(f: torch.Tensor, pos: Sequence[int], neg: Sequence[int], margin: float) -> torch.Tensor:
    return torch.clamp(f[list(neg)] - f[list(pos)] + margin, min=0)


def prompt_scores(pipe, image, captions: Sequence[str], options=None, prompt: AttentionPrompt | None = None,
                  ) -> dict[str, float]:
    """f(image, caption) per caption as computed in training (one batch; with `prompt` applied if given).

    Equals `score_image_captions(pipe, image, captions, options)["scores"]` under `apply_prompt` (a consistency
    check of the training score); the noise is `options.noise_seed`'s.
    """
    from interp.tasks.matching import MatchOptions

    options = options or MatchOptions()
    _check_options(options)
    caps = [" ".join(str(c).split()) for c in captions]
    if not caps or not all(caps):
        raise ValueError("give at least one non-empty caption")
    data = _encode_pairs(pipe, [(image, c) for c in caps], options.tokens)
    with torch.no_grad(), apply_prompt(pipe, prompt):
        noise = _fixed_noise(data.latents, len(options.timesteps), options.noise_seed)
        f = _row_scores(pipe, data, data.pos, options, noise)
    return {c: float(v) for c, v in zip(caps, f.cpu())}


def triplet_loss(pipe, data, options=None, margin: float = 0.2, prompt: AttentionPrompt | None = None,
                 negatives: str = "both", batch_size: int = 16) -> dict:
    """Mean triplet loss of a triplet set at the scoring's own noise (`options.noise_seed`), no gradients.

    Returns {"loss", "accuracy" (share of triplets with f_pos > f_neg), "violations" (hinge > 0), "n_triplets"}.
    """
    from interp.tasks.matching import MatchOptions

    options = options or MatchOptions()
    _check_options(options)
    trips = collect_triplets(data, negatives)
    rows = _prepare(pipe, trips, options.tokens)
    noise = _fixed_noise(rows.latents, len(options.timesteps), options.noise_seed)
    f = torch.empty(len(rows.rows), dtype=torch.float64)
    with torch.no_grad(), apply_prompt(pipe, prompt):
        for a in range(0, len(rows.rows), max(1, int(batch_size))):
            idx = list(range(a, min(a + batch_size, len(rows.rows))))
            f[idx] = _row_scores(pipe, rows, idx, options, noise).cpu()
    h = _hinge(f, rows.pos, rows.neg, margin)
    return {"loss": float(h.mean()), "accuracy": float((f[rows.pos] > f[rows.neg]).double().mean()),
            "violations": int((h > 0).sum()), "n_triplets": len(trips)}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _frozen(pipe) -> Iterator[None]:
    """requires_grad False and eval mode for the pipeline's models; flags and modes restored on exit."""
    mods = [m for m in (getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder")) if isinstance(m, nn.Module)]
    flags = [(p, p.requires_grad) for m in mods for p in m.parameters()]
    modes = [(m, m.training) for m in mods]
    try:
        for m in mods:
            m.requires_grad_(False)
            m.eval()
        yield
    finally:
        for p, rg in flags:
            p.requires_grad_(rg)
        for m, tr in modes:
            m.train(tr)


def train_prompt(pipe, benchmark_or_pairs, options=None, steps: int = 50, lr: float = 1e-3, margin: float = 0.2,
                 variant: Variant = "additive", seed: int = 0, *, negatives: str = "both", batch_size: int = 8,
                 rank: int = 4, alpha: float | None = None, resample_noise: bool = False,
                 prompt: AttentionPrompt | None = None,
                 callback: Callable[[dict], None] | None = None) -> tuple[AttentionPrompt, list[dict]]:
    """Few-shot attention prompt learning (Eq. 5-6) on a benchmark's train split or explicit triplets.

    Args:
        pipe: a Stable-Diffusion-family pipeline; its UNet, VAE and text encoder stay frozen (bit-identical).
        benchmark_or_pairs: anything `collect_triplets` takes (a Benchmark / name: its "train" split).
        options: interp.tasks.matching.MatchOptions; the score f (source, layers, pooling, lam, tokens, timesteps,
            noise_seed) is the one scoring uses. `scorer` must be "lse".
        steps: optimiser steps (Adam), each on a minibatch of `batch_size` triplets (shuffled, seeded epochs).
        lr: Adam learning rate.
        margin: M of the triplet loss (the paper: 0.2; the authors' LoRA code: 0.1).
        variant: "additive" (p^k, p^v, zero-initialised) or "lora" (peft LoRA on attn2.to_k / to_v, B = 0 at start).
        seed: minibatch order, LoRA A init and (with `resample_noise`) the noise.
        negatives: "both" | "image" | "caption" (see `collect_triplets`).
        rank, alpha: LoRA rank and alpha (default alpha = rank, scale 1).
        resample_noise: draw fresh noise every step (from `seed`) instead of the scoring's fixed noise.
        prompt: continue training this prompt instead of a fresh one (its variant wins).
        callback: called with each step's log entry (progress; raising stops training, all restored).
    Returns:
        (prompt, log): the trained prompt (on the UNet's device; `prompt.meta` holds the settings) and one dict per
        step: step, loss (mean hinge over the minibatch), violations, accuracy (f_pos > f_neg), triplets, rows,
        seconds.
    Raises:
        ValueError: no training pairs, steps < 1, lr <= 0, margin < 0, batch_size < 1, unknown variant / negatives,
            options.scorer != "lse", a prompt that does not fit the UNet.
    """
    from interp.tasks.matching import MatchOptions

    options = options or MatchOptions()
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a number >= 0, got {margin!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if prompt is None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    _check_options(options)
    _score_layers(pipe.unet, options.layers)
    trips = collect_triplets(benchmark_or_pairs, negatives)

    unet = pipe.unet
    dev = unet.device
    if prompt is None:
        prompt = AttentionPrompt.for_unet(pipe, variant, rank=rank, alpha=alpha, seed=seed)
    _check_compatible(unet, prompt)
    prompt.to(dev, torch.float32)
    for p in prompt.parameters():
        p.requires_grad_(True)
    rng = random.Random(seed)
    order: list[int] = []
    log: list[dict] = []
    with _frozen(pipe):
        data = _prepare(pipe, trips, options.tokens)
        S = len(options.timesteps)
        fixed = _fixed_noise(data.latents, S, options.noise_seed)
        g = torch.Generator().manual_seed(int(seed))
        opt = torch.optim.Adam(prompt.parameters(), lr=float(lr))
        with apply_prompt(pipe, prompt), torch.enable_grad():
            for step in range(steps):
                t0 = time.perf_counter()
                if len(order) < min(batch_size, len(trips)):
                    perm = list(range(len(trips)))
                    rng.shuffle(perm)
                    order += perm
                batch, order = order[:min(batch_size, len(trips))], order[min(batch_size, len(trips)):]
                rows = sorted({data.pos[i] for i in batch} | {data.neg[i] for i in batch})
                at = {r: k for k, r in enumerate(rows)}
                noise = (torch.randn((S, *data.latents.shape[1:]), generator=g).to(dev) if resample_noise
                         else fixed)
                f = _row_scores(pipe, data, rows, options, noise)
                pos = [at[data.pos[i]] for i in batch]
                neg = [at[data.neg[i]] for i in batch]
                h = _hinge(f, pos, neg, margin)
                loss = h.mean()
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:  # all hinges 0 (or no path to the prompt): nothing to learn this step
                    loss.backward()
                    opt.step()
                entry = {"step": step + 1, "loss": float(loss.detach()), "violations": int((h > 0).sum()),
                         "accuracy": float((f[pos] > f[neg]).double().mean()), "triplets": len(batch),
                         "rows": len(rows), "seconds": round(time.perf_counter() - t0, 4)}
                log.append(entry)
                if callback is not None:
                    callback(entry)
    for p in prompt.parameters():
        p.grad = None
    prompt.meta.update({
        "margin": float(margin), "steps": int(steps) + int(prompt.meta.get("steps", 0)), "lr": float(lr),
        "seed": int(seed), "negatives": negatives, "batch_size": batch_size, "resample_noise": bool(resample_noise),
        "n_triplets": len(trips), "options": _options_dict(options),
        "data": getattr(benchmark_or_pairs, "name", None) or (str(benchmark_or_pairs)
                                                               if isinstance(benchmark_or_pairs, (str, Path)) else
                                                               "pairs"),
        "final_loss": log[-1]["loss"],
    })
    return prompt, log


def _options_dict(options) -> dict:
    d = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(vars(options))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def save_prompt(prompt: AttentionPrompt, path: str | Path) -> Path:
    """Write a prompt as safetensors (float32 tensors on the CPU) with its header as JSON metadata.

    Tensor names: "<module path>.to_k.delta" / ".to_v.delta" (additive) or "<module path>.to_k.lora_A" / "lora_B"
    (lora). Metadata key "discolens_prompt": format_version, variant, rank, alpha, base_model, layers (name, alias,
    shapes), meta (margin, training settings).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for l in prompt.layers:
        for w in ("k", "v"):
            if prompt.variant == "additive":
                tensors[f"{l.name}.to_{w}.delta"] = prompt.get(l.alias, w).detach().float().cpu().contiguous()
            else:
                a, b = prompt.lora(l.alias, w)
                tensors[f"{l.name}.to_{w}.lora_A"] = a.detach().float().cpu().contiguous()
                tensors[f"{l.name}.to_{w}.lora_B"] = b.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(prompt.header())})
    return path


def load_prompt(path: str | Path) -> AttentionPrompt:
    """Read a prompt written by `save_prompt` (on the CPU).

    Raises:
        FileNotFoundError: no such file. ValueError: not a DiscoLens prompt, another format version, missing tensors.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if raw is not None else {}
    except Exception as e:  # safetensors raises its own error classes for non-safetensors files
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
    if raw is None:
        raise ValueError(f"{path} is not a DiscoLens prompt (no {_META_KEY!r} metadata)")
    h = json.loads(raw)
    if h.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is prompt format {h.get('format_version')}, this code reads {FORMAT_VERSION}")
    layers = [PromptLayer(l["name"], l["alias"], tuple(l["k_shape"]), tuple(l["v_shape"])) for l in h["layers"]]
    prompt = AttentionPrompt(layers, h["variant"], rank=h.get("rank") or 4, alpha=h.get("alpha") or None,
                             base_model=h.get("base_model", ""), meta=h.get("meta", {}))
    with torch.no_grad():
        for l in layers:
            for w in ("k", "v"):
                names = ([(f"{l.name}.to_{w}.delta", prompt.get(l.alias, w))] if prompt.variant == "additive" else
                         list(zip((f"{l.name}.to_{w}.lora_A", f"{l.name}.to_{w}.lora_B"), prompt.lora(l.alias, w))))
                for name, param in names:
                    if name not in tensors:
                        raise ValueError(f"{path}: tensor {name} is missing")
                    if tuple(tensors[name].shape) != tuple(param.shape):
                        raise ValueError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                                         f"expected {tuple(param.shape)}")
                    param.copy_(tensors[name])
    return prompt
