"""What the app's Generate & look tab shows: a traced generation and every view of its stored trace, as plain data.

One generation runs the model once (`traced_generation`); every other view here re-slices what it stored (the
attention trace, the projected queries and the per-step x0 previews) without another UNet call:
`slice_overlays` (one layer / head / step), `step_frame` (the timestep player), `model_view` (layers x heads
thumbnails) and `any_word_map` (a word that was not in the prompt, from the stored queries; it runs the text
encoder and the layers' key projections, no UNet). `edited_generation` is the one other model run: the same
settings under an attention edit (`models.interventions`).

Example:
    >>> gen = traced_generation(load_pipeline(), "a red circle left of a blue square", seed=0)
    >>> gen.image, gen.words, gen.word_maps.shape      # PIL, list[str], [words, 64, 64]
    >>> preview, heat = step_frame(gen, word=2, step=10)
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections import OrderedDict
from typing import Any, Callable, Sequence

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from interp.heatmaps import merge_subwords, overlay, token_heatmaps
from models.interventions import AttentionEdit, intervene, word_columns
from models.loading import ModelDefaults
from models.trace import AttentionTrace, trace

__all__ = ["TracedGeneration", "SCHEDULERS", "traced_generation", "edited_generation", "slice_choices",
           "slice_overlays", "word_choices", "step_frame", "model_view", "any_word_map", "TraceCache",
           "validate_prompt", "word_groups", "parse_box"]

ALL = "all"
DEFAULT_SCHEDULER = "model default"
# name -> diffusers scheduler class name (built from the model's own scheduler config)
SCHEDULERS = {DEFAULT_SCHEDULER: None, "DDIM": "DDIMScheduler", "Euler": "EulerDiscreteScheduler",
              "Euler ancestral": "EulerAncestralDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler",
              "PNDM": "PNDMScheduler"}
QUERY_BYTES_MAX = 256 * 2**20  # keep the projected queries (for any-word maps) only when they fit this


@dataclasses.dataclass
class TracedGeneration:
    """One traced generation and the settings it was made with.

    Attributes:
        image: the generated image.
        trace: every cross-attention layer, head and step (`models.trace.AttentionTrace`; with queries when
            they fit `QUERY_BYTES_MAX`).
        words: the prompt's whitespace words                                                     [words]
        groups: per word, its token columns in the trace (BOS = 0), from the tokenizer word by word [words]
        word_maps: per word, all layers, heads and steps averaged, at the image size  [words, H, W]
        previews: per denoising step, the model's x0 prediction decoded (what the image would be) [steps]
        settings: prompt, negative_prompt, seed, steps, guidance, scheduler (what reproduces the image).
    """

    image: Image.Image
    trace: AttentionTrace
    words: list[str]
    word_maps: torch.Tensor
    groups: list[list[int]] = dataclasses.field(default_factory=list)
    previews: list[Image.Image] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)

    def overlays(self) -> list[tuple[Image.Image, str]]:
        """(overlay image, word) pairs for a gallery."""
        return [(overlay(self.image, m), w) for w, m in zip(self.words, self.word_maps)]

    def nbytes(self) -> int:
        """Bytes held: the trace, the maps and the previews."""
        px = sum(p.width * p.height * 3 for p in self.previews) + self.image.width * self.image.height * 3
        return self.trace.nbytes() + self.word_maps.numel() * 4 + px


def validate_prompt(prompt: str | None, tokenizer) -> str:
    """A clean prompt, or ValueError with a message for the user."""
    if prompt is None or not prompt.strip():
        raise ValueError("the prompt is empty")
    p = " ".join(prompt.strip().split())
    n = len(tokenizer(p).input_ids)
    if n > tokenizer.model_max_length:
        raise ValueError(f"the prompt is too long for this model ({n} tokens > {tokenizer.model_max_length})")
    return p


def word_groups(tokenizer, prompt: str, n_tokens: int | None = None) -> tuple[list[str], list[list[int]]]:
    """The prompt's words and, per word, its token positions (BOS = 0), tokenized word by word.

    A hub model's BPE splits a word into several tokens ("photograph" -> "photo", "graph"): their maps are summed
    under the word as typed. Words cut off by the text encoder's length (or beyond `n_tokens`) are dropped.
    """
    words, groups = [], []
    for i, w in enumerate(prompt.split()):
        cols = word_columns(tokenizer, prompt, i)
        if n_tokens is not None:
            cols = [c for c in cols if c < n_tokens - 1]
        if cols:
            words.append(w)
            groups.append(cols)
    return words, groups


def _group_maps(maps: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token maps `[tokens, H, W]` summed per word group -> `[words, H, W]`."""
    return torch.stack([maps[list(g)].sum(0) for g in groups])


# ----------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def use_scheduler(pipe, name: str | None):
    """The pipeline with another scheduler (built from its own scheduler config) inside the block."""
    if name in (None, "", DEFAULT_SCHEDULER):
        yield pipe.scheduler
        return
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")

    old = pipe.scheduler
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(old.config)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = old


@contextlib.contextmanager
def _record_x0(scheduler, out: list[torch.Tensor]):
    """Keep the x0 prediction of every scheduler step (the scheduler's own, or from epsilon and alpha-bar)."""
    orig = scheduler.step

    def step(model_output, timestep, sample, *args, **kwargs):
        res = orig(model_output, timestep, sample, *args, **kwargs)
        x0 = None if isinstance(res, tuple) else getattr(res, "pred_original_sample", None)
        if x0 is None and hasattr(scheduler, "alphas_cumprod"):
            ab = scheduler.alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
            x0 = (sample - (1 - ab).sqrt() * model_output) / ab.sqrt()
        if x0 is not None:
            out.append(torch.nan_to_num(x0[:1].detach().float().cpu()).clamp(-50, 50))
        return res

    scheduler.step = step  # an instance attribute shadows the method; deleting it restores the method
    try:
        yield
    finally:
        del scheduler.step


@torch.inference_mode()
def _decode(pipe, latents: list[torch.Tensor], chunk: int = 8) -> list[Image.Image]:
    vae = pipe.vae
    out: list[Image.Image] = []
    for i in range(0, len(latents), chunk):
        lat = torch.cat(latents[i:i + chunk]).to(vae.device, vae.dtype) / vae.config.scaling_factor
        img = vae.decode(lat).sample
        out += pipe.image_processor.postprocess(img, output_type="pil")
    return out


def _query_bytes(pipe, steps: int, size: int | None) -> int:
    """Bytes the projected queries of one traced generation would take (fp16)."""
    side = (size or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
    total = 0
    for name, m in pipe.unet.named_modules():
        if name.endswith("attn2"):
            total += m.to_q.out_features
    # a rough bound: every layer at the latent's full resolution
    return 2 * steps * side * side * total


@torch.inference_mode()
def traced_generation(pipe, prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                      negative_prompt: str | None = None, scheduler: str | None = None,
                      edits: Sequence[AttentionEdit] = (), previews: bool = True,
                      progress: Callable[[int, int], None] | None = None) -> TracedGeneration:
    """Generate one image with every cross-attention layer, head and step traced.

    Args:
        pipe: a Stable-Diffusion-family pipeline.
        prompt, seed, steps, guidance: as the CLI's generate (None: the model's defaults).
        negative_prompt: the unconditional branch's text (None: empty).
        scheduler: a name of `SCHEDULERS` (None: the model's own).
        edits: attention edits active during the run (`models.interventions`), recorded in the trace.
        previews: decode each step's x0 prediction (the timestep player).
        progress: called with (step done, steps) after each denoising step.
    Returns:
        TracedGeneration (with the projected queries when they fit `QUERY_BYTES_MAX`).
    """
    d: ModelDefaults = getattr(pipe, "discolens_defaults", ModelDefaults())
    prompt = validate_prompt(prompt, pipe.tokenizer)
    steps = steps or d.steps
    guidance = d.guidance if guidance is None else guidance
    kw: dict[str, Any] = {"height": d.size, "width": d.size} if d.size else {}
    if negative_prompt and negative_prompt.strip():
        kw["negative_prompt"] = " ".join(negative_prompt.split())
    if progress is not None:
        def _cb(p, i, t, cbkw):
            progress(i + 1, steps)
            return cbkw
        kw["callback_on_step_end"] = _cb
    gen = torch.Generator("cpu").manual_seed(int(seed))
    x0: list[torch.Tensor] = []
    queries = _query_bytes(pipe, steps, d.size) <= QUERY_BYTES_MAX
    with use_scheduler(pipe, scheduler) as sch, _record_x0(sch, x0) if previews else contextlib.nullcontext():
        with trace(pipe, queries=queries) as tr:
            with intervene(pipe, list(edits)) if edits else contextlib.nullcontext():
                img = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen, **kw).images[0]
    t = tr.trace
    words, groups = word_groups(pipe.tokenizer, prompt, len(t.tokens))
    maps = _group_maps(token_heatmaps(t, size=img.height), groups)
    settings = {"prompt": prompt, "negative_prompt": kw.get("negative_prompt", ""), "seed": int(seed),
                "steps": int(steps), "guidance": float(guidance), "scheduler": scheduler or DEFAULT_SCHEDULER}
    return TracedGeneration(img, t, words, maps, groups, _decode(pipe, x0) if x0 else [], settings)


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """"x0 y0 x1 y1" in image fractions (0..1) -> a box; empty -> None (the whole image); else ValueError."""
    parts = (text or "").replace(",", " ").split()
    if not parts:
        return None
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"the box must be four numbers x0 y0 x1 y1 in 0..1, got {text!r}") from None
    if len(box) != 4 or not all(np.isfinite(box)) or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ValueError(f"the box must be four numbers x0 y0 x1 y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, "
                         f"got {text!r}")
    return box  # type: ignore[return-value]


def edited_generation(pipe, gen: TracedGeneration, word: int, scale: float,
                      box: tuple[float, float, float, float] | None = None, **kw) -> TracedGeneration:
    """The same generation (prompt, seed, steps, guidance, scheduler) with one word's cross-attention scaled.

    Args:
        gen: the generation to redo.
        word: index of the word in `gen.words`.
        scale: factor on that word's attention probabilities (0 suppresses, > 1 amplifies).
        box: only at image positions inside `(x0, y0, x1, y1)` (fractions), or None everywhere.
    """
    if not 0 <= int(word) < len(gen.words):
        raise ValueError(f"pick one of the prompt's {len(gen.words)} words")
    s = gen.settings
    edit = AttentionEdit(tokens=tuple(gen.groups[int(word)]), scale=float(scale), box=box)
    return traced_generation(pipe, s["prompt"], s["seed"], s["steps"], s["guidance"], s["negative_prompt"] or None,
                             s["scheduler"], edits=[edit], **kw)


# ----------------------------------------------------------------------------------------------
# Re-slicing the stored trace (no model)
# ----------------------------------------------------------------------------------------------
def slice_choices(tr: AttentionTrace) -> dict[str, list[str]]:
    """Dropdown choices for a trace: layers (aliases), heads and steps (with their timesteps), each with 'all'."""
    heads = max(l.heads for l in tr.layers)
    return {"layers": [ALL, *tr.layer_names], "heads": [ALL, *[str(h) for h in range(heads)]],
            "steps": [ALL, *[f"{i} (t={int(t)})" for i, t in enumerate(tr.timesteps)]]}


def word_choices(gen: TracedGeneration) -> list[tuple[str, int]]:
    """(label, index) per word for a dropdown; repeated words are told apart by their position."""
    return [(f"{w} (word {i + 1})" if gen.words.count(w) > 1 else w, i) for i, w in enumerate(gen.words)]


def _groups_of(tr: AttentionTrace, groups: Sequence[Sequence[int]] | None, words: Sequence[str] | None):
    if groups:
        return list(words or []), [list(g) for g in groups]

    words = list(words) if words is not None else tr.prompt.split()
    return words, merge_subwords(tr.tokens, words)


def slice_overlays(image: Image.Image, tr: AttentionTrace | TracedGeneration, layer: str = ALL, head: str = ALL,
                   step: str = ALL) -> list[tuple[Image.Image, str]]:
    """Word-map overlays for one slice of the trace ('all' averages that axis)."""
    words = groups = None
    if isinstance(tr, TracedGeneration):
        words, groups, tr = tr.words, tr.groups, tr.trace
    layers = None if layer in (None, ALL) else [layer]
    heads = None if head in (None, ALL) else [int(head)]
    steps = None if step in (None, ALL) else [int(str(step).split()[0])]
    if heads is not None and layers is not None and heads[0] >= tr.layer(layer).heads:
        raise ValueError(f"layer {layer} has {tr.layer(layer).heads} heads")
    if steps is not None and not 0 <= steps[0] < tr.n_steps:
        raise ValueError(f"step must be in 0..{tr.n_steps - 1}")
    words, groups = _groups_of(tr, groups, words)
    maps = _group_maps(token_heatmaps(tr, layers=layers, heads=heads, steps=steps, size=image.height), groups)
    return [(overlay(image, m), w) for w, m in zip(words, maps)]


def _check_word_step(gen: TracedGeneration, word: int, step: int) -> tuple[int, int]:
    w, s = int(word), int(step)
    if not 0 <= w < len(gen.words):
        raise ValueError(f"pick one of the prompt's {len(gen.words)} words")
    if not 0 <= s < gen.trace.n_steps:
        raise ValueError(f"step must be in 0..{gen.trace.n_steps - 1}")
    return w, s


def step_frame(gen: TracedGeneration, word: int, step: int) -> tuple[Image.Image | None, Image.Image, str]:
    """The timestep player's frame: (the step's x0 preview, the word's map at that step over it, caption)."""
    w, s = _check_word_step(gen, word, step)
    m = token_heatmaps(gen.trace, steps=[s], size=gen.image.height)[gen.groups[w]].sum(0)
    base = gen.previews[s] if s < len(gen.previews) else gen.image
    t = int(gen.trace.timesteps[s])
    return base, overlay(base, m), f"step {s + 1} of {gen.trace.n_steps} (t={t}): where '{gen.words[w]}' attends"


def model_view(gen: TracedGeneration, word: int, step: int | None = None,
               thumb: int = 96) -> list[tuple[Image.Image, str]]:
    """Layers x heads thumbnails of one word's map (at one step, or all steps averaged when None), row-major:
    one row per layer (UNet order), one column per head. Each thumbnail is normalised on its own."""
    w = int(word)
    if step is not None:
        w, step = _check_word_step(gen, word, step)
    elif not 0 <= w < len(gen.words):
        raise ValueError(f"pick one of the prompt's {len(gen.words)} words")
    tr = gen.trace
    cols = gen.groups[w]
    base = gen.image.convert("RGB").resize((thumb, thumb), Image.BILINEAR)
    n_heads = max(l.heads for l in tr.layers)
    out = []
    for l in tr.layers:
        x = tr.probs[l.alias][..., cols].float().sum(-1)  # [steps, heads, h, w]
        x = x[step] if step is not None else x.mean(0)  # [heads, h, w]
        up = F.interpolate(x[None], size=(thumb, thumb), mode="bilinear", align_corners=False)[0]
        for h in range(n_heads):
            out.append((overlay(base, up[h]) if h < l.heads else Image.new("RGB", (thumb, thumb), "white"),
                        f"{l.alias} h{h}"))
    return out


@torch.inference_mode()
def any_word_map(pipe, gen: TracedGeneration, word: str) -> tuple[torch.Tensor, list[str]]:
    """Where the model would have put `word` had it been in the prompt, from the stored queries (no UNet call).

    Per layer, head and step, the stored queries q attend to the keys of the prompt's padded text plus the keys of
    `word` (encoded alone by the text encoder, projected by the layer's `to_k`); softmax over both, as the
    layer's own attention does, and the word's columns summed. Averaged over heads and steps, upsampled and
    averaged over layers, like the prompt's own word maps.

    Returns:
        (map `[H, W]` at the image size, the word's tokens).
    """
    tr = gen.trace
    if not tr.queries:
        raise ValueError("this generation kept no queries (the model is too large for them): generate again with a "
                         "smaller model, or fewer steps")
    tok = pipe.tokenizer
    word = " ".join((word or "").split())
    if not word:
        raise ValueError("type a word")
    wid = tok(word, add_special_tokens=False).input_ids
    if not wid:
        raise ValueError(f"the tokenizer gives no tokens for {word!r}")
    n_max = tok.model_max_length
    if len(wid) > n_max - 2:
        raise ValueError(f"{word!r} is too long for this model")
    enc = pipe.text_encoder
    dev = enc.device
    pid = tok(gen.settings["prompt"], padding="max_length", max_length=n_max, truncation=True,
              return_tensors="pt").input_ids
    hp = enc(pid.to(dev))[0][0]  # [77, d]
    wids = tok(word, padding="max_length", max_length=n_max, truncation=True, return_tensors="pt").input_ids
    hw = enc(wids.to(dev))[0][0, 1:1 + len(wid)]  # [n, d]
    modules = dict(pipe.unet.named_modules())
    size = gen.image.height
    total = None
    for l in tr.layers:
        attn = modules[l.name]
        k = attn.to_k(torch.cat([hp, hw]).to(attn.to_k.weight.dtype)).float().cpu()  # [77 + n, inner]
        heads = attn.heads
        k = k.reshape(k.shape[0], heads, -1).permute(1, 0, 2)  # [heads, keys, head_dim]
        if tr.heads is not None:
            k = k[list(tr.heads)]
        q = tr.queries[l.alias].float()  # [steps, heads, h, w, head_dim]
        p = (torch.einsum("shxyd,hkd->shxyk", q, k) * attn.scale).softmax(-1)[..., hp.shape[0]:].sum(-1)
        m = p.mean((0, 1))[None, None]  # [1, 1, h, w]
        up = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        total = up if total is None else total + up
    return total / len(tr.layers), [t.replace("</w>", "") for t in tok.convert_ids_to_tokens(wid)]


# ----------------------------------------------------------------------------------------------
# A byte-bounded LRU of results (the app keeps traces server-side; sessions hold keys)
# ----------------------------------------------------------------------------------------------
class TraceCache:
    """Least-recently-used store of results bounded in bytes (`size_of(value)`: default `value.nbytes()`, else
    1 MiB); the newest result always stays. Thread-safe.

    >>> cache = TraceCache(max_bytes=512 * 2**20)
    >>> key = cache.put(gen); cache.get(key) is gen
    """

    def __init__(self, max_bytes: int, size_of: Callable[[Any], int] | None = None) -> None:
        self.max_bytes = int(max_bytes)
        self.size_of = size_of or (lambda v: int(v.nbytes()) if hasattr(v, "nbytes") else 2**20)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0

    def put(self, value: Any) -> str:
        n = self.size_of(value)
        key = uuid.uuid4().hex
        with self._lock:
            self._items[key] = (value, n)
            self.bytes += n
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, (_, m) = self._items.popitem(last=False)
                self.bytes -= m
        return key

    def get(self, key: str | None) -> Any:
        with self._lock:
            if not key or key not in self._items:
                raise ValueError("generate an image first (results are kept for a while, then dropped)")
            self._items.move_to_end(key)
            return self._items[key][0]

    def __len__(self) -> int:
        return len(self._items)
