"""An attention prompt (Discffusion Eq. 5): learnable deltas on the cross-attention K/V projections of a UNet, and
how one is applied, saved and loaded. A model adapter: no scoring, no training here (that is
`interp.tasks.prompt_learning`, which optimises a matching score of the prompt).

Every cross-attention layer (`attn2`) gets two learnable matrices, added to its frozen key and value projections

    W'_k = W_k + p^k,    W'_v = W_v + p^v          (Eq. 5; p initialised to zero)

or, as the authors' code did, LoRA factors on the same projections (`variant="lora"`, peft).

    prompt = AttentionPrompt.for_unet(pipe, "additive")
    save_prompt(prompt, "wino.prompt.safetensors")
    with apply_prompt(pipe, load_prompt("wino.prompt.safetensors")):
        ...                                                  # any scoring / tracing / generation runs with it

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
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
import weakref
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.attention_capture import cross_attention_layers

__all__ = ["VARIANTS", "FORMAT_VERSION", "PromptLayer", "AttentionPrompt", "apply_prompt", "check_compatible",
           "save_prompt", "load_prompt"]

VARIANTS = ("additive", "lora")
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
            base_model = model_id(unet_or_pipe)
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


def model_id(pipe_or_unet) -> str:
    """The model path / id of a pipeline or UNet (`name_or_path` or `config._name_or_path`), "" if unknown."""
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


def check_compatible(unet: nn.Module, prompt: AttentionPrompt) -> None:
    """ValueError unless every layer of the prompt exists in the UNet with the same to_k / to_v shapes (unfused);
    a warning when the prompt adapts only some of the UNet's cross-attention layers."""
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
    # peft: an optional extra, only for LoRA prompts (imported here so additive prompts work without it)
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
    check_compatible(unet, prompt)
    here = model_id(pipe_or_unet)
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
# Files
# ----------------------------------------------------------------------------------------------
def save_prompt(prompt: AttentionPrompt, path: str | Path) -> Path:
    """Write a prompt as safetensors (float32 tensors on the CPU) with its header as JSON metadata.

    Tensor names: "<module path>.to_k.delta" / ".to_v.delta" (additive) or "<module path>.to_k.lora_A" / "lora_B"
    (lora). Metadata key "discolens_prompt": format_version, variant, rank, alpha, base_model, layers (name, alias,
    shapes), meta (margin, training settings).
    """
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
