"""Tracing cross-attention: every layer, head, UNet call (timestep) and real token, for any SD-family UNet.

    with trace(pipe) as tr:
        pipe("a red circle", num_inference_steps=25)
    t = tr.trace                      # AttentionTrace of the (first) prompt
    t.probs["down.0.attn.0"].shape    # [steps, heads, h, w, tokens]

How it works: capture processors (models.attention_capture) go on the cross-attention layers only,
through `Attention.set_processor`, and the original processors come back on exit (also after an
exception). Two PyTorch forward hooks (removed on exit too) read what the processors cannot see: the
text encoder's input ids (to know each prompt's real tokens, BOS ... EOS) and the UNet's timestep
and latent size. With classifier-free guidance the UNet batch is `[uncond; cond]` (diffusers'
order); the conditional half is kept, the unconditional one only when asked.

Options beyond selection: `padded=True` keeps every key column of the padded text (BOS, words, EOS and padding,
`tokenizer.model_max_length` of them) instead of the real tokens only; `grad=True` keeps the maps with their
autograd graph (not detached; stored on the UNet's device unless `device` says otherwise), so a score of them can be
differentiated; `processor_factory` replaces the capture processor (e.g. `ProbeSet.factory`, to route the maps
through captum-visible probe modules).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .attention_capture import CaptureProcessor, CrossAttnLayer, capture_cross_attention, layer_stage

__all__ = ["LayerInfo", "AttentionTrace", "Tracer", "trace", "real_token_count"]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A traced layer: diffusers module path, alias, heads kept and its spatial resolution."""

    name: str
    alias: str
    heads: int
    h: int
    w: int

    @property
    def stage(self) -> str:
        """'down' | 'mid' | 'up' (or 'other')."""
        return layer_stage(self.name, self.alias)


@dataclasses.dataclass
class AttentionTrace:
    """Cross-attention of one prompt over a run.

    Attributes:
        prompt: the prompt text (decoded from its tokens when not given).
        tokens: the real tokens kept, BOS ... EOS (`</w>` removed); with `padded=True` every position of the
            padded text, padding tokens named by the tokenizer                         [tokens]
        token_index: their positions in the padded token sequence (padded: range(max_length)) [tokens]
        timesteps: the scheduler timestep of each UNet call kept                        [steps]
        layers: the layers kept, in UNet order (down, mid, up)                          [layers]
        heads: the head indices kept (same for every layer)                             [heads]
        probs: per layer alias, attention probabilities, fp16 on the CPU     [steps, heads, h, w, tokens]
        logits: same layout, pre-softmax scores (only when traced with `logits=True`)
        uncond_probs: same layout for the unconditional branch over its own real tokens (optional)
        uncond_tokens: those tokens
        cosine: per layer alias, cosine similarity of the projected query (`to_q` of the image
            position) and key (`to_k` of the token) of each head, in [-1, 1]; cond branch, real tokens
            (only when traced with `cosine=True`)                             [steps, heads, h, w, tokens]
        n_real: the number of real tokens (BOS ... EOS) of the prompt; they are the first n_real columns
            (all of them unless traced with `padded=True`)
        queries: per layer alias, the projected queries (`to_q` of each image position), split by head; cond
            branch (only when traced with `queries=True`): a word that was not in the prompt can be
            attended to after the fact from these (`interp.tasks.workbench.any_word_map`)
                                                                              [steps, heads, h, w, head_dim]
    """

    prompt: str
    tokens: list[str]
    token_index: list[int]
    timesteps: list[float]
    layers: list[LayerInfo]
    heads: list[int] | None
    probs: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    uncond_probs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    uncond_tokens: list[str] = dataclasses.field(default_factory=list)
    cosine: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    n_real: int | None = None
    queries: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_real is None:
            self.n_real = len(self.tokens)

    # ---- access ----
    @property
    def layer_names(self) -> list[str]:
        return [l.alias for l in self.layers]

    def layer(self, key: int | str) -> LayerInfo:
        """A layer by index, alias or diffusers module path."""
        if isinstance(key, int):
            return self.layers[key]
        for l in self.layers:
            if key in (l.alias, l.name):
                return l
        raise KeyError(f"no traced layer {key!r}; traced: {self.layer_names}")

    def nbytes(self) -> int:
        """Bytes held by all tensors of the trace."""
        return sum(t.numel() * t.element_size() for d in (self.probs, self.logits, self.uncond_probs, self.cosine,
                                                          self.queries) for t in d.values())

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    # ---- persistence ----
    def save(self, path: str | Path) -> Path:
        """Save as safetensors (tensors) with the metadata as JSON in the header."""
        path = Path(path)
        tensors = {}
        for kind, d in (("probs", self.probs), ("logits", self.logits), ("uncond_probs", self.uncond_probs),
                        ("cosine", self.cosine), ("queries", self.queries)):
            for k, v in d.items():
                tensors[f"{kind}/{k}"] = v.contiguous()
        meta = {
            "prompt": self.prompt, "tokens": self.tokens, "token_index": self.token_index,
            "timesteps": self.timesteps, "layers": [dataclasses.asdict(l) for l in self.layers],
            "heads": self.heads, "uncond_tokens": self.uncond_tokens, "n_real": self.n_real,
        }
        save_file(tensors, str(path), metadata={"discolens_trace": json.dumps(meta)})
        return path

    @staticmethod
    def load(path: str | Path) -> "AttentionTrace":
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("discolens_trace")
            if raw is None:
                raise ValueError(f"{path} is not a DiscoLens trace")
            meta = json.loads(raw)
            d: dict[str, dict] = {"probs": {}, "logits": {}, "uncond_probs": {}, "cosine": {},  # older files: no cosine
                                  "queries": {}}
            for k in f.keys():
                kind, alias = k.split("/", 1)
                d[kind][alias] = f.get_tensor(k)
        layers = [LayerInfo(**l) for l in meta["layers"]]
        return AttentionTrace(meta["prompt"], meta["tokens"], meta["token_index"], meta["timesteps"], layers,
                              meta["heads"], d["probs"], d["logits"], d["uncond_probs"], meta["uncond_tokens"],
                              d["cosine"], meta.get("n_real"), d["queries"])


def real_token_count(ids: Sequence[int], eos_id: int) -> int:
    """Number of real tokens (BOS ... first EOS inclusive) of a padded id sequence."""
    ids = list(ids)
    for i, t in enumerate(ids[1:], start=1):
        if t == eos_id:
            return i + 1
    return len(ids)


def _clean(tok: str) -> str:
    return tok.replace("</w>", "")


class Tracer:
    """Collects cross-attention during UNet calls; use through `trace(...)`.

    After the context, `traces` holds one AttentionTrace per prompt of the (last) prompt batch.
    """

    def __init__(self, unet, tokenizer, text_encoder=None, prompts: Sequence[str] | None = None,
                 layers: Sequence[str] | None = None, steps: Sequence[int] | None = None,
                 heads: Sequence[int] | None = None, tokens: Sequence[int] | None = None,
                 logits: bool = False, uncond: bool = False, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float16, cosine: bool = False, padded: bool = False,
                 grad: bool = False, processor_factory: Callable[..., object] = CaptureProcessor,
                 queries: bool = False) -> None:
        self.unet, self.tokenizer, self.text_encoder = unet, tokenizer, text_encoder
        self.want_queries = queries
        self.want_logits, self.keep_uncond, self.want_cosine = logits, uncond, cosine
        self.padded, self.grad, self.processor_factory = padded, grad, processor_factory
        if device is None:  # maps with a graph stay where the UNet computes them; plain ones go to the CPU
            device = unet.device if grad else "cpu"
        self.sel_layers = list(layers) if layers is not None else None
        self.sel_steps = set(steps) if steps is not None else None
        self.sel_heads = list(heads) if heads is not None else None
        self.sel_tokens = list(tokens) if tokens is not None else None
        self.store_device, self.store_dtype = torch.device(device), dtype
        self._prompt_ids: torch.Tensor | None = None
        self._neg_ids: torch.Tensor | None = None
        if prompts is not None:
            self._prompt_ids = self._tokenize(prompts)
        self._prompts_given = prompts is not None
        self._text_calls = 0
        self.call_index = -1  # index of the current UNet call
        self._latent_hw: tuple[int, int] = (0, 0)
        self._recording = False
        self._timesteps: list[float] = []
        self._layers: list[CrossAttnLayer] = []
        self._store: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.traces: list[AttentionTrace] = []

    # ---- tokens ----
    def _tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer
        return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def _real(self, ids: torch.Tensor) -> list[list[int]]:
        """Per row, the key columns kept: the real tokens (BOS ... EOS), or all of them with `padded`."""
        if self.padded:
            return [list(range(ids.shape[1])) for _ in ids]
        eos = self.tokenizer.eos_token_id
        return [list(range(real_token_count(row.tolist(), eos))) for row in ids]

    # ---- hooks ----
    def _text_hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            return
        self._text_calls += 1
        if self._text_calls == 1:
            if not self._prompts_given:
                self._prompt_ids = ids.detach().cpu()
        else:  # the pipeline encodes the negative prompt after the prompt
            self._neg_ids = ids.detach().cpu()

    def _unet_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.call_index += 1
        self._latent_hw = tuple(sample.shape[-2:])
        self._batch = sample.shape[0]
        self._recording = self.sel_steps is None or self.call_index in self.sel_steps
        if self._recording:
            tv = t.flatten()[0].item() if torch.is_tensor(t) else float(t)
            self._timesteps.append(float(tv))

    def _sink(self, name: str, probs: torch.Tensor, logits: torch.Tensor | None,
              cosine: torch.Tensor | None = None) -> None:
        """Store one layer call: probs / logits / cosine `[batch, heads, h*w, keys]` -> `[b, heads, h, w, keys]`."""
        if not self._recording:
            return
        if self._prompt_ids is None:
            raise RuntimeError("trace: no prompt tokens known; pass prompts=... when calling the UNet directly")
        n_prompts = self._prompt_ids.shape[0]
        b = probs.shape[0]
        if b == 2 * n_prompts:
            cond, unc = slice(n_prompts, 2 * n_prompts), slice(0, n_prompts)
        elif b == n_prompts:
            cond, unc = slice(0, n_prompts), None
        else:
            raise RuntimeError(f"trace: UNet batch {b} does not match {n_prompts} prompt(s) (or their CFG pair)")
        H, W = self._latent_hw
        f = math.isqrt((H * W) // probs.shape[2])
        h, w = H // f, W // f
        st = self._store.setdefault(name, {"probs": [], "logits": [], "uncond": [], "cosine": [], "queries": []})
        st["hw"] = (h, w)
        st["probs"].append(self._shrink(probs[cond], h, w))
        if self.want_logits and logits is not None:
            st["logits"].append(self._shrink(logits[cond], h, w))
        if self.keep_uncond and unc is not None:
            st["uncond"].append(self._shrink(probs[unc], h, w))
        if self.want_cosine and cosine is not None:
            # cos(to_q(image position), to_k(token)) per head, cond rows: [b, heads, h, w, keys]
            st["cosine"].append(self._shrink(cosine[cond], h, w))

    def _shrink(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """`[b, heads, h*w, keys]` -> kept heads, `[b, heads, h, w, keys]` in the store dtype/device."""
        if self.sel_heads is not None:
            x = x[:, self.sel_heads]
        if not self.grad:
            x = x.detach()
        x = x.reshape(x.shape[0], x.shape[1], h, w, x.shape[-1])
        return x.to(self.store_device, self.store_dtype)

    def _query_hook(self, name: str, heads: int):
        """A forward hook on a layer's `to_q`: keeps the cond rows' queries `[b, heads, h, w, head_dim]`."""

        def hook(module, args, out):
            if not self._recording or self._prompt_ids is None:
                return
            n = self._prompt_ids.shape[0]
            b, hw, inner = out.shape
            rows = slice(n, 2 * n) if b == 2 * n else slice(0, n)
            H, W = self._latent_hw
            f = math.isqrt((H * W) // hw)
            h, w = H // f, W // f
            q = out[rows].detach().reshape(-1, h, w, heads, inner // heads).permute(0, 3, 1, 2, 4)
            st = self._store.setdefault(name, {"probs": [], "logits": [], "uncond": [], "cosine": [], "queries": []})
            st["queries"].append(q.to(self.store_device, self.store_dtype))

        return hook

    # ---- context ----
    @contextlib.contextmanager
    def _active(self) -> Iterator["Tracer"]:
        handles = [self.unet.register_forward_pre_hook(self._unet_hook, with_kwargs=True)]
        if self.text_encoder is not None:
            handles.append(self.text_encoder.register_forward_pre_hook(self._text_hook, with_kwargs=True))
        try:
            with capture_cross_attention(self.unet, self._sink, self.want_logits, self.sel_layers,
                                         processor_factory=self.processor_factory,
                                         want_cosine=self.want_cosine) as layers:
                self._layers = layers
                if self.want_queries:
                    mods = dict(self.unet.named_modules())
                    for l in layers:
                        handles.append(mods[l.name].to_q.register_forward_hook(self._query_hook(l.name, l.heads)))
                yield self
        finally:
            for hd in handles:
                hd.remove()
        self._finish()

    def _finish(self) -> None:
        if self._prompt_ids is None or not self._store:
            self.traces = []
            return
        ids = self._prompt_ids
        real = self._real(ids)
        neg_real = self._real(self._neg_ids) if self._neg_ids is not None else None
        infos = []
        for l in self._layers:
            if l.name in self._store:
                h, w = self._store[l.name]["hw"]
                heads = len(self.sel_heads) if self.sel_heads is not None else l.heads
                infos.append(LayerInfo(l.name, l.alias, heads, h, w))
        self.traces = []
        for i in range(ids.shape[0]):
            keep = real[i] if self.sel_tokens is None else [real[i][j] for j in self.sel_tokens if j < len(real[i])]
            toks = [_clean(t) for t in self.tokenizer.convert_ids_to_tokens(ids[i, keep].tolist())]
            probs, logits, unc, cos, qs = {}, {}, {}, {}, {}
            for info in infos:
                st = self._store[info.name]
                if st["queries"]:  # [steps, heads, h, w, head_dim]
                    qq = torch.stack([s[i] for s in st["queries"]])
                    qs[info.alias] = qq if self.sel_heads is None else qq[:, self.sel_heads]
                probs[info.alias] = torch.stack([s[i][..., keep] for s in st["probs"]])
                if st["logits"]:
                    logits[info.alias] = torch.stack([s[i][..., keep] for s in st["logits"]])
                if st["cosine"]:  # [steps, heads, h, w, tokens], real tokens of prompt i
                    cos[info.alias] = torch.stack([s[i][..., keep] for s in st["cosine"]])
                if st["uncond"] and neg_real is not None:
                    nk = neg_real[i] if i < len(neg_real) else neg_real[0]
                    unc[info.alias] = torch.stack([s[i][..., nk] for s in st["uncond"]])
            unc_toks = []
            if unc and self._neg_ids is not None:
                nrow = self._neg_ids[min(i, self._neg_ids.shape[0] - 1)]
                unc_toks = [_clean(t) for t in self.tokenizer.convert_ids_to_tokens(
                    nrow[neg_real[min(i, len(neg_real) - 1)]].tolist())]
            n_real = real_token_count(ids[i].tolist(), self.tokenizer.eos_token_id)
            named = toks if not self.padded else [t for j, t in zip(keep, toks) if j < n_real]  # no padding names
            prompt = " ".join(t for t in named if t not in (self.tokenizer.bos_token, self.tokenizer.eos_token))
            kept_real = sum(1 for j in keep if j < n_real)
            self.traces.append(AttentionTrace(prompt, toks, keep, list(self._timesteps), infos, self.sel_heads,
                                              probs, logits, unc, unc_toks, cos, kept_real, qs))
        self._store.clear()

    @property
    def trace(self) -> AttentionTrace:
        """The trace of the first prompt."""
        if not self.traces:
            raise RuntimeError("nothing was traced (no UNet call inside the context?)")
        return self.traces[0]


@contextlib.contextmanager
def trace(pipe, prompts: Sequence[str] | str | None = None, **selection) -> Iterator[Tracer]:
    """Trace cross-attention of a pipeline's UNet; see `Tracer` for the selection options.

    Args:
        pipe: a diffusers Stable-Diffusion-family pipeline (unet, tokenizer, text_encoder).
        prompts: the prompts of the UNet batch; default: read from the text encoder's first call.
        **selection: layers (aliases or module paths), steps (UNet call indices), heads, tokens
            (indices into the real tokens), logits (bool), uncond (bool), cosine (bool: also keep the
            cosine maps of projected query / key features, `AttentionTrace.cosine`), device, dtype,
            padded (bool: keep all max_length key columns), grad (bool: keep the maps' autograd graph),
            processor_factory (the capture processor, e.g. `ProbeSet.factory`), queries (bool: also keep
            each layer's projected queries, `AttentionTrace.queries`).
    Yields:
        the Tracer; after the block, `tracer.traces` / `tracer.trace`.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tr = Tracer(pipe.unet, pipe.tokenizer, getattr(pipe, "text_encoder", None), prompts=prompts, **selection)
    with tr._active():
        yield tr
