"""DPT training and its model-side inference helpers: features of the UNet through the project's one pass
(`models.unet_pass.noised_unet_pass`, `features=`), the adapter's ITM / REC readings, stage 1 (UNet frozen,
adapter trained) and stage 2 (plus a rank-4 LoRA on the cross-attention, with the usual denoising loss).

    pipe = load_pipeline()
    train_dpt(pipe, DPTTrainConfig(steps=1500), work_dir="~/.cache/discolens/dpt/run1")   # resumable
    adapter = load_adapter("assets/adapters/shapes-v1-dpt")
    s = itm_scores(pipe, adapter, encode_image(pipe, image), ["a red circle", "a blue square"])   # [K]

Data (seeded streams; DPT training seed 50_000, validation 50_001, test 50_002): per sample, one world scene
(`world.sample_scene`, mix single .25 / relation .45 / count .30) with its caption, a hard negative caption
(`world.negatives`, a random key), a random caption (another scene), a render of the hard negative's caption
and a random image; and one referring expression (`models.shapes.referring`) on its own scene. Each sample is
6 UNet rows: (I, T) (I, T_neg) (I, T_rand) (I_neg, T) (I_rand, T) for ITM and (I_ref, expression) for REC.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from models.adapters.dpt import (
    CONFIG_FILE,
    LORA_FILE,
    DPTAdapter,
    DPTConfig,
    add_lora,
    box_cxcywh_to_xyxy,
    box_iou,
    itm_contrastive_loss,
    itm_score,
    has_lora,
    load_adapter,
    load_lora,
    lora_state_dict,
    rec_loss,
    rec_regression_loss,
    remove_lora,
    save_adapter,
)
from models.loading import frozen, pipe_with_unet
from models.shapes import referring, world
from models.training.common import LR_SCHEDULES, atomic_save, check_choice, config_field, scheduled_lr
from models.unet_pass import native_size, noised_unet_pass

__all__ = ["ADAPTERS_DIR", "DPT_SEEDS", "DPTTrainConfig", "text_embeddings", "encode_images",
           "dpt_features", "features_at", "block_shapes", "new_adapter", "positive_tokens", "itm_scores",
           "itm_scores_clean", "itm_pass", "fuse_denoise", "itm_scores_at", "itm_contrast_at",
           "contrast_log_prob", "ground_boxes", "make_batch", "train_dpt", "evaluate_rec", "rec_accuracy",
           "evaluate_itm_pairs", "itm_pair_readings", "pair_accuracy", "export_adapter", "adapter_dir_for",
           "tuned_dir_for", "find_adapter", "tuned_pipe", "find_tuned", "find_reader"]

DPT_SEEDS = {"train": 50_000, "validation": 50_001, "test": 50_002}


def _check_keys(v) -> tuple[str, ...]:
    for k in v:
        check_choice(k, world.NEGATIVE_TYPES)
    return tuple(v)


# --- text and images ------------------------------------------------------------------------------------
@torch.no_grad()
def text_embeddings(pipe, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's own text encoder on `texts`, padded to `model_max_length`.

    Returns:
        pooled: the pooled output (CLIP: the EOS token's final state), float32 on the UNet's device  [K, D]
        tokens: the last hidden states                                                           [K, L, D]
        valid: real tokens (BOS, words, EOS; not padding)                                          [K, L] bool
    """
    tok = pipe.tokenizer
    enc = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt")
    out = pipe.text_encoder(enc.input_ids.to(pipe.text_encoder.device))
    dev = pipe.unet.device
    pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0][:, -1]
    return pooled.float().to(dev), out[0].float().to(dev), enc.attention_mask.bool().to(dev)


@torch.no_grad()
def encode_images(pipe, images: Sequence) -> torch.Tensor:
    """PIL images -> scaled latents `[B, C, h, w]` (posterior means, as `models.unet_pass.encode_image`, batched)."""
    h, w = native_size(pipe)
    arr = np.stack([np.asarray(im.convert("RGB").resize((w, h), Image.BICUBIC), np.float32) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    return z.float().to(pipe.unet.device)


# --- features through the one pass ---------------------------------------------------------------------
def dpt_features(pipe, latents: torch.Tensor, captions: Sequence[str], t: int, blocks: Sequence[str],
                 noise: torch.Tensor | None = None, noise_seed: int = 0, grad: bool = False
                 ) -> list[torch.Tensor]:
    """Block outputs of the UNet on noised latents, one row per caption, through `noised_unet_pass`.

    Args:
        latents: clean latents, `[1, C, h, w]` shared or `[K, C, h, w]` one per caption.
        captions: K captions; t: the training timestep; blocks: UNet block names ("up_blocks.1").
        noise: explicit noise `[C, h, w]` or `[1, C, h, w]` (shared by the rows), else drawn from `noise_seed`.
        grad: keep the graph (for LoRA training or gradients w.r.t. the latent).
    Returns:
        one tensor per block `[K, C_b, h_b, w_b]` float32 on the UNet's device.
    """
    return _features_and_errors(pipe, latents, captions, t, blocks, noise, noise_seed, grad)[0]


def _features_and_errors(pipe, latents, captions, t, blocks, noise=None, noise_seed=0, grad=False
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`dpt_features` and each row's denoising error of the same UNet call (`PassResult.errors`, `[K]` float32
    on the CPU, detached)."""
    nz = None if noise is None else noise.reshape(1, *noise.shape[-3:])
    res = noised_unet_pass(pipe, latents, list(captions), [int(t)], noise_seed=noise_seed, traced=False,
                           features=list(blocks), noise=nz, grad=grad)
    dev = pipe.unet.device
    return [res.features[b][:, 0].to(dev) for b in blocks], res.errors[:, 0]


def features_at(pipe, z_t: torch.Tensor, captions: Sequence[str], t: int, blocks: Sequence[str],
                grad: bool = True) -> list[torch.Tensor]:
    """Block outputs for an already-noised latent z_t `[1, C, h, w]` (a sampler's state) through the one pass.

    The pass noises a clean latent: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps. Feeding x0 = sqrt(abar) z_t and
    eps = sqrt(1 - abar) z_t gives x_t = z_t exactly for every abar (also abar = 0), and keeps the graph to z_t.
    """
    abar = pipe.scheduler.alphas_cumprod[int(t)].to(z_t.device, torch.float32)
    x0 = abar.sqrt() * z_t
    eps = (1 - abar).sqrt() * z_t
    res = noised_unet_pass(pipe, x0, list(captions), [int(t)], traced=False, features=list(blocks),
                           noise=eps.reshape(1, *z_t.shape[-3:]), grad=grad)
    return [res.features[b][:, 0] for b in blocks]


@torch.no_grad()
def block_shapes(pipe, blocks: Sequence[str]) -> list[tuple[int, int, int]]:
    """(C, h, w) of each block's output at the model's native size (one UNet call on a zero latent)."""
    c = pipe.unet.config.in_channels
    s = pipe.unet.config.sample_size
    h, w = (s, s) if isinstance(s, int) else tuple(s)
    caption = "a" if "a" in pipe.tokenizer.get_vocab() or "a</w>" in pipe.tokenizer.get_vocab() else "x"
    feats = dpt_features(pipe, torch.zeros(1, c, h, w), [caption], 0, blocks)
    return [tuple(f.shape[1:]) for f in feats]


def new_adapter(pipe, blocks: Sequence[str] = ("up_blocks.1",), **kw) -> DPTAdapter:
    """A fresh adapter sized for `pipe` (block channels, fusion size = the first block's, text width)."""
    shapes = block_shapes(pipe, blocks)
    pooled, _, _ = text_embeddings(pipe, ["a"])
    cfg = DPTConfig(blocks=tuple(blocks), block_channels=tuple(s[0] for s in shapes),
                    feature_size=tuple(shapes[0][1:]), text_dim=int(pooled.shape[-1]),
                    model=str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "")), **kw)
    return DPTAdapter(cfg).to(pipe.unet.device)


# --- inference ------------------------------------------------------------------------------------------
def itm_scores(pipe, adapter: DPTAdapter, latent: torch.Tensor, captions: Sequence[str], t: int | None = None,
               noise_seed: int = 0) -> torch.Tensor:
    """s(z, y) of each caption for one clean latent `[1, C, h, w]`: one UNet call (K rows) at the adapter's t.
    Returns float32 `[K]` on the CPU."""
    with torch.no_grad():
        return itm_scores_clean(pipe, adapter, latent, captions, t, noise_seed).float().cpu()


def itm_scores_clean(pipe, adapter: DPTAdapter, latent: torch.Tensor, captions: Sequence[str], t: int | None = None,
                     noise_seed: int = 0) -> torch.Tensor:
    """`itm_scores` keeping the graph when grad is enabled (w.r.t. the clean latent `[1, C, h, w]`, noised at the
    adapter's t with the noise of `noise_seed`): `[K]` on the UNet's device."""
    return itm_pass(pipe, adapter, latent, captions, t, noise_seed)[0]


def itm_pass(pipe, adapter: DPTAdapter, latent: torch.Tensor, captions: Sequence[str], t: int | None = None,
             noise_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One UNet call (K rows) at the adapter's t: the adapter's s(z, y) `[K]` (graph kept when grad is enabled, on
    the UNet's device) and each caption's denoising error of that same call (the model's prediction space, as the
    `denoise` scorer reads it) `[K]` float32 on the CPU."""
    t = adapter.config.t if t is None else t
    feats, errors = _features_and_errors(pipe, latent, captions, t, adapter.config.blocks, noise_seed=noise_seed,
                                         grad=torch.is_grad_enabled())
    out = adapter(feats, torch.full((len(captions),), t, device=feats[0].device))
    pooled, _, _ = text_embeddings(pipe, captions)
    return itm_score(out.match, pooled), errors


def fuse_denoise(scores: torch.Tensor, errors: torch.Tensor, weight: float) -> torch.Tensor:
    """The adapter's scores `[K]` minus `weight` x each caption's denoising error relative to the K captions' mean
    error (the same call's errors `[K]`; relative, so one weight serves images of any contrast): `[K]` float32 on
    the CPU. A caption's fused score depends on the other candidates, as a softmax's does; the ranking is what
    it is for."""
    e = errors.float().cpu()
    return scores.detach().float().cpu() - float(weight) * e / e.mean().clamp_min(1e-12)


def itm_scores_at(pipe, adapter: DPTAdapter, z_t: torch.Tensor, caption: str | Sequence[str], t: int
                  ) -> torch.Tensor:
    """s(z_t, y) for a sampler's noised latent `[1, C, h, w]` at timestep t, differentiable w.r.t. z_t: `[K]` for K
    captions (one UNet call, K rows; a single caption: `[1]`)."""
    captions = [caption] if isinstance(caption, str) else list(caption)
    feats = features_at(pipe, z_t, captions, t, adapter.config.blocks, grad=torch.is_grad_enabled())
    out = adapter(feats, torch.full((len(captions),), int(t), device=feats[0].device))
    pooled, _, _ = text_embeddings(pipe, captions)
    return itm_score(out.match, pooled)


def itm_contrast_at(pipe, adapter: DPTAdapter, z_t: torch.Tensor, caption: str, negatives: Sequence[str], t: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y | z_t) among y and its negatives: the log-softmax of the adapter's scaled scores (its learned
    temperature, as in its contrastive training), differentiable w.r.t. z_t; one UNet call with 1 + len(negatives)
    rows. Returns (log p `[]`, s(z_t, y) `[]`)."""
    s = itm_scores_at(pipe, adapter, z_t, [caption, *negatives], t)
    return contrast_log_prob(adapter, s), s[0]


def contrast_log_prob(adapter: DPTAdapter, scores: torch.Tensor) -> torch.Tensor:
    """log p(y | z) of the first of K captions' scores `[K]` among all K: the log-softmax at the adapter's learned
    temperature (its contrastive training's). Returns `[]`."""
    return torch.log_softmax(scores * adapter.logit_scale.exp(), 0)[0]


@torch.no_grad()
def ground_boxes(pipe, adapter: DPTAdapter, latents: torch.Tensor, texts: Sequence[str], t: int | None = None,
                 noise_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable grounding query's box of each (latent, text) row.

    Args: latents `[1 or K, C, h, w]`; texts: K texts as the text encoder sees them.
    Returns: (boxes (x0, y0, x1, y1) in [0, 1] `[K, 4]`, probabilities `[K]`), float32 on the CPU.
    """
    t = adapter.config.t if t is None else t
    feats = dpt_features(pipe, latents, texts, t, adapter.config.blocks, noise_seed=noise_seed)
    _, tokens, valid = text_embeddings(pipe, texts)
    out = adapter(feats, torch.full((len(texts),), t, device=feats[0].device), tokens, valid)
    boxes, p = out.best()
    return box_cxcywh_to_xyxy(boxes).clamp(0, 1).float().cpu(), p.float().cpu()


# --- training -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DPTTrainConfig:
    """Options of `train_dpt` (defaults: what the shipped adapter used; see docs/dpt.md).

    Attributes:
        blocks / width / heads / ff / n_queries / n_match / sem_dim: the adapter (`DPTConfig`).
        t: the timestep the scorer reads (stored in the adapter's config).
        t_focus_p: share of batches whose t is drawn from t +- t_focus_width; the others from U[t_min, t_max]
            (self-correction reads the adapter at every sampling step's t).
        batch: samples per step (6 UNet rows each).
        steps: optimisation steps in all (a resumed run continues to this).
        lr / warmup / weight_decay / clip: AdamW.
        rec_weights: (lambda0, lambda1, lambda2, lambda3) of the REC loss; itm_weight: of the ITM losses.
        lora_rank: 0 = stage 1 (UNet frozen); > 0 = stage 2: a LoRA of this rank on the cross-attention is
            trained too, with the usual denoising loss (weight `denoise_weight`) on the (I, T) rows.
        seed: data / noise / init seed (the DPT training seed 50_000).
        neg_focus / neg_focus_p: with probability `neg_focus_p` a sample's hard negative is drawn from the
            `world.negatives` keys in `neg_focus` its scene has (others: a uniformly random key, as by default).
        lr_schedule: after the warm-up, "constant" or "cosine" (to 0 at `steps`).
        checkpoint_every / snapshot_every: resumable state / an adapter snapshot (for choosing on validation).
    """

    blocks: tuple[str, ...] = ("up_blocks.1",)
    width: int = 128
    heads: int = 4
    ff: int = 256
    n_queries: int = 16
    n_match: int = 4
    sem_dim: int = 32
    t: int = 250
    t_focus_p: float = 0.5
    t_focus_width: int = 150
    t_min: int = 20
    t_max: int = 980
    batch: int = 16
    steps: int = 1500
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 1e-2
    clip: float = 1.0
    rec_weights: tuple[float, float, float, float] = (1.0, 5.0, 2.0, 1.0)
    itm_weight: float = 1.0
    lora_rank: int = 0
    lora_lr: float = 1e-4
    denoise_weight: float = 1.0
    seed: int = DPT_SEEDS["train"]
    neg_focus: tuple[str, ...] = config_field((), "world.negatives keys a share --neg-focus-p of the hard negatives "
                                              "is drawn from (e.g. subject_color object_color subject_shape "
                                              "object_shape); empty: every key alike", check=_check_keys)
    neg_focus_p: float = config_field(0.0, "share of the samples whose hard negative comes from --neg-focus", ge=0,
                                      le=1)
    lr_schedule: str = config_field("constant", "after the warm-up: constant, or cosine (decays to 0 at --steps)",
                                    check=lambda v: check_choice(v, LR_SCHEDULES))
    checkpoint_every: int = 50
    snapshot_every: int = 250


def _batch_t(cfg: DPTTrainConfig, rng: np.random.Generator) -> int:
    if rng.random() < cfg.t_focus_p:
        return int(np.clip(rng.integers(cfg.t - cfg.t_focus_width, cfg.t + cfg.t_focus_width + 1), 0, 999))
    return int(rng.integers(cfg.t_min, cfg.t_max + 1))


def make_batch(rng: np.random.Generator, n: int, neg_focus: Sequence[str] = (), neg_focus_p: float = 0.0) -> dict:
    """`n` training samples (see the module docstring): images (PIL) and texts in row order, REC targets. With
    `neg_focus_p` > 0, that share of the samples takes its hard negative from the `neg_focus` keys its scene has
    (with the defaults the stream of draws is the one of earlier runs).

    Returns: {"images": [6n], "texts": [6n] (model texts), "captions": [n], "neg": [n], "rand": [n],
              "ref": [n] ReferringExpression, "boxes": [n, 4] (cx, cy, w, h) in [0, 1]}.
    """
    kinds = ("single", "relation", "count")
    p = np.array([0.25, 0.45, 0.30])
    scenes = [world.sample_scene(rng, kinds[rng.choice(3, p=p)]) for _ in range(2 * n)]
    imgs, texts, caps, negs, rands, refs = [], [], [], [], [], []
    for i in range(n):
        s, other = scenes[i], scenes[n + i]
        neg_opts = world.negatives(s, rng)
        if neg_focus_p > 0 and rng.random() < neg_focus_p and any(k in neg_opts for k in neg_focus):
            neg_opts = {k: v for k, v in neg_opts.items() if k in neg_focus}
        neg = list(neg_opts.values())[rng.integers(len(neg_opts))]
        rand = other.caption if other.caption != s.caption else scenes[(n + i + 1) % (2 * n)].caption
        im, im_neg, im_rand = world.render(s), world.render(world.scene_from_caption(neg, rng)), world.render(other)
        ref = referring.sample_referring(rng)
        im_ref = referring.render_objects(ref.objects)
        imgs += [im, im, im, im_neg, im_rand, im_ref]
        texts += [s.caption, neg, rand, s.caption, s.caption, ref.model_text]
        caps.append(s.caption), negs.append(neg), rands.append(rand), refs.append(ref)
    boxes = torch.tensor([r.box_cxcywh() for r in refs], dtype=torch.float32)
    return {"images": imgs, "texts": texts, "captions": caps, "neg": negs, "rand": rands, "ref": refs, "boxes": boxes}


def positive_tokens(refs, L: int, device) -> torch.Tensor:
    """Which of L text-encoder tokens name each expression's referred object `[len(refs), L]` bool."""
    pos = torch.zeros(len(refs), L, dtype=torch.bool, device=device)
    for i, r in enumerate(refs):
        for w in r.positive:
            if w + 1 < L:
                pos[i, w + 1] = True  # +1: BOS; one token per word in the shapes vocabulary
    return pos


def _losses(pipe, adapter: DPTAdapter, batch: dict, t: int, noise: torch.Tensor, cfg: DPTTrainConfig,
            grad_unet: bool = False) -> dict[str, torch.Tensor]:
    n = len(batch["captions"])
    dev = pipe.unet.device
    uniq: dict[int, int] = {}
    for im in batch["images"]:
        uniq.setdefault(id(im), len(uniq))
    ims = list({id(im): im for im in batch["images"]}.values())
    latents = encode_images(pipe, ims)[[uniq[id(im)] for im in batch["images"]]]  # [6n, C, h, w]
    blocks = list(adapter.config.blocks)
    extra = ["conv_out"] if grad_unet and cfg.denoise_weight > 0 else []
    feats = dpt_features(pipe, latents, batch["texts"], t, blocks + extra, noise=noise, grad=grad_unet)
    pooled, tokens, valid = text_embeddings(pipe, batch["texts"])
    rows = torch.arange(6 * n, device=dev).reshape(n, 6)
    itm_rows, ref_rows = rows[:, :5].reshape(-1), rows[:, 5]
    out = adapter([f[itm_rows] for f in feats[: len(blocks)]], torch.full((5 * n,), t, device=dev))
    s = itm_score(out.match, pooled[itm_rows]).reshape(n, 5)
    s_i2t, s_t2i = s[:, [0, 1, 2]], s[:, [0, 3, 4]]
    t2i, i2t = itm_contrastive_loss(s_i2t, s_t2i, out.logit_scale)
    sub = adapter([f[ref_rows] for f in feats[: len(blocks)]], torch.full((n,), t, device=dev), tokens[ref_rows],
                  valid[ref_rows])
    rec = rec_regression_loss if adapter.config.rec_head == "regression" else rec_loss
    rl = rec(sub, batch["boxes"].to(dev), adapter.project_tokens(tokens[ref_rows]),
             positive_tokens(batch["ref"], tokens.shape[1], dev), valid[ref_rows], weights=cfg.rec_weights)
    loss = cfg.itm_weight * (t2i + i2t) + rl["loss"]
    res = {"t2i": t2i, "i2t": i2t, "prob": rl["prob"], "l1": rl["l1"], "giou": rl["giou"], "align": rl["align"],
           "itm_acc": (s_i2t.argmax(-1) == 0).float().mean()}
    if extra:
        rows = torch.arange(n, device=dev) * 6
        pred = feats[-1][rows]
        x0 = latents[rows]
        eps = noise.reshape(1, *x0.shape[1:]).expand_as(x0)
        tt = torch.full((n,), t, device=dev, dtype=torch.long)
        ptype = pipe.scheduler.config.get("prediction_type", "epsilon")
        target = pipe.scheduler.get_velocity(x0, eps, tt) if ptype == "v_prediction" else eps if ptype == "epsilon" else x0
        res["denoise"] = F.mse_loss(pred, target)
        loss = loss + cfg.denoise_weight * res["denoise"]
    res["loss"] = loss
    return res


def train_dpt(pipe, cfg: DPTTrainConfig, work_dir: str | Path, progress: bool = True,
              stop_after_s: float | None = None, init_from: str | Path | None = None) -> DPTAdapter:
    """Train (or resume) a DPT adapter (`_train_dpt`) with the pipeline's models frozen; their requires_grad flags
    and train / eval modes are restored afterwards (`models.loading.frozen`), and a stage-2 LoRA is removed from the
    UNet on exit (it lives in `state.pt` and the snapshots), so the pipeline is left as it came."""
    had_lora = has_lora(pipe.unet)
    try:
        with frozen(pipe):
            return _train_dpt(pipe, cfg, work_dir, progress, stop_after_s, init_from)
    finally:
        if cfg.lora_rank and not had_lora and has_lora(pipe.unet):
            remove_lora(pipe.unet)


def _train_dpt(pipe, cfg: DPTTrainConfig, work_dir: str | Path, progress: bool = True,
              stop_after_s: float | None = None, init_from: str | Path | None = None) -> DPTAdapter:
    """Train (or resume training) a DPT adapter on `pipe`; state and snapshots under `work_dir`.

    Stage 1 (`cfg.lora_rank == 0`): the UNet is frozen, its features computed without a graph. Stage 2: a LoRA
    is added to the UNet's cross-attention (`models.adapters.dpt.add_lora`) and trained with the adapter and the
    denoising loss; the base weights are never changed (only the LoRA matrices are trainable), and the LoRA is
    saved apart (`lora.safetensors`).

    Files in `work_dir`: `state.pt` (adapter, LoRA, optimizer, step; resumable), `log.jsonl` (losses per step),
    `snap-<step>/` (adapter.safetensors + config.json [+ lora.safetensors]) every `snapshot_every` steps.

    `init_from`: a `state.pt` whose adapter weights start a fresh run (matching names only; a fresh optimizer), or
    a saved adapter folder (`save_adapter`): the run takes its architecture (grounding head included) and, on a
    fresh start, its weights (stage 2 from a shipped stage-1 adapter) and, in stage 2, the folder's LoRA when it
    has one (`lora.safetensors`: a stage-2 snapshot continued); give it again to resume.

    Returns: the adapter (train mode off).
    """
    work = Path(work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    init_dir = Path(init_from).expanduser() if init_from is not None else None
    if init_dir is not None and init_dir.is_dir():  # a saved adapter: its architecture (always) and weights
        adapter = load_adapter(init_dir, device=pipe.unet.device)
        adapter.config.lora_rank, adapter.config.stage = cfg.lora_rank, 2 if cfg.lora_rank else 1
    else:
        adapter = new_adapter(pipe, cfg.blocks, width=cfg.width, heads=cfg.heads, ff=cfg.ff, n_queries=cfg.n_queries,
                              n_match=cfg.n_match, sem_dim=cfg.sem_dim, t=cfg.t, lora_rank=cfg.lora_rank,
                              stage=2 if cfg.lora_rank else 1)
    lora_params = add_lora(pipe.unet, cfg.lora_rank) if cfg.lora_rank else []
    groups = [{"params": list(adapter.parameters()), "lr": cfg.lr}]
    if lora_params:
        groups.append({"params": lora_params, "lr": cfg.lora_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    step = 0
    state_path = work / "state.pt"
    if init_dir is not None and not init_dir.is_dir() and not state_path.exists():
        st = torch.load(Path(init_from).expanduser(), map_location="cpu", weights_only=False)
        missing, unexpected = adapter.load_state_dict(st["adapter"], strict=False)
        print(f"warm start from {init_from}: new {missing}, dropped {unexpected}")
    if lora_params and init_dir is not None and (init_dir / LORA_FILE).exists() and not state_path.exists():
        from peft.utils import set_peft_model_state_dict  # lazy, as below

        set_peft_model_state_dict(pipe.unet, load_file(init_dir / LORA_FILE), adapter_name="dpt")
        print(f"warm start of the LoRA from {init_dir / LORA_FILE}")
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        adapter.load_state_dict(st["adapter"])
        if lora_params and st.get("lora"):
            # lazy: peft (~1.4 s to import) is only needed for the LoRA variant, not on every start of the app or CLI
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(pipe.unet, st["lora"], adapter_name="dpt")
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
    (work / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    base_lrs = [g["lr"] for g in opt.param_groups]

    def save_state():
        atomic_save({"adapter": adapter.state_dict(), "opt": opt.state_dict(), "step": step,
                     "lora": lora_state_dict(pipe.unet) if lora_params else None}, state_path)

    def snapshot():
        adapter.config.trained_steps = step
        d = save_adapter(adapter, work / f"snap-{step:05d}",
                         extra={"train": dataclasses.asdict(cfg), "init_from": str(init_from or "")})
        if lora_params:
            save_file(lora_state_dict(pipe.unet), d / LORA_FILE)

    t0 = time.time()
    adapter.train()
    with tqdm(total=cfg.steps, initial=step, desc=f"dpt stage {2 if lora_params else 1}", disable=not progress,
              mininterval=10) as bar, open(work / "log.jsonl", "a") as log:
        while step < cfg.steps:
            rng = np.random.default_rng((cfg.seed, step))
            batch = make_batch(rng, cfg.batch, cfg.neg_focus, cfg.neg_focus_p)
            t = _batch_t(cfg, rng)
            noise = torch.from_numpy(rng.standard_normal((pipe.unet.config.in_channels,
                                                          *latent_hw(pipe))).astype(np.float32))
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = scheduled_lr(lr, step, cfg.warmup, cfg.steps, cfg.lr_schedule)
            res = _losses(pipe, adapter, batch, t, noise.to(pipe.unet.device), cfg, grad_unet=bool(lora_params))
            opt.zero_grad(set_to_none=True)
            res["loss"].backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip)
            opt.step()
            step += 1
            row = {k: round(float(v.detach()), 5) for k, v in res.items()}
            row.update(step=step, t=t, s=round(time.time() - t0, 1))
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", itm=f"{row['itm_acc']:.2f}", giou=f"{row['giou']:.3f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_state()
            if step % cfg.snapshot_every == 0 or step == cfg.steps:
                snapshot()
            if stop_after_s is not None and time.time() - t0 > stop_after_s:
                save_state()
                break
    adapter.eval()
    adapter.config.trained_steps = step
    return adapter


def latent_hw(pipe) -> tuple[int, int]:
    s = pipe.unet.config.sample_size
    return (s, s) if isinstance(s, int) else tuple(s)


# --- evaluation -----------------------------------------------------------------------------------------
def evaluate_rec(pipe, adapter: DPTAdapter, expressions: Sequence, t: int | None = None, batch: int = 32) -> dict:
    """REC accuracy (IoU >= 0.5 of the most probable query's box with the true box), per kind and overall.

    Returns: {"overall": {"k", "n"}, "by_kind": {kind: {"k", "n"}}, "ious": [n]}.
    """
    ious: list[float] = []
    for i in range(0, len(expressions), batch):
        chunk = expressions[i: i + batch]
        lat = encode_images(pipe, [referring.render_objects(e.objects) for e in chunk])
        boxes, _ = ground_boxes(pipe, adapter, lat, [e.model_text for e in chunk], t)
        true = torch.tensor([[v / world.IMAGE_SIZE for v in e.box] for e in chunk])
        ious += torch.diagonal(box_iou(boxes, true)[0]).tolist()
    return {**rec_accuracy([e.kind for e in expressions], ious), "ious": ious}


def rec_accuracy(kinds: Sequence[str], ious: Sequence[float]) -> dict:
    """REC hits (IoU >= 0.5) overall and per expression kind: {"overall": {"k", "n"}, "by_kind": {kind: {"k",
    "n"}}}."""
    by_kind: dict[str, dict] = {}
    for kind, iou in zip(kinds, ious):
        d = by_kind.setdefault(kind, {"k": 0, "n": 0})
        d["k"] += int(iou >= 0.5)
        d["n"] += 1
    return {"overall": {"k": sum(d["k"] for d in by_kind.values()), "n": len(ious)}, "by_kind": by_kind}


def evaluate_itm_pairs(pipe, adapter: DPTAdapter, scenes: Sequence[world.Scene], t: int | None = None,
                       denoise_weight: float = 0.0) -> dict:
    """Hard-negative text accuracy: per scene and negative type, s(image, caption) > s(image, negative)
    (`denoise_weight` > 0: the scores fused with the same call's denoising errors, `fuse_denoise`).

    Returns: {"overall": {"k", "n"}, "by_type": {type: {"k", "n"}}}.
    """
    return pair_accuracy(itm_pair_readings(pipe, adapter, scenes, t), denoise_weight)


def itm_pair_readings(pipe, adapter: DPTAdapter, scenes: Sequence[world.Scene], t: int | None = None,
                      noise_seed: int = 0) -> list[dict]:
    """Per scene, one UNet call on its caption and its hard negatives (`world.negatives`, rng 0; the noise of
    `noise_seed`): {"types": ["true", negative types...], "scores": [1 + n] adapter scores, "errors": [1 + n]
    denoising errors}."""
    rows = []
    for s in scenes:
        negs = world.negatives(s, np.random.default_rng(0))
        with torch.no_grad():
            sc, err = itm_pass(pipe, adapter, encode_images(pipe, [world.render(s)]), [s.caption, *negs.values()], t,
                               noise_seed)
        rows.append({"types": ["true", *negs], "scores": sc.float().cpu().tolist(), "errors": err.tolist()})
    return rows


def pair_accuracy(readings: Sequence[dict], denoise_weight: float = 0.0) -> dict:
    """`evaluate_itm_pairs`'s counts from `itm_pair_readings` (the true caption beats each negative), the scores
    fused with the denoising errors at `denoise_weight` (0: the adapter alone)."""
    by: dict[str, dict] = {}
    for r in readings:
        sc = fuse_denoise(torch.tensor(r["scores"]), torch.tensor(r["errors"]), denoise_weight)
        for j, key in enumerate(r["types"][1:], start=1):
            d = by.setdefault(key, {"k": 0, "n": 0})
            d["k"] += int(sc[0] > sc[j])
            d["n"] += 1
    return {"overall": {"k": sum(d["k"] for d in by.values()), "n": sum(d["n"] for d in by.values())}, "by_type": by}


def export_adapter(snapshot_dir: str | Path, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Copy a snapshot (adapter [+ LoRA]) to `out_dir` (e.g. assets/adapters/shapes-v1-dpt), adding `extra` to
    its config.json (the validation readings it was chosen on)."""
    src, dst = Path(snapshot_dir), Path(out_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)
    if extra:
        d = json.loads((dst / CONFIG_FILE).read_text())
        d.setdefault("extra", {}).update(extra)
        (dst / CONFIG_FILE).write_text(json.dumps(d, indent=2) + "\n")
    return dst


# --- shipped adapters -----------------------------------------------------------------------------------
ADAPTERS_DIR = Path(__file__).resolve().parents[2] / "assets" / "adapters"


def model_name(pipe) -> str:
    """The pipeline's model name: the last part of its folder / hub id ("shapes-v1")."""
    p = str(getattr(pipe, "name_or_path", "") or pipe.config.get("_name_or_path", "") or "")
    return Path(p.rstrip("/")).name or "model"


def adapter_dir_for(pipe) -> Path:
    """Where the adapter of the pipe's model is shipped: assets/adapters/<model name>-dpt."""
    return ADAPTERS_DIR / f"{model_name(pipe)}-dpt"


def tuned_dir_for(pipe) -> Path:
    """Where the stage-2 adapter and its LoRA of the pipe's model are shipped: assets/adapters/<model>-dpt-lora."""
    return ADAPTERS_DIR / f"{model_name(pipe)}-dpt-lora"


_LOADED: dict[tuple[str, float], DPTAdapter] = {}
_TUNED: dict[tuple, object] = {}


def find_adapter(pipe, folder: str | Path | None = None) -> DPTAdapter:
    """The adapter for the pipe's model (cached per folder and file time), on the UNet's device.

    Raises:
        ValueError: the model has no adapter, with the command that trains one.
    """
    d = Path(folder) if folder is not None else adapter_dir_for(pipe)
    f = d / "adapter.safetensors"
    if not f.exists():
        raise ValueError(
            f"no DPT adapter for model {model_name(pipe)!r} (looked in {d}); train one with "
            f"`python cli.py train-dpt --model {model_name(pipe)}` (or `python bench/dpt_train.py --work DIR` and "
            f"export a snapshot to {d} with models.training.dpt.export_adapter)")
    key = (str(f.resolve()), f.stat().st_mtime)
    if key not in _LOADED:
        _LOADED[key] = load_adapter(d)
    return _LOADED[key].to(pipe.unet.device)


def tuned_pipe(pipe, folder: str | Path):
    """The DPT-tuned model: a pipeline sharing `pipe`'s components except its UNet, a copy carrying the stage-2
    LoRA saved in `folder` (`lora.safetensors`, rank from the adapter's config); cached per pipe, folder and file
    time (at most 2). `pipe` itself is not changed.

    Raises:
        ValueError: `folder` holds no stage-2 LoRA.
    """
    d = Path(folder)
    f = d / LORA_FILE
    if not f.exists() or not (d / "adapter.safetensors").exists():
        raise ValueError(f"no DPT stage-2 LoRA in {d}; train one with `python cli.py train-dpt --stage 2 "
                         f"--init-adapter {adapter_dir_for(pipe)}`")
    key = (id(pipe), str(f.resolve()), f.stat().st_mtime)
    if key not in _TUNED:
        rank = int(find_adapter(pipe, d).config.lora_rank)
        unet = copy.deepcopy(pipe.unet)
        load_lora(unet, d, rank)
        while len(_TUNED) >= 2:
            _TUNED.pop(next(iter(_TUNED)))
        _TUNED[key] = (pipe, pipe_with_unet(pipe, unet.eval()))  # holding `pipe` keeps its id from being reused
    return _TUNED[key][1]


def find_tuned(pipe, folder: str | Path | None = None) -> tuple[object, DPTAdapter]:
    """(the tuned pipeline, its stage-2 adapter) of the pipe's model (default folder: `tuned_dir_for(pipe)`).

    Raises:
        ValueError: no stage-2 adapter / LoRA there, with the command that trains one.
    """
    d = Path(folder) if folder is not None else tuned_dir_for(pipe)
    tuned = tuned_pipe(pipe, d)
    return tuned, find_adapter(tuned, d)


def find_reader(pipe, tuned: bool = False, folder: str | Path | None = None) -> tuple[object, DPTAdapter]:
    """(the pipeline the adapter reads, the adapter): the pipe and its stage-1 adapter, or with `tuned` the LoRA-tuned
    copy and its stage-2 adapter (`find_tuned`). Raises ValueError (how to train one) when there is none."""
    return find_tuned(pipe, folder) if tuned else (pipe, find_adapter(pipe, folder))
