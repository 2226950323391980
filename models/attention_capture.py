"""Cross-attention capture through diffusers' attention-processor API.

`CaptureProcessor` is diffusers' explicit `AttnProcessor` maths (it materialises the attention
probabilities) that hands each call's probabilities (and, on request, pre-softmax logits and the cosine
map of the projected features) to a sink.
`capture_cross_attention(unet, sink)` installs it on the cross-attention layers (`attn2`) only and
restores the original processors on exit, also after an exception.

Layer naming: a captured layer is named by its diffusers module path (the `attn_processors` key
without `.processor`), with a short alias (`down.1.attn.0`, `mid.attn.0`, `up.2.attn.1`, with a
`.t{k}` suffix where a block stacks several transformer blocks), in UNet execution order.

Sink protocol: `sink(name, probs, logits)`, three positional arguments; only when installed with
`want_cosine=True` is the sink called as `sink(name, probs, logits, cosine=C)`, so sinks that never ask
for cosine maps need not accept the keyword.

Probes (for gradients at the maps, e.g. captum's `LayerGradientXActivation(layer=probes)`): `ProbeProcessor` is
`CaptureProcessor` with the map routed through an identity module (`AttentionProbe`) that the rest of the attention
reads; `ProbeSet` holds one probe per layer, and `probed_attention(unet, source)` installs them (restored on exit).

Example:
    >>> got = []
    >>> with capture_cross_attention(unet, lambda name, probs, logits: got.append(probs)):
    ...     unet(latents, t, encoder_hidden_states=emb)
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Callable, Iterator, Literal, Protocol, Sequence

import torch
from diffusers.models.attention_processor import Attention

__all__ = ["AttentionProbe", "CaptureProcessor", "CrossAttnLayer", "ProbeProcessor", "ProbeSet", "cosine_map",
           "cross_attention_layers", "capture_cross_attention", "layer_alias", "probed_attention", "select_layer_names",
           "stage_order"]


class Sink(Protocol):
    """`sink(name, probs, logits)`; with `want_cosine=True` also the keyword `cosine` (see the module docstring)."""

    def __call__(self, name: str, probs: torch.Tensor, logits: torch.Tensor | None, **kw: torch.Tensor) -> None: ...


def cosine_map(query: torch.Tensor, key: torch.Tensor, heads: int) -> torch.Tensor:
    """Cosine similarity of projected queries and keys, per head, in float32.

    Args:
        query: `[batch*heads, queries, head_dim]` (after `attn.head_to_batch_dim(attn.to_q(x))`).
        key: `[batch*heads, keys, head_dim]` (after `attn.head_to_batch_dim(attn.to_k(text))`).
        heads: number of heads.
    Returns:
        C `[batch, heads, queries, keys]`, C[b, h, i, j] = cos(q_{b,h,i}, k_{b,h,j}) in [-1, 1] (float32; a
        zero vector gives 0).
    """
    q = torch.nn.functional.normalize(query.float(), dim=-1)
    k = torch.nn.functional.normalize(key.float(), dim=-1)
    c = torch.bmm(q, k.transpose(-1, -2)).clamp(-1.0, 1.0)  # [batch*heads, queries, keys]
    return c.view(c.shape[0] // heads, heads, *c.shape[1:])


@dataclasses.dataclass(frozen=True)
class CrossAttnLayer:
    """A cross-attention layer of a UNet: its module path, alias, heads and position in the UNet."""

    name: str  # diffusers module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    alias: str  # e.g. "down.1.attn.0"
    heads: int
    stage: str  # "down" | "mid" | "up"
    block: int


_PATH = re.compile(r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.?attentions\.(\d+)\.transformer_blocks\.(\d+)\.attn2$")


def layer_alias(name: str, n_transformer_blocks: int = 1) -> str:
    """Short alias of a cross-attention module path ('down_blocks.1.attentions.0...attn2' -> 'down.1.attn.0')."""
    m = _PATH.match(name)
    if not m:
        return name
    stage, block, att, tb = m.groups()
    stage = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[stage]
    alias = f"mid.attn.{att}" if stage == "mid" else f"{stage}.{block}.attn.{att}"
    return alias + (f".t{tb}" if n_transformer_blocks > 1 else "")


STAGES = ("down", "mid", "up")


def layer_stage(name: str, alias: str = "") -> str:
    """'down' | 'mid' | 'up' from a module path (or, failing that, an alias like 'mid.attn.0'); else 'other'."""
    if _PATH.match(name):
        return ("down", "mid", "up")[stage_order(name)[0]]
    head = alias.split(".", 1)[0]
    return head if head in STAGES else "other"


def stage_order(name: str) -> tuple[int, int, int, int]:
    """(stage, block, attention module, transformer block) of a cross-attention module path; stage 0 / 1 / 2 =
    down / mid / up (3: not a UNet path). Sorting by it gives execution order."""
    m = _PATH.match(name)
    if not m:
        return (3, 0, 0, 0)
    stage, block, att, tb = m.groups()
    return ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[stage], int(block or 0), int(att), int(tb))


def cross_attention_layers(unet: torch.nn.Module, only: Sequence[str] | None = None) -> list[CrossAttnLayer]:
    """The UNet's cross-attention layers, in execution order (down, mid, up); `only`: keep those named by module
    path or alias (ValueError for a name that is neither)."""
    mods = {n: m for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2")}
    names = sorted(mods, key=stage_order)
    multi = any(stage_order(n)[3] > 0 for n in names)
    out = []
    for n in names:
        o = stage_order(n)
        out.append(CrossAttnLayer(n, layer_alias(n, 2 if multi else 1), mods[n].heads,
                                  layer_stage(n), o[1]))
    if only is not None:
        wanted = set(only)
        unknown = wanted - {l.name for l in out} - {l.alias for l in out}
        if unknown:
            raise ValueError(f"unknown cross-attention layers: {sorted(unknown)}")
        out = [l for l in out if l.name in wanted or l.alias in wanted]
    return out


def select_layer_names(layers: Sequence, selection: Sequence[int | str] | str | None) -> list[str]:
    """Module paths for a layer selection: None or "all" (every layer), "last_per_stage", or indices / aliases /
    paths. ("all" exists for scorers whose None means their own default, e.g. the Discffusion authors' layers.)

    `layers`: objects with `.name`, `.alias` and `.stage` in UNet order (CrossAttnLayer, trace LayerInfo).
    """
    if selection is None or selection == "all":
        return [l.name for l in layers]
    if isinstance(selection, str):
        if selection != "last_per_stage":
            raise ValueError(f"unknown layer selection {selection!r}; use None, 'all', a list, or 'last_per_stage'")
        last = {l.stage: l.name for l in layers}  # UNet order: the last seen of a stage is its last layer
        missing = [s for s in STAGES if s not in last]
        if missing:
            raise ValueError(f"'last_per_stage' needs a layer in every stage; none in {missing} "
                             f"(layers: {[l.alias for l in layers]})")
        return [last[s] for s in STAGES]
    out = []
    for key in selection:
        if isinstance(key, int) and -len(layers) <= key < len(layers):
            out.append(layers[key].name)
            continue
        hit = [l.name for l in layers if key in (l.alias, l.name)]
        if not hit:
            raise ValueError(f"no cross-attention layer {key!r}; layers: {[l.alias for l in layers]}")
        out.append(hit[0])
    if not out:
        raise ValueError("empty layer selection")
    return out


class CaptureProcessor:
    """Explicit attention (diffusers' `AttnProcessor` maths) that reports probabilities to a sink.

    The sink receives `probs` of shape `[batch, heads, queries, keys]` (queries = h*w of the layer,
    keys = text tokens incl. padding) and, when `want_logits`, the pre-softmax scores of the same shape.
    When `want_cosine`, it also gets the keyword `cosine`: C[b, h, i, j] = cos(q_{b,h,i}, k_{b,h,j}) of the
    projected query (`attn.to_q` of the image tokens) and key (`attn.to_k` of the text tokens) of head h,
    float32, same `[batch, heads, queries, keys]` layout (`cosine_map`). It is computed beside the
    attention and changes nothing the layer outputs.
    """

    def __init__(self, name: str, sink: Sink, want_logits: bool = False, want_cosine: bool = False) -> None:
        self.name = name
        self.sink = sink
        self.want_logits = want_logits
        self.want_cosine = want_cosine

    def maps(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[batch, heads, queries, keys]` -> (logits, probabilities) as the layer will use them.

        Subclasses may route either through a module (e.g. an identity probe for captum).
        """
        return logits, logits.softmax(dim=-1).to(dtype)

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        # get_attention_scores, split so that the logits are visible
        dtype = query.dtype
        q, k = (query.float(), key.float()) if attn.upcast_attention else (query, key)
        scores = torch.bmm(q, k.transpose(-1, -2)) * attn.scale  # [batch*heads, queries, keys]
        if attention_mask is not None:
            scores = scores + attention_mask
        if attn.upcast_softmax:
            scores = scores.float()
        b = scores.shape[0] // attn.heads
        logits4, probs4 = self.maps(scores.view(b, attn.heads, *scores.shape[1:]), dtype)
        if self.want_cosine:
            cos4 = cosine_map(query, key, attn.heads)  # [batch, heads, queries, keys], float32
            self.sink(self.name, probs4, logits4 if self.want_logits else None, cosine=cos4)
        else:
            self.sink(self.name, probs4, logits4 if self.want_logits else None)
        probs = probs4.reshape(b * attn.heads, *probs4.shape[2:])

        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextlib.contextmanager
def capture_cross_attention(unet: torch.nn.Module, sink: Sink, want_logits: bool = False,
                            layers: list[str] | None = None,
                            processor_factory: Callable[..., object] = CaptureProcessor,
                            want_cosine: bool = False) -> Iterator[list[CrossAttnLayer]]:
    """Install capture processors on the cross-attention layers (all, or those named), restore on exit.

    Args:
        unet: the UNet.
        sink: called per layer call (see the module docstring for its arguments).
        want_logits: also hand the pre-softmax logits to the sink.
        layers: module paths or aliases to capture (None: all cross-attention layers).
        processor_factory: `factory(name, sink, want_logits)` -> processor; with `want_cosine` it is called
            with the keyword `want_cosine=True` too (CaptureProcessor and its subclasses accept it).
        want_cosine: also hand the cosine map of projected query / key features (keyword `cosine`).
    Yields:
        the list of captured layers. Self-attention layers keep their processors.
    """
    all_layers = cross_attention_layers(unet, layers)
    modules = dict(unet.named_modules())
    originals = {l.name: modules[l.name].processor for l in all_layers}
    try:
        for l in all_layers:
            proc = (processor_factory(l.name, sink, want_logits, want_cosine=True) if want_cosine
                    else processor_factory(l.name, sink, want_logits))
            modules[l.name].set_processor(proc)
        yield all_layers
    finally:
        for name, proc in originals.items():
            modules[name].set_processor(proc)


# ----------------------------------------------------------------------------------------------
# Probes: identity modules on the attention maps (gradients at the maps, e.g. with captum)
# ----------------------------------------------------------------------------------------------
class AttentionProbe(torch.nn.Identity):
    """Identity through which one layer's attention map `[batch, heads, queries, keys]` passes (captum's layer)."""

    def __init__(self, name: str = "") -> None:
        super().__init__()
        self.name = name

    def extra_repr(self) -> str:
        return repr(self.name)


class ProbeProcessor(CaptureProcessor):
    """`CaptureProcessor` maths with the attention map routed through an `AttentionProbe`.

    `probe_logits=True`: the pre-softmax scores pass the probe and the softmax reads its output;
    otherwise the probabilities pass it and the value product reads its output. Either way the rest of
    the UNet sees the probe's output, so a gradient at the probe is the total derivative. The sink gets
    the probe's output (with its graph): `probs`, and `logits` when `want_logits`. `probe`: the module to
    use (e.g. a `ProbeSet`'s, so that captum can hook it before the processor exists); default a new one.
    """

    def __init__(self, name: str, sink: Sink, want_logits: bool = False, probe_logits: bool = True,
                 want_cosine: bool = False, probe: AttentionProbe | None = None) -> None:
        super().__init__(name, sink, want_logits, want_cosine)
        self.probe = probe if probe is not None else AttentionProbe(name)
        self.probe_logits = probe_logits

    def maps(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """CaptureProcessor's maths with the logits (or the probabilities) passing the probe."""
        if self.probe_logits:
            logits = self.probe(logits)
        probs = logits.softmax(dim=-1).to(dtype)
        if not self.probe_logits:
            probs = self.probe(probs)
        return logits, probs


@dataclasses.dataclass
class ProbeSet:
    """One `AttentionProbe` per cross-attention layer of a UNet, and the maps that left them.

    Attributes:
        layers: the cross-attention layers, UNet order                                  [layers]
        probes: their AttentionProbe modules, same order (captum's `layer=` list)       [layers]
        maps: per layer module path, the map of the latest UNet call as it left the probe (with its
            graph), `[batch, heads, queries, keys]`; "logits" or "probs" as `source` (filled by
            `probed_attention`; a trace installing the probes keeps the maps itself)
        source: "logits" | "probs": which map passes the probe
    """

    layers: list[CrossAttnLayer]
    probes: list[AttentionProbe]
    maps: dict[str, torch.Tensor]
    source: str

    @classmethod
    def for_unet(cls, unet: torch.nn.Module, source: Literal["probs", "logits"] = "logits",
                 layers: Sequence[str] | None = None) -> "ProbeSet":
        """Probes for the UNet's cross-attention layers (all, or those named by path or alias); none installed."""
        if source not in ("probs", "logits"):
            raise ValueError(f"unknown source {source!r}; use 'probs' or 'logits'")
        lays = cross_attention_layers(unet, layers)
        return cls(lays, [AttentionProbe(l.name) for l in lays], {}, source)

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.layers]

    @property
    def aliases(self) -> list[str]:
        return [l.alias for l in self.layers]

    def factory(self, name: str, sink: Sink, want_logits: bool = False, want_cosine: bool = False) -> ProbeProcessor:
        """`capture_cross_attention`'s `processor_factory`: a ProbeProcessor using this set's probe of `name`."""
        probe = self.probes[self.names.index(name)]
        return ProbeProcessor(name, sink, want_logits, probe_logits=self.source == "logits",
                              want_cosine=want_cosine, probe=probe)


@contextlib.contextmanager
def probed_attention(unet: torch.nn.Module, source: Literal["probs", "logits"] = "logits",
                     layers: Sequence[str] | None = None) -> Iterator[ProbeSet]:
    """Install `ProbeProcessor`s on the cross-attention layers (all, or those named); restore on exit,
    also after an exception (via `capture_cross_attention`). `ProbeSet.maps` holds each layer's latest map.

    Example:
        >>> with probed_attention(unet, "logits") as ps:
        ...     unet(x, t, encoder_hidden_states=emb)
        >>> ps.maps[ps.names[0]].shape      # [batch, heads, queries, keys]
    """
    ps = ProbeSet.for_unet(unet, source, layers)

    def sink(name, probs, logits):
        ps.maps[name] = logits if source == "logits" else probs

    with capture_cross_attention(unet, sink, want_logits=source == "logits", layers=ps.names,
                                 processor_factory=ps.factory):
        yield ps
