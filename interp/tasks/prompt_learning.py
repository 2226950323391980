"""Few-shot attention prompt learning (Discffusion Eq. 5-6): train an `AttentionPrompt` (models.adapters) on the
margin triplet loss of the LSE matching score f (Eq. 4, `interp.lse`)

    L = mean over triplets of max(0, f(x_neg, y) - f(x_pos, y) + M)          (Eq. 6, image negatives)
                           or max(0, f(x, y_neg) - f(x, y_pos) + M)          (caption negatives)

(the paper writes a sum; the mean only rescales the learning rate and keeps it independent of the batch size).
M = 0.2 by default; the authors' code used M = 0.1 and LoRA processors, offered here as `variant="lora"` (peft).

    prompt, log = train_prompt(pipe, load_benchmark("winoground"), MatchOptions(), steps=50, lr=1e-3)
    save_prompt(prompt, "wino.prompt.safetensors")
    with apply_prompt(pipe, load_prompt("wino.prompt.safetensors")):
        score_image_captions(pipe, image, captions)        # any scoring / tracing / generation runs with it

The prompt itself (AttentionPrompt, apply_prompt, save_prompt, load_prompt) lives in
`models.adapters.attention_prompt`; its names are re-exported here.

Training (`train_prompt`): UNet, VAE and text encoder are frozen (requires_grad False for the run, the flags
restored afterwards); images are encoded once (VAE posterior mean, as `encode_image`); each step runs the one noised
pass (`models.unet_pass.noised_unet_pass`, `grad=True`) on the batch's unique (image, caption) rows, one latent per
row, at every `options.timesteps` timestep with one noise draw per timestep shared by all rows (by default the
scoring's own noise, `options.noise_seed`, so the trained objective is the test-time score), and computes f from
the pass's differentiable traced maps with the LSE scorer's pooling (`interp.scorers.head_weighted.trace_objective`:
same source, layers, pooling, lambda and token columns as `options` and `interp.lse.lse_score`).
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models.adapters.attention_prompt import (FORMAT_VERSION, VARIANTS, AttentionPrompt, PromptLayer, Variant,
                                              apply_prompt, check_compatible, load_prompt, save_prompt)
from models.attention_capture import cross_attention_layers, select_layer_names
from models.loading import frozen
from models.shapes.benchmarks import Benchmark, Item, load_benchmark
from models.unet_pass import encode_image, noised_unet_pass

from interp.lse import POOLINGS
from interp.scorers.base import MatchOptions
from interp.scorers.head_weighted import trace_objective

__all__ = ["VARIANTS", "NEGATIVES", "FORMAT_VERSION", "PromptLayer", "AttentionPrompt", "Triplet", "apply_prompt",
           "collect_triplets", "prompt_scores", "triplet_loss", "train_prompt", "save_prompt", "load_prompt"]

NEGATIVES = ("both", "image", "caption")


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
# Differentiable matching score (through the one noised pass)
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Rows:
    """Unique (image, caption) rows of a triplet set, and each triplet's positive / negative row."""

    latents: torch.Tensor  # [I, C, h, w] float32, the unique images' latents (UNet device)
    captions: list[str]  # [J] the unique captions (whitespace-normalised)
    rows: list[tuple[int, int]]  # (image index, caption index)
    pos: list[int]  # per triplet, its positive row
    neg: list[int]  # per triplet, its negative row


def _encode_pairs(pipe, pairs: Sequence[tuple[Any, str]]) -> _Rows:
    """Encode the unique images once (frozen VAE, no gradients); one row per pair."""
    img_index: dict[int, int] = {}
    images: list = []
    cap_index: dict[str, int] = {}
    rows = []
    for x, c in pairs:
        if id(x) not in img_index:
            img_index[id(x)] = len(images)
            images.append(x)
        rows.append((img_index[id(x)], cap_index.setdefault(" ".join(c.split()), len(cap_index))))
    latents = torch.cat([encode_image(pipe, x) for x in images])  # [I, C, h, w]
    return _Rows(latents, list(cap_index), rows, list(range(len(rows))), [])


def _prepare(pipe, triplets: Sequence[Triplet]) -> _Rows:
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
    data = _encode_pairs(pipe, pairs)
    data.pos, data.neg = pos, neg
    return data


def _score_layers(unet, layers) -> list[str]:
    """Module paths of the layers a score averages, for MatchOptions.layers (None, 'last_per_stage', a list)."""
    return select_layer_names(cross_attention_layers(unet), layers)


def _check_options(options) -> None:
    if options.scorer != "lse":
        raise ValueError(f"prompt learning trains the LSE score; options.scorer must be 'lse', got {options.scorer!r}")
    if options.source not in ("probs", "logits"):
        raise ValueError(f"unknown source {options.source!r}; use 'probs' or 'logits'")
    if options.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {options.pooling!r}; choose one of {POOLINGS}")
    if not options.timesteps:
        raise ValueError("options.timesteps is empty")


def _row_scores(pipe, data: _Rows, rows: Sequence[int], options, noise: torch.Tensor | None = None,
                grad: bool = False) -> torch.Tensor:
    """f (Eq. 4, as `lse_score` with `options`) of the given rows: one noised pass, one latent per row; with `grad`
    differentiable w.r.t. an applied prompt. `noise` `[S, C, h, w]`: default the seeded draw of `options.noise_seed`.
    Returns `[R]` float64."""
    names = _score_layers(pipe.unet, options.layers)
    lat = data.latents[[data.rows[r][0] for r in rows]]  # [R, C, h, w]
    caps = [data.captions[data.rows[r][1]] for r in rows]
    res = noised_unet_pass(pipe, lat, caps, list(options.timesteps), noise_seed=options.noise_seed, noise=noise,
                           grad=grad, logits=options.source == "logits", cosine=options.pooling == "cosine",
                           layers=names)
    traced = dataclasses.replace(options, layers=None)  # the pass traced exactly the selected layers
    return torch.stack([trace_objective(tr, traced).mean() for tr in res.traces])


def _hinge(f: torch.Tensor, pos: Sequence[int], neg: Sequence[int], margin: float) -> torch.Tensor:
    return torch.clamp(f[list(neg)] - f[list(pos)] + margin, min=0)


def prompt_scores(pipe, image, captions: Sequence[str], options=None, prompt: AttentionPrompt | None = None,
                  ) -> dict[str, float]:
    """f(image, caption) per caption as computed in training (one batch; with `prompt` applied if given).

    Equals `score_image_captions(pipe, image, captions, options).by_caption` under `apply_prompt` (a consistency
    check of the training score); the noise is `options.noise_seed`'s.
    """
    options = options or MatchOptions()
    _check_options(options)
    caps = [" ".join(str(c).split()) for c in captions]
    if not caps or not all(caps):
        raise ValueError("give at least one non-empty caption")
    data = _encode_pairs(pipe, [(image, c) for c in caps])
    with apply_prompt(pipe, prompt):
        f = _row_scores(pipe, data, data.pos, options)
    return {c: float(v) for c, v in zip(caps, f.cpu())}


def triplet_loss(pipe, data, options=None, margin: float = 0.2, prompt: AttentionPrompt | None = None,
                 negatives: str = "both", batch_size: int = 16) -> dict:
    """Mean triplet loss of a triplet set at the scoring's own noise (`options.noise_seed`), no gradients.

    Returns {"loss", "accuracy" (share of triplets with f_pos > f_neg), "violations" (hinge > 0), "n_triplets"}.
    """
    options = options or MatchOptions()
    _check_options(options)
    trips = collect_triplets(data, negatives)
    rows = _prepare(pipe, trips)
    f = torch.empty(len(rows.rows), dtype=torch.float64)
    with apply_prompt(pipe, prompt):
        for a in range(0, len(rows.rows), max(1, int(batch_size))):
            idx = list(range(a, min(a + batch_size, len(rows.rows))))
            f[idx] = _row_scores(pipe, rows, idx, options).cpu()
    h = _hinge(f, rows.pos, rows.neg, margin)
    return {"loss": float(h.mean()), "accuracy": float((f[rows.pos] > f[rows.neg]).double().mean()),
            "violations": int((h > 0).sum()), "n_triplets": len(trips)}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_prompt(pipe, benchmark_or_pairs, options=None, steps: int = 50, lr: float = 1e-3, margin: float = 0.2,
                 variant: Variant = "additive", seed: int = 0, *, negatives: str = "both", batch_size: int = 8,
                 rank: int = 4, alpha: float | None = None, resample_noise: bool = False,
                 prompt: AttentionPrompt | None = None,
                 callback: Callable[[dict], None] | None = None) -> tuple[AttentionPrompt, list[dict]]:
    """Few-shot attention prompt learning (Eq. 5-6) on a benchmark's train split or explicit triplets.

    Args:
        pipe: a Stable-Diffusion-family pipeline; its UNet, VAE and text encoder stay frozen (bit-identical).
        benchmark_or_pairs: anything `collect_triplets` takes (a Benchmark / name: its "train" split).
        options: interp.scorers.MatchOptions; the score f (source, layers, pooling, lam, tokens, timesteps,
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
    check_compatible(unet, prompt)
    prompt.to(dev, torch.float32)
    for p in prompt.parameters():
        p.requires_grad_(True)
    rng = random.Random(seed)
    order: list[int] = []
    log: list[dict] = []
    with frozen(pipe):
        data = _prepare(pipe, trips)
        S = len(options.timesteps)
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
                # None: the pass's seeded draw (options.noise_seed), [S, C, h, w] either way
                noise = torch.randn((S, *data.latents.shape[1:]), generator=g).to(dev) if resample_noise else None
                f = _row_scores(pipe, data, rows, options, noise, grad=True)
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
