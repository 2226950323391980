"""Training the D-DiT-style text denoiser (`models.adapters.text_denoiser`): image -> caption / answer by masked
text diffusion, resumable, seeded, with a progress bar; CPU or GPU.

Two modes:
  frozen — the bundled UNet is frozen; its block outputs at the discriminative timestep are computed ONCE for
           every training scene (`build_feature_cache`, stored under `work_dir`), and only the small transformer
           trains on them (cheap: no UNet call per step).
  dual   — D-DiT's joint objective: the UNet trains too, total = L_image + text_weight * L_text (text_weight 0.2,
           D-DiT's), L_image its v-prediction loss on the same scenes' captions, L_text the masked-diffusion loss
           with the features read (with their graph) at the discriminative timestep. The UNet is exported beside
           the adapter (`out_dir/unet`), never over the bundled generator.

The loss (continuous-time absorbing-state diffusion, MDLM / D-DiT): t ~ U(0, 1] per row, each generated text
position masked with probability t, cross-entropy on the masked positions weighted by 1/t
(`masked_diffusion_loss`). A row is a caption (every position generated, padded with PAD) or a question of the
templates (`scene_questions`), kept unmasked, followed by its answer (the generated suffix).

Scenes: training `world.sample_dataset(cfg.seed, cfg.n_scenes, exclude_compositional=True)` (seed 7 by default);
validation scenes `sample_dataset(VAL_SEED)`, test `sample_dataset(TEST_SEED)` (docs/text_diffusion.md).

Example:
    >>> cfg = TextDiffusionConfig(steps=2000, max_minutes=20)
    >>> train_text_diffusion(cfg)        # -> assets/adapters/shapes-v1-ddit (config.json, vocab.json, weights)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from models.adapters.text_denoiser import (
    EXTRA_TIMESTEP,
    IMG_POS,
    WORD_MAPS,
    ExtraTimestep,
    TextDenoiser,
    TextDenoiserConfig,
    TextVocab,
    load_text_denoiser,
    masked_diffusion_loss,
    override_time_embedding,
    save_text_denoiser,
)
from models.loading import load_pipeline
from models.shapes import world
from models.training.bundled import images_to_tensor, noise_scheduler_kwargs
from models.training.common import (
    LR_SCHEDULES,
    LossLog,
    StopOnSignal,
    atomic_save,
    check_choice,
    config_field,
    scheduled_lr,
)
from models.training.dpt import block_shapes
from models.unet_pass import noised_unet_pass

__all__ = ["TextDiffusionConfig", "VAL_SEED", "TEST_SEED", "DEFAULT_OUT", "LR_SCHEDULES", "NUMBER_WORDS", "QUESTION_TASKS",
           "learning_rate",
           "scene_questions", "size_group", "encode_examples", "encode_latents", "unet_text_features",
           "unet_word_maps", "image_reading",
           "build_feature_cache", "train_text_diffusion", "load_or_none"]

VAL_SEED = 60_001  # validation scenes: every choice (length, steps, order, timestep) is made on these
TEST_SEED = 60_002  # test scenes: read once, at the end
DEFAULT_OUT = "assets/adapters/shapes-v1-ddit"
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
QUESTION_TASKS = ("count", "color", "shape", "where")
_CACHE_CHUNK = 1024


@dataclasses.dataclass
class TextDiffusionConfig:
    """Everything a text-diffusion training run reads; each field is a `cli.py train-text-diffusion` flag
    (`common.add_config_flags(parser, TextDiffusionConfig)`, `config_from_flags(ns, TextDiffusionConfig)`)."""

    out_dir: str = config_field(DEFAULT_OUT, "folder the adapter is exported to (config.json, vocab.json, safetensors)")
    work_dir: str = config_field(os.path.expanduser("~/.cache/discolens/text_diffusion"),
                         "folder of the run's state: feature caches, checkpoint, loss log")
    model: str | None = config_field(None, "the diffusion model whose UNet is read (default: the bundled shapes-v1)")
    mode: str = config_field("frozen", "frozen (UNet frozen, cached features) or dual (UNet trained too, L_image + "
                     "text_weight * L_text)", check=lambda v: check_choice(v, ("frozen", "dual")))
    timestep: int = config_field(0, "discriminative timestep the UNet is read at: 0..999, or 1000 = DiffDis's extra "
                         "timestep (learned embedding, clean latent)", ge=0, le=EXTRA_TIMESTEP)
    seed: int = config_field(7, "seed of the training scenes and the initialisation", ge=0)
    n_scenes: int = config_field(10_000, "training scenes (features cached once per timestep in frozen mode)", ge=1)
    n_val: int = config_field(256, "validation scenes for the validation loss", ge=1)
    steps: int = config_field(4000, "total optimiser steps; a run stops earlier when interrupted and resumes later", ge=0)
    batch: int = config_field(64, "rows per step (captions and questions)", ge=1)
    caption_share: float = config_field(0.5, "share of caption rows in a batch (the rest: questions)", ge=0, le=1)
    relation_boost: float = config_field(0.0, "frozen mode: share of the caption rows drawn from relation scenes "
                                         "only (the rest from all scenes, ~45 % relation); 0 = all from all scenes", ge=0, le=1)
    question_tasks: tuple[str, ...] = config_field(QUESTION_TASKS, "the question templates trained on (a subset of "
                                           + ", ".join(QUESTION_TASKS) + "; e.g. where alone, to diagnose it)",
                                           check=lambda v: _check_tasks(v))
    lr: float = config_field(7e-4, "peak learning rate of the text denoiser", gt=0)
    warmup: int = config_field(100, "linear warm-up steps", ge=1)
    lr_schedule: str = config_field("constant", "after the warm-up: constant, or cosine (decays to 0 at --steps; a "
                                    "resumed run with another --steps follows the new curve)",
                                    check=lambda v: check_choice(v, LR_SCHEDULES))
    max_len: int = config_field(12, "text positions L (a new run only)", ge=9)
    hidden: int = config_field(128, "transformer width (a new run only)", ge=8)
    layers: int = config_field(4, "transformer layers (a new run only)", ge=1)
    heads: int = config_field(4, "attention heads (a new run only)", ge=1)
    img_pos: str = config_field("learned", "position code of the image tokens: learned, or sincos (fixed 2-D "
                        "sine-cosine + learned; a new run only)", check=lambda v: check_choice(v, IMG_POS))
    word_maps: tuple[str, ...] = config_field((), "prompts whose words' cross-attention maps are added to the image "
                                      "tokens (one traced UNet row per prompt and image; a new run only), e.g. "
                                      "'red green blue yellow purple orange' 'circle square triangle'",
                                      check=lambda v: _check_prompts(v))
    word_marks: bool = config_field(False, "with --word-maps: one more image channel, the mean map of the words the "
                                    "row's text names (unmasked), so the question marks its object (a new run only)")
    mark_phrases: int = config_field(1, "with --word-marks: mark channels; 1 = one mark of every named word, 2 = one "
                                     "per noun phrase in text order, so a relation caption's two objects are marked "
                                     "apart (a new run only)", ge=1)
    mark_positions: bool = config_field(False, "with --word-marks: one mark channel per text position (the map of "
                                        "the map word there) instead of per phrase; no rule decides which words "
                                        "form a phrase (a new run only)")
    init_from: str | None = config_field(None, "warm start of a new run: a trained adapter folder; its tensors whose "
                                         "shapes match are loaded, the others start fresh (step 0)")
    feature_norm: bool = config_field(False, "LayerNorm over each UNet block's channels before the projection (a new "
                              "run only)")
    text_weight: float = config_field(0.2, "dual mode: weight of L_text beside L_image (D-DiT: 0.2)", ge=0)
    unet_lr: float = config_field(2e-5, "dual mode: learning rate of the UNet", gt=0)
    dual_batch: int = config_field(32, "dual mode: scenes per step", ge=1)
    grad_clip: float = config_field(1.0, "gradient norm clip", gt=0)
    feature_batch: int = config_field(64, "scenes per UNet call while caching features", ge=1)
    val_every: int = config_field(100, "steps between validation-loss readings", ge=1)
    checkpoint_every: int = config_field(100, "steps between checkpoints", ge=1)
    export_every: int = config_field(500, "steps between exports of the adapter", ge=1)
    max_minutes: float | None = config_field(None, "stop (checkpoint + export) after this wall time", gt=0)
    threads: int | None = config_field(None, "CPU threads (default: torch's)", ge=1)
    device: str | None = config_field(None, "cpu, cuda, ... (default: CUDA when available)")


def _check_tasks(v):
    v = tuple(v)
    if not v or any(t not in QUESTION_TASKS for t in v):
        raise ValueError(f"expected one or more of {', '.join(QUESTION_TASKS)}, got {' '.join(map(str, v))}")
    return v


def _check_prompts(v):
    v = tuple(str(p) for p in v)
    if any(not p.split() for p in v):
        raise ValueError("expected non-empty prompts")
    return v


# ------------------------------------------------------------------------------------------------
# Questions and examples
# ------------------------------------------------------------------------------------------------
def scene_questions(scene: world.Scene) -> list[tuple[str, str, str]]:
    """Every unambiguous question of the templates about a scene, with its answer: `[(task, question, answer)]`.

    count: "how many {shape}s ?" -> one / two / three, for each shape present; color: "what color is the {shape}
    ?" for each shape whose objects share one color; shape: "what shape is the {color} object ?" for each color
    whose objects share one shape; where (relation scenes): "where is the {color} {shape} ?" -> the asked
    object's relation to the other one (left of / right of / above / below).

    Example:
        >>> scene_questions(scene)[0]    # ("count", "how many circles ?", "one")
    """
    objs = scene.objects
    out: list[tuple[str, str, str]] = []
    shapes = sorted({o.shape for o in objs}, key=world.SHAPES.index)
    colors = sorted({o.color for o in objs}, key=list(world.COLORS).index)
    for s in shapes:
        n = sum(o.shape == s for o in objs)
        out.append(("count", f"how many {s}s ?", NUMBER_WORDS[n]))
    for s in shapes:
        cs = {o.color for o in objs if o.shape == s}
        if len(cs) == 1:
            out.append(("color", f"what color is the {s} ?", next(iter(cs))))
    for c in colors:
        ss = {o.shape for o in objs if o.color == c}
        if len(ss) == 1:
            out.append(("shape", f"what shape is the {c} object ?", next(iter(ss))))
    if scene.kind == "relation":
        a, b = objs
        for o, rel in ((a, scene.relation), (b, world.OPPOSITE[scene.relation])):
            out.append(("where", f"where is the {o.color} {o.shape} ?", rel))
    return out


def size_group(scene: world.Scene) -> str:
    """'small' or 'big' when every object has that size, else 'mixed'."""
    sizes = {o.size for o in scene.objects}
    return next(iter(sizes)) if len(sizes) == 1 else "mixed"


def encode_examples(vocab: TextVocab, prefix: str, target: str, max_len: int) -> tuple[list[int], list[int]]:
    """(ids `[max_len]`, generated `[max_len]` 0/1): the prefix's words, the target's words, then PAD; the
    generated positions are the target's and the padding. ValueError if it does not fit."""
    p = vocab.encode(prefix) if prefix else []
    a = vocab.encode(target)
    if len(p) + len(a) > max_len:
        raise ValueError(f"{prefix!r} + {target!r} needs {len(p) + len(a)} positions > max_len {max_len}")
    ids = p + a + [vocab.pad_id] * (max_len - len(p) - len(a))
    return ids, [0] * len(p) + [1] * (max_len - len(p))


def _scene_tables(scenes: Sequence[world.Scene], vocab: TextVocab, max_len: int,
                  tasks: Sequence[str] = QUESTION_TASKS) -> dict[str, torch.Tensor]:
    """Caption rows (one per scene) and question rows (those of `tasks`, all of each scene) as tensors."""
    cap_ids, q_ids, q_gen, q_scene = [], [], [], []
    for i, s in enumerate(scenes):
        cap_ids.append(encode_examples(vocab, "", s.caption, max_len)[0])
        for task, q, a in scene_questions(s):
            if task not in tasks:
                continue
            ids, gen = encode_examples(vocab, q, a, max_len)
            q_ids.append(ids)
            q_gen.append(gen)
            q_scene.append(i)
    return {"cap_ids": torch.tensor(cap_ids), "q_ids": torch.tensor(q_ids), "q_gen": torch.tensor(q_gen),
            "q_scene": torch.tensor(q_scene),
            "relation_scenes": torch.tensor([i for i, s in enumerate(scenes) if s.kind == "relation"], dtype=torch.long)}


# ------------------------------------------------------------------------------------------------
# Image features through the one UNet pass
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_latents(pipe, images: np.ndarray) -> torch.Tensor:
    """Scaled VAE posterior means of uint8 RGB images `[B, 64, 64, 3]` at the native size: `[B, C, h, w]`
    (what `models.unet_pass.encode_image` gives one image at a time)."""
    vae = pipe.vae
    x = images_to_tensor(images).to(vae.device, vae.dtype)
    return (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).float().to(pipe.unet.device)


def _read_pass(pipe, latents: torch.Tensor, prompts: Sequence[str], timestep: int, noise_seed: int,
               extra: ExtraTimestep | None, grad: bool, **kw):
    """`noised_unet_pass` on clean latents `[B, C, h, w]` (row b with `prompts[b]`) at a discriminative timestep:
    0..999 noised with the seeded noise shared by the rows; 1000 (DiffDis) the clean latent with the time embedding
    replaced by `extra` (`ExtraTimestep.from_unet(unet)` when None: the sinusoid of t = 1000, untrained)."""
    if int(timestep) < EXTRA_TIMESTEP:
        return noised_unet_pass(pipe, latents, list(prompts), [int(timestep)], noise_seed=noise_seed, grad=grad, **kw)
    extra = extra if extra is not None else ExtraTimestep.from_unet(pipe.unet)
    abar0 = pipe.scheduler.alphas_cumprod[0].to(latents.device, torch.float32)
    zero = torch.zeros(1, *latents.shape[1:], device=latents.device)
    with override_time_embedding(pipe.unet, extra):  # x_t = sqrt(abar_0) * (z / sqrt(abar_0)) = z exactly
        return noised_unet_pass(pipe, latents / abar0.sqrt(), list(prompts), [0], noise=zero, grad=grad, **kw)


def unet_text_features(pipe, latents: torch.Tensor, timestep: int, blocks: Sequence[str], prompt: str = "a",
                       noise_seed: int = 0, extra: ExtraTimestep | None = None, grad: bool = False
                       ) -> dict[str, torch.Tensor]:
    """The UNet's block outputs for clean latents `[B, C, h, w]` read at a discriminative timestep, through
    `models.unet_pass.noised_unet_pass` (one call, one row per latent, every row seeing `prompt`).

    timestep 0..999: the latent noised at that timestep (noise from `noise_seed`, shared by the rows).
    timestep 1000 (DiffDis): the clean latent itself, with the UNet's time embedding replaced by `extra`
    (`ExtraTimestep.from_unet(unet)` when None: the sinusoid of t = 1000, untrained).

    Returns:
        per block, `[B, C_b, h_b, w_b]` float32 (on the UNet's device with `grad`, else the CPU).
    """
    res = _read_pass(pipe, latents, [prompt] * latents.shape[0], timestep, noise_seed, extra, grad,
                     traced=False, features=list(blocks))
    return {b: res.features[b][:, 0] for b in blocks}


def unet_word_maps(pipe, latents: torch.Tensor, timestep: int, prompts: Sequence[str], grid: tuple[int, int],
                   noise_seed: int = 0, extra: ExtraTimestep | None = None, grad: bool = False) -> torch.Tensor:
    """Cross-attention maps of every word of `prompts` over each latent, read as `unet_text_features` reads the
    blocks (same timestep, noise and extra timestep; one traced row per image and prompt, one UNet call).

    Each word's map: attention probabilities averaged over heads, resized (bilinear) to `grid` per layer, averaged
    over layers, divided by its spatial mean (a map averages 1: where the word attends, not how much).

    Returns:
        `[B, K, gh, gw]` float32, K = the prompts' words in order (on the UNet's device with `grad`, else the CPU).
    Raises:
        ValueError: a word the tokenizer splits into several tokens.
    """
    B, P = latents.shape[0], len(prompts)
    res = _read_pass(pipe, latents.repeat_interleave(P, 0), list(prompts) * B, timestep, noise_seed, extra, grad,
                     traced=True, logits=False)
    rows = []
    for tr, prompt in zip(res.traces, list(prompts) * B):
        words = prompt.split()
        if tr.tokens[1: 1 + len(words)] != words:
            raise ValueError(f"word maps need one token per word; {prompt!r} is tokenized as {tr.tokens[1:-1]}")
        per_layer = []
        for p in tr.probs.values():  # [steps, heads, h, w, tokens]
            m = p[0].float().mean(0)[..., 1: 1 + len(words)].permute(2, 0, 1)  # [words, h, w]
            per_layer.append(F.interpolate(m[None], size=tuple(grid), mode="bilinear", align_corners=False)[0])
        rows.append(torch.stack(per_layer).mean(0))  # [words, gh, gw]
    maps = torch.stack([torch.cat(rows[b * P: (b + 1) * P]) for b in range(B)])  # [B, K, gh, gw]
    return maps / maps.mean((-2, -1), keepdim=True).clamp_min(1e-8)


def image_reading(pipe, latents: torch.Tensor, cfg: TextDenoiserConfig, noise_seed: int = 0,
                  extra: ExtraTimestep | None = None, grad: bool = False) -> dict[str, torch.Tensor]:
    """Everything the denoiser of `cfg` reads from latents `[B, C, h, w]`: per block its output `[B, C_b, h_b, w_b]`
    (`unet_text_features`), and with `cfg.word_maps` the word maps `[B, K, gh, gw]` (`unet_word_maps`, on the last
    block's token grid) under `WORD_MAPS`."""
    out = unet_text_features(pipe, latents, cfg.timestep, cfg.blocks, cfg.image_prompt, noise_seed=noise_seed,
                             extra=extra, grad=grad)
    if cfg.word_maps:
        out[WORD_MAPS] = unet_word_maps(pipe, latents, cfg.timestep, cfg.word_maps, cfg.token_grids[-1],
                                        noise_seed=noise_seed, extra=extra, grad=grad)
    return out


def _pool(f: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return f if tuple(f.shape[-2:]) == tuple(grid) else F.adaptive_avg_pool2d(f, grid)


@torch.no_grad()
def build_feature_cache(pipe, scenes: Sequence[world.Scene], cfg: TextDenoiserConfig, path: str | Path,
                        feature_batch: int = 64, noise_seed: int = 0, desc: str = "features",
                        extra: ExtraTimestep | None = None, part: str = "blocks") -> dict[str, torch.Tensor]:
    """Render, encode and read the UNet once for every scene; the reading (fp16) is saved to `path` (chunk files
    `path.partK` while running, so an interrupted build resumes) and returned. A cache of the same scenes and
    reading is reused.

    part: "blocks" — the pooled block outputs (`{block: [n, C_b, gh, gw]}`); "word_maps" — the word maps of
    `cfg.word_maps` (`{WORD_MAPS: [n, K, gh, gw]}`, `unet_word_maps`), read with the same noise as the blocks, so
    a run with word maps reuses the blocks' cache of a run without.
    """
    path = Path(path)
    key = {"n": len(scenes), "first": scenes[0].caption if scenes else "", "timestep": int(cfg.timestep),
           "blocks": list(cfg.blocks), "pool": list(cfg.pool), "prompt": cfg.image_prompt, "noise_seed": noise_seed}
    if part == WORD_MAPS:
        key |= {"word_maps": list(cfg.word_maps), "grid": list(cfg.token_grids[-1])}
    elif part != "blocks":
        raise ValueError(f"part must be 'blocks' or {WORD_MAPS!r}, got {part!r}")
    if path.exists():
        st = torch.load(path, weights_only=False)
        if st.get("key") == key:
            return st["features"]
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = cfg.token_grids
    parts = []
    for c0 in tqdm(range(0, len(scenes), _CACHE_CHUNK), desc=desc):
        chunk_file = path.with_name(path.name + f".part{c0 // _CACHE_CHUNK}")
        if chunk_file.exists():
            st = torch.load(chunk_file, weights_only=False)
            if st.get("key") == key:
                parts.append(st["features"])
                continue
        chunk = scenes[c0: c0 + _CACHE_CHUNK]
        got: dict[str, list[torch.Tensor]] = {}
        for b0 in range(0, len(chunk), feature_batch):
            imgs = np.stack([np.asarray(world.render(s)) for s in chunk[b0: b0 + feature_batch]])
            z = encode_latents(pipe, imgs)
            seed = noise_seed + c0 + b0
            if part == WORD_MAPS:
                read = {WORD_MAPS: unet_word_maps(pipe, z, cfg.timestep, cfg.word_maps, grids[-1], noise_seed=seed,
                                                  extra=extra)}
            else:
                feats = unet_text_features(pipe, z, cfg.timestep, cfg.blocks, cfg.image_prompt, noise_seed=seed,
                                           extra=extra)
                read = {b: _pool(feats[b], g) for b, g in zip(cfg.blocks, grids)}
            for k, v in read.items():
                got.setdefault(k, []).append(v.half().cpu())
        feats = {k: torch.cat(v) for k, v in got.items()}
        atomic_save({"key": key, "features": feats}, chunk_file)
        parts.append(feats)
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    atomic_save({"key": key, "features": out}, path)
    for k in range((len(scenes) + _CACHE_CHUNK - 1) // _CACHE_CHUNK):
        path.with_name(path.name + f".part{k}").unlink(missing_ok=True)
    return out


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def _mask_rows(ids: torch.Tensor, gen: torch.Tensor, t: torch.Tensor, mask_id: int, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask each generated position with probability t of its row: (noisy ids, masked bool)."""
    u = torch.rand(ids.shape, generator=g)
    masked = (u < t[:, None]) & gen.bool()
    return torch.where(masked, torch.full_like(ids, mask_id), ids), masked


def _batch_rows(tables: dict, n_rows: int, caption_share: float, g: torch.Generator, relation_boost: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scene index `[n]`, ids `[n, L]`, generated `[n, L]`): caption rows then question rows; a `relation_boost`
    share of the caption rows is drawn from the relation scenes only, the rest from all scenes."""
    n_cap = int(round(n_rows * caption_share)) if len(tables["q_ids"]) else n_rows
    n_scenes = len(tables["cap_ids"])
    rel = tables["relation_scenes"]
    n_rel = int(round(n_cap * relation_boost)) if len(rel) else 0
    si = torch.randint(0, n_scenes, (n_cap - n_rel,), generator=g)
    if n_rel:
        si = torch.cat([rel[torch.randint(0, len(rel), (n_rel,), generator=g)], si])
    qi = torch.randint(0, max(1, len(tables["q_ids"])), (n_rows - n_cap,), generator=g)
    scene = torch.cat([si, tables["q_scene"][qi]]) if n_rows > n_cap else si
    ids = torch.cat([tables["cap_ids"][si], tables["q_ids"][qi]]) if n_rows > n_cap else tables["cap_ids"][si]
    gen = torch.cat([torch.ones_like(tables["cap_ids"][si]), tables["q_gen"][qi]]) if n_rows > n_cap \
        else torch.ones_like(tables["cap_ids"][si])
    return scene, ids, gen


def text_loss_step(model: TextDenoiser, feats: dict[str, torch.Tensor], ids: torch.Tensor, gen: torch.Tensor,
                   mask_id: int, g: torch.Generator, t: torch.Tensor | None = None) -> torch.Tensor:
    """One masked-diffusion loss: t ~ U(0, 1] per row (stratified) unless given, mask, predict, weight 1/t."""
    B = ids.shape[0]
    if t is None:
        t = ((torch.arange(B) + torch.rand(B, generator=g)) / B)[torch.randperm(B, generator=g)].clamp(min=1e-3)
    noisy, masked = _mask_rows(ids, gen, t, mask_id, g)
    dev = next(model.parameters()).device
    out = model(feats, noisy.to(dev))
    return masked_diffusion_loss(out.logits, ids.to(dev), masked.to(dev), t.to(dev), gen.to(dev))


@torch.no_grad()
def validation_loss(model: TextDenoiser, feats: dict[str, torch.Tensor], tables: dict, mask_id: int,
                    n_draws: int = 4) -> dict[str, float]:
    """Mean masked-diffusion loss on the validation rows (captions and questions), fixed masking draws."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, ids, gen, scene in (("val_caption", tables["cap_ids"], torch.ones_like(tables["cap_ids"]),
                                   torch.arange(len(tables["cap_ids"]))),
                                  ("val_question", tables["q_ids"], tables["q_gen"], tables["q_scene"])):
        tot = 0.0
        for _ in range(n_draws):
            for b0 in range(0, len(ids), 256):
                sl = slice(b0, b0 + 256)
                f = {b: v[scene[sl]] for b, v in feats.items()}
                tot += float(text_loss_step(model, f, ids[sl], gen[sl], mask_id, g)) * len(ids[sl])
        out[name] = tot / (n_draws * len(ids))
    model.train()
    return out


def load_or_none(folder: str | Path):
    """`load_text_denoiser(folder)` or None when the folder holds none."""
    try:
        return load_text_denoiser(folder)
    except ValueError:
        return None


def _map_word_ids(cfg: TextDiffusionConfig, vocab: TextVocab) -> tuple[int, ...]:
    """The vocabulary id of each word-map word (-1 for a word the denoiser's vocabulary lacks); () without marks."""
    if not cfg.word_marks:
        return ()
    if not cfg.word_maps:
        raise ValueError("--word-marks needs --word-maps")
    return tuple(vocab.word_to_id.get(w, -1) for p in cfg.word_maps for w in p.split())


def _denoiser_config(cfg: TextDiffusionConfig, vocab: TextVocab, pipe) -> TextDenoiserConfig:
    blocks = ("mid_block", "up_blocks.1")
    shapes = block_shapes(pipe, blocks)
    pool = tuple(max(1, h // 8) for _, h, _ in shapes)  # at most 8x8 tokens a block
    return TextDenoiserConfig(vocab_size=vocab.size, max_len=cfg.max_len, blocks=blocks,
                              block_channels=tuple(c for c, _, _ in shapes),
                              block_sizes=tuple((h, w) for _, h, w in shapes), pool=pool, timestep=cfg.timestep,
                              hidden=cfg.hidden, layers=cfg.layers, heads=cfg.heads, mode=cfg.mode,
                              img_pos=cfg.img_pos, feature_norm=cfg.feature_norm, word_maps=cfg.word_maps,
                              word_marks=cfg.word_marks, map_word_ids=_map_word_ids(cfg, vocab),
                              mark_phrases=cfg.mark_phrases, mark_positions=cfg.mark_positions)


def learning_rate(cfg: TextDiffusionConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warm-up to `cfg.lr`, then constant or a cosine
    that reaches 0 at `cfg.steps` (`models.training.common.scheduled_lr`)."""
    return scheduled_lr(cfg.lr, step, cfg.warmup, cfg.steps, cfg.lr_schedule)


def warm_start(model: TextDenoiser, folder: str | Path) -> list[str]:
    """Load the tensors of the adapter in `folder` whose names and shapes match `model`'s; the mark layer
    (`mark_proj`) of another channel count seeds every one of the model's columns with the mean of its columns (the
    one-mark column for P phrase marks; the phrase columns for per-position marks). Return the names left fresh.
    ValueError when the folder holds no adapter or nothing matches."""
    prev = load_or_none(folder)
    if prev is None:
        raise ValueError(f"--init-from {folder}: no trained text denoiser there")
    src, own = prev[0].state_dict(), model.state_dict()
    shared = {}
    for k, v in src.items():
        if k not in own:
            continue
        if own[k].shape == v.shape:
            shared[k] = v
        elif k == "mark_proj.weight" and own[k].shape[:-1] == v.shape[:-1]:  # P mark channels -> P' channels
            shared[k] = v.mean(-1, keepdim=True).expand_as(own[k]).clone()
    if not shared:
        raise ValueError(f"--init-from {folder}: no tensor of that denoiser fits this one")
    model.load_state_dict(shared, strict=False)
    return sorted(k for k in own if k not in shared)


def train_text_diffusion(cfg: TextDiffusionConfig, pipe=None) -> Path:
    """Train (or resume) the text denoiser; returns the exported adapter folder.

    Resumes from `work_dir/<mode>_t<timestep>/ckpt.pt` (weights, optimiser, step, RNG-free: each step's batch is
    seeded by (seed, step)); else from the exported adapter in `out_dir` when its config matches (fresh optimiser);
    else starts anew. Stops at `steps`, after `max_minutes`, or on SIGINT / SIGTERM (checkpoint + export).

    Raises:
        ValueError: frozen mode with timestep 1000 asks for a learned embedding the cache cannot follow — the
            frozen mode reads 1000 with the untrained sinusoid of t = 1000 (say so), dual mode learns it.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if pipe is None:
        pipe = load_pipeline(cfg.model)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocab = TextVocab.from_tokenizer(pipe.tokenizer)
    dcfg = _denoiser_config(cfg, vocab, pipe)
    run = Path(cfg.work_dir) / f"{cfg.mode}_t{cfg.timestep}"
    run.mkdir(parents=True, exist_ok=True)
    log = LossLog(run / "loss_log.csv")
    t_start = time.time()

    torch.manual_seed(cfg.seed)
    model = TextDenoiser(dcfg)
    extra = ExtraTimestep.from_unet(pipe.unet) if cfg.timestep == EXTRA_TIMESTEP else None
    step = 0
    ck = run / "ckpt.pt"
    opt_state = unet_state = unet_opt_state = None
    if ck.exists():
        st = torch.load(ck, map_location="cpu", weights_only=False)
        try:
            model.load_state_dict(st["model"])
        except RuntimeError:
            raise ValueError(f"{ck} holds a run of another denoiser (its flags: {st.get('config', {})}); resume it "
                             "with its own flags or start this one in another --work-dir") from None
        if extra is not None and "extra" in st:
            extra.load_state_dict(st["extra"])
        opt_state, step = st["opt"], st["step"]
        unet_state, unet_opt_state = st.get("unet"), st.get("unet_opt")
    else:
        prev = load_or_none(cfg.out_dir)
        if prev is not None and dataclasses.replace(prev[0].config, trained_steps=0) == dcfg:
            model.load_state_dict(prev[0].state_dict())
            if extra is not None and prev[2] is not None:
                extra = prev[2]
            step = prev[0].config.trained_steps
            print(f"resuming from the exported adapter at step {step} with a fresh optimizer")
        elif cfg.init_from:
            fresh = warm_start(model, cfg.init_from)
            print(f"warm start from {cfg.init_from}; fresh: {', '.join(fresh) or 'none'}")
    model.to(device).train()
    params = list(model.parameters()) + ([extra.embedding] if extra is not None else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    if opt_state is not None:
        opt.load_state_dict(opt_state)

    scenes = world.sample_dataset(cfg.seed, cfg.n_scenes, exclude_compositional=True)
    val_scenes = world.sample_dataset(VAL_SEED, cfg.n_val, exclude_compositional=True)
    tables = _scene_tables(scenes, vocab, cfg.max_len, cfg.question_tasks)
    val_tables = _scene_tables(val_scenes, vocab, cfg.max_len, cfg.question_tasks)

    unet = pipe.unet
    unet_opt = None
    if cfg.mode == "frozen":
        tag = f"t{cfg.timestep}_{'-'.join(dcfg.blocks)}"
        feats = build_feature_cache(pipe, scenes, dcfg, Path(cfg.work_dir) / f"train_s{cfg.seed}_n{cfg.n_scenes}_{tag}.pt",
                                    cfg.feature_batch, noise_seed=cfg.seed * 1_000_003, desc="train features",
                                    extra=extra)
        val_feats = build_feature_cache(pipe, val_scenes, dcfg, Path(cfg.work_dir) / f"val_n{cfg.n_val}_{tag}.pt",
                                        cfg.feature_batch, noise_seed=0, desc="val features", extra=extra)
        if dcfg.word_maps:  # a cache of their own: the blocks' cache of a run without maps is reused
            mtag = f"{tag}_maps-{hashlib.sha1(json.dumps(dcfg.word_maps).encode()).hexdigest()[:8]}"
            feats |= build_feature_cache(pipe, scenes, dcfg, Path(cfg.work_dir) / f"train_s{cfg.seed}_n{cfg.n_scenes}_"
                                         f"{mtag}.pt", cfg.feature_batch, noise_seed=cfg.seed * 1_000_003,
                                         desc="train word maps", extra=extra, part=WORD_MAPS)
            val_feats |= build_feature_cache(pipe, val_scenes, dcfg, Path(cfg.work_dir) / f"val_n{cfg.n_val}_{mtag}.pt",
                                             cfg.feature_batch, noise_seed=0, desc="val word maps", extra=extra,
                                             part=WORD_MAPS)
        if extra is not None:
            extra.embedding.requires_grad_(False)  # the cache was read with it: it cannot change here
    else:
        unet.to(device).train().requires_grad_(True)
        if unet_state is not None:
            unet.load_state_dict(unet_state)
        unet_opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
        if unet_opt_state is not None:
            unet_opt.load_state_dict(unet_opt_state)
        noise_sched = DDPMScheduler(**noise_scheduler_kwargs())
        val_feats = None

    def save_ckpt():
        st = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
              "config": dataclasses.asdict(cfg)}
        if extra is not None:
            st["extra"] = extra.state_dict()
        if unet_opt is not None:
            st["unet"] = unet.state_dict()
            st["unet_opt"] = unet_opt.state_dict()
        atomic_save(st, ck)

    def export():
        model.config.trained_steps = step
        info = {"train_seed": cfg.seed, "n_scenes": cfg.n_scenes, "mode": cfg.mode, "val_seed": VAL_SEED,
                "model": cfg.model or "shapes-v1", "minutes_this_run": round((time.time() - t_start) / 60, 1)}
        if cfg.init_from:
            info["init_from"] = str(cfg.init_from)
        save_text_denoiser(cfg.out_dir, model, vocab, extra, info)
        if unet_opt is not None:
            unet.save_pretrained(Path(cfg.out_dir) / "unet", safe_serialization=True)
        src = run / "loss_log.csv"
        if src.exists():
            (Path(cfg.out_dir) / "training_log.csv").write_text(src.read_text())

    with StopOnSignal() as flag, tqdm(total=cfg.steps, initial=step, desc=f"text diffusion ({cfg.mode})") as bar:
        while step < cfg.steps:
            for group in opt.param_groups:
                group["lr"] = learning_rate(cfg, step)
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            if cfg.mode == "frozen":
                scene_idx, ids, gen = _batch_rows(tables, cfg.batch, cfg.caption_share, g, cfg.relation_boost)
                f = {b: v[scene_idx].to(device) for b, v in feats.items()}
                loss = text_loss_step(model, f, ids, gen, vocab.mask_id, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                values = {"loss": loss.item()}
            else:
                idx = torch.randint(0, len(scenes), (cfg.dual_batch,), generator=g)
                imgs = np.stack([np.asarray(world.render(scenes[i])) for i in idx.tolist()])
                z = encode_latents(pipe, imgs)
                caps = [scenes[i].caption for i in idx.tolist()]
                # L_image: v-prediction on the scenes' own captions (the bundled recipe's loss)
                noise = torch.randn(z.shape, generator=g).to(device)
                tt = torch.randint(0, 1000, (len(idx),), generator=g).to(device)
                ids_c = pipe.tokenizer(caps, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids.to(device)
                with torch.no_grad():
                    emb = pipe.text_encoder(ids_c)[0]
                pred = unet(noise_sched.add_noise(z, noise, tt), tt, encoder_hidden_states=emb).sample
                l_img = F.mse_loss(pred.float(), noise_sched.get_velocity(z, noise, tt).float())
                # L_text on the same scenes: features with their graph at the discriminative timestep
                f = image_reading(pipe, z, dcfg, noise_seed=cfg.seed * 1_000_003 + step, extra=extra, grad=True)
                rows = [tables["cap_ids"][i] for i in idx.tolist()]
                ids = torch.stack(rows)
                l_txt = text_loss_step(model, f, ids, torch.ones_like(ids), vocab.mask_id, g)
                loss = l_img + cfg.text_weight * l_txt
                opt.zero_grad(set_to_none=True)
                unet_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params + list(unet.parameters()), cfg.grad_clip)
                opt.step()
                unet_opt.step()
                values = {"loss": loss.item(), "l_image": l_img.item(), "l_text": l_txt.item()}
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
            if step % cfg.val_every == 0 and val_feats is not None:
                values |= validation_loss(model, val_feats, val_tables, vocab.mask_id)
            log(cfg.mode, step, values)
            timed_out = cfg.max_minutes is not None and (time.time() - t_start) / 60 > cfg.max_minutes
            if step % cfg.checkpoint_every == 0 or flag.stop or timed_out or step == cfg.steps:
                save_ckpt()
            if step % cfg.export_every == 0 or flag.stop or timed_out or step == cfg.steps:
                export()
            if flag.stop or timed_out:
                break
    if cfg.mode == "dual":
        unet.eval().requires_grad_(False)
    if step == 0 or not (Path(cfg.out_dir) / "config.json").exists():
        export()
    return Path(cfg.out_dir)
