"""Training the bundled shapes-world model (VAE, then UNet + text encoder), resumable, CPU or GPU.

Stages (each resumable, state under `work_dir`):
  1. data     — seeded scenes rendered once; per-object coverage masks at latent resolution.
  2. vae      — AutoencoderKL 64x64 -> 16x16x4, L1 + MSE + 1e-4 KL.
  3. latents  — posterior means of every image, cached; the VAE scaling factor = 1 / latent std.
  4. unet     — UNet2DConditionModel + CLIPTextModel jointly: v-prediction, zero-terminal-SNR betas,
                10 % caption dropout to exactly the pipeline's "" encoding, EMA, grad clip, and the
                TokenCompose-style token loss on cross-attention (option `token_loss_weight`), and
                optionally scene-parsing probes on the text encoder's states (`text_aux_weight`,
                models.training.text_aux: makes the relation words separable for the UNet).

The pipeline (EMA weights) is exported to `out_dir` in diffusers format every `export_every` steps;
a later run on a new machine resumes from the exported weights + `training_state.json`.

Example:
    >>> cfg = TrainConfig(out_dir="assets/models/shapes-v1", work_dir="/tmp/discolens-train")
    >>> train_bundled(cfg)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.attention_capture import STAGES, capture_cross_attention, cross_attention_layers
from models.shapes import world
from models.shapes.vocab import MODEL_MAX_LENGTH, build_clip_tokenizer_files
from models.training.common import LossLog, StopOnSignal, atomic_save, config_field
from models.training.text_aux import IGNORE, TextAuxHead, caption_labels, text_aux_loss

LATENT = 16
MAX_SHARD = "15MB"  # weight files stay small in the git tree; from_pretrained reads the shard index


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run reads; each field is a `cli.py train-bundled` flag (`--unet-steps` for
    unet_steps), its help and bounds in the field's metadata."""

    out_dir: str = config_field("assets/models/shapes-v1", "folder the pipeline is exported to (diffusers format)")
    work_dir: str = config_field(os.path.expanduser("~/.cache/discolens/train-shapes-v1"),
                         "folder of the run's state: data, latents, checkpoints, loss log")
    seed: int = config_field(0, "seed of the data and the initialisation", ge=0)
    n_images: int = config_field(60_000, "rendered training scenes", ge=1)
    exclude_compositional: bool = config_field(True, "leave the compositional split's held-out combinations "
                                       "(models.shapes.world.compositional_holdout) out of the rendered data; the "
                                       "shipped shapes-v1 predates the split and was trained on them")
    mix: dict = config_field(None, "share of each scene kind in the rendered data, KIND=SHARE items",
                     factory=lambda: {"single": 0.25, "relation": 0.45, "count": 0.30})
    # batch sampling weight per scene kind over the cached data (missing kinds: 1; None = uniform): changes the
    # training mix without re-rendering or re-caching latents. The shipped model ran count x3 (batches 56 % counts)
    # from step 5 223 to 6 250 (docs/counts.md)
    kind_weights: dict | None = config_field(None, "batch sampling weight per scene kind over the cached data, KIND=WEIGHT "
                                     "items (count=1 = uniform)", factory=lambda: {"count": 3.0},
                                     check=lambda v: v if v is None else check_kind_weights(v))
    # VAE
    vae_steps: int = config_field(1000, "VAE training steps", ge=0)
    vae_batch: int = config_field(32, "VAE batch size", ge=1)
    vae_lr: float = config_field(1e-3, "VAE learning rate", gt=0)
    vae_channels: tuple = config_field((16, 32, 64), "VAE block widths (a new run only)")
    # UNet + text encoder
    unet_steps: int = config_field(30_000, "total UNet steps; a run stops earlier when interrupted and resumes later", ge=0)
    batch: int = config_field(64, "UNet batch size", ge=1)
    lr: float = config_field(1e-3, "peak learning rate of the UNet + text encoder", gt=0)
    warmup: int = config_field(200, "linear warm-up steps from each (re)start from exported weights", ge=1)
    ema_decay: float = config_field(0.999, "EMA decay of the exported weights", gt=0, lt=1)
    caption_dropout: float = config_field(0.1, "share of captions dropped to the empty prompt", ge=0, le=1)
    token_loss_weight: float = config_field(0.1, "TokenCompose-style token loss on cross-attention (0 = the plain model)",
                                    ge=0)
    token_loss_layers: str = config_field("all", "layers the grounding losses see: all, or stages joined by ',' (mid,up)",
                                  check=lambda v: loss_stages(v))
    pixel_loss_weight: float = config_field(0.0, "TokenCompose's pixel-level BCE term (0 = off)", ge=0)
    text_aux_weight: float = config_field(0.1, "scene-parsing probes on the text encoder's states "
                                  "(models.training.text_aux; 0 = off)", ge=0)
    unet_channels: tuple = config_field((64, 128, 128), "UNet block widths (a new run only)")
    heads: int = config_field(4, "attention heads per UNet layer (a new run only)", ge=1)
    text_layers: int = config_field(3, "text encoder layers (a new run only)", ge=1)
    text_hidden: int = config_field(64, "text encoder width (a new run only)", ge=1)
    grad_clip: float = config_field(1.0, "gradient norm clip", gt=0)
    checkpoint_every: int = config_field(100, "steps between checkpoints", ge=1)
    export_every: int = config_field(500, "steps between exports of the pipeline", ge=1)
    max_minutes: float | None = config_field(None, "stop (checkpoint + export) after this wall time", gt=0)
    threads: int | None = config_field(None, "CPU threads (default: torch's)", ge=1)
    device: str | None = config_field(None, "cpu, cuda, ... (default: CUDA when available)")


# ------------------------------------------------------------------------------------------------
# Components (configs of the real diffusers / transformers classes)
# ------------------------------------------------------------------------------------------------
def make_vae(cfg: TrainConfig):
    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=world.IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1, norm_num_groups=min(16, cfg.vae_channels[0]),
    )


def make_unet(cfg: TrainConfig):
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(cfg.unet_channels),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        attention_head_dim=cfg.heads,  # diffusers' historic name: this is the number of heads
        cross_attention_dim=cfg.text_hidden, norm_num_groups=32,
    )


def make_text_encoder(cfg: TrainConfig, tokenizer):
    conf = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=cfg.text_hidden,
    )
    return CLIPTextModel(conf)


def noise_scheduler_kwargs() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                prediction_type="v_prediction", rescale_betas_zero_snr=True)


def make_inference_scheduler():
    return DDIMScheduler(**noise_scheduler_kwargs(), timestep_spacing="trailing", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


# ------------------------------------------------------------------------------------------------
# Stage 1: data
# ------------------------------------------------------------------------------------------------
def token_object_bits(scene: world.Scene, length: int = MODEL_MAX_LENGTH) -> np.ndarray:
    """`[length]` int8: bit k set where the token (BOS at 0, word i at i+1) refers to object k."""
    bits = np.zeros(length, np.int8)
    for i, refs in enumerate(world.word_objects(scene)):
        for k in refs:
            bits[i + 1] |= 1 << k
    return bits


def build_data(cfg: TrainConfig, tokenizer) -> dict[str, np.ndarray]:
    path = Path(cfg.work_dir) / "data.npz"
    if path.exists():
        d = dict(np.load(path))
        # data cached before the compositional split existed has no flag: it holds the held-out combinations
        excluded = bool(d.pop("exclude_compositional", np.array(False)))
        if len(d["input_ids"]) == cfg.n_images and excluded == cfg.exclude_compositional:
            return d
    scenes = world.sample_dataset(cfg.seed, cfg.n_images, cfg.mix, exclude_compositional=cfg.exclude_compositional)
    images = np.zeros((len(scenes), world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
    masks = np.zeros((len(scenes), 3, LATENT, LATENT), np.float16)
    bits = np.zeros((len(scenes), MODEL_MAX_LENGTH), np.int8)
    for i, s in enumerate(tqdm(scenes, desc="render", mininterval=5)):
        images[i] = np.asarray(world.render(s))
        m = world.object_masks(s)  # [objects, 64, 64]
        pooled = m.reshape(len(m), LATENT, 4, LATENT, 4).mean((2, 4))
        masks[i, : len(m)] = pooled
        bits[i] = token_object_bits(s)
    ids = tokenizer([s.caption for s in scenes], padding="max_length", max_length=MODEL_MAX_LENGTH,
                    truncation=True, return_tensors="np").input_ids.astype(np.int32)
    kinds = np.array([world.KINDS.index(s.kind) for s in scenes], np.int8)
    d = dict(images=images, masks=masks, bits=bits, input_ids=ids, kinds=kinds)
    Path(cfg.work_dir).mkdir(parents=True, exist_ok=True)
    np.savez(path, **d, exclude_compositional=np.array(cfg.exclude_compositional))
    return d


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `[b, h, w, 3]` -> float `[b, 3, h, w]` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------
# Checkpointing
# ------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------
# Stage 2: VAE
# ------------------------------------------------------------------------------------------------
def train_vae(cfg: TrainConfig, data: dict, device: torch.device, log) -> "AutoencoderKL":
    work = Path(cfg.work_dir)
    final = work / "vae"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(final).to(device)
    exported = Path(cfg.out_dir) / "vae"
    if (exported / "config.json").exists():  # resuming on a new machine from committed weights
        return AutoencoderKL.from_pretrained(exported).to(device)
    torch.manual_seed(cfg.seed)
    vae = make_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    ck = work / "vae_ckpt.pt"
    step = 0
    if ck.exists():
        st = torch.load(ck, map_location=device, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = st["step"]
    n_train = min(len(data["images"]), 20_000)
    gen = np.random.default_rng(cfg.seed + 1)
    with StopOnSignal() as flag, tqdm(total=cfg.vae_steps, initial=step, desc="vae") as bar:
        while step < cfg.vae_steps:
            idx = gen.integers(n_train, size=cfg.vae_batch)
            x = images_to_tensor(data["images"][idx]).to(device)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample()).sample
            kl = post.kl().mean() / (4 * LATENT * LATENT)
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log("vae", step, {"loss": loss.item(), "mse": F.mse_loss(rec, x).item()})
            if step % 100 == 0 or flag.stop:
                atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ck)
            if flag.stop:
                raise KeyboardInterrupt("stopped during VAE training (checkpoint saved)")
    vae.save_pretrained(final)
    return vae


# ------------------------------------------------------------------------------------------------
# Stage 3: latents
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def cache_latents(cfg: TrainConfig, data: dict, vae, device) -> tuple[torch.Tensor, float]:
    path = Path(cfg.work_dir) / "latents.pt"
    key = hashlib.sha256(np.ascontiguousarray(data["input_ids"]).tobytes()).hexdigest()  # which data they encode
    if path.exists():
        st = torch.load(path, weights_only=False)
        # a cache without a key predates the key: re-encoded once, since the data may have been rebuilt since
        if len(st["latents"]) == len(data["images"]) and st.get("data_key") == key:
            return st["latents"], st["scaling_factor"]
    vae.eval()
    out = torch.zeros(len(data["images"]), 4, LATENT, LATENT)
    for i in tqdm(range(0, len(out), 256), desc="latents", mininterval=5):
        x = images_to_tensor(data["images"][i : i + 256]).to(device)
        out[i : i + 256] = vae.encode(x).latent_dist.mean.cpu()
    sf = float(1.0 / out.std())
    atomic_save({"latents": out, "scaling_factor": sf, "data_key": key}, path)
    return out, sf


# ------------------------------------------------------------------------------------------------
# Stage 4: UNet + text encoder
# ------------------------------------------------------------------------------------------------
def token_masks(masks16: torch.Tensor, bits: torch.Tensor, size: int) -> torch.Tensor:
    """Binary token masks `[b, tokens, size*size]` from object coverage `[b, 3, 16, 16]` and token bits.

    A token's mask is the union of its objects' cells with coverage >= min(0.25, the object's max);
    tokens that refer to no object get an all-zero mask.
    """
    m = masks16.float()
    if size != m.shape[-1]:
        m = F.adaptive_avg_pool2d(m, size)
    peak = m.flatten(2).amax(-1).clamp(max=0.25)[..., None, None]
    obj = ((m >= peak) & (m > 0)).float().flatten(2)  # [b, 3, hw]
    sel = torch.stack([(bits.long() >> k) & 1 for k in range(3)], -1).float()  # [b, tokens, 3]
    return (torch.einsum("bto,boq->btq", sel, obj) > 0).float()


def token_loss(probs: torch.Tensor, tmask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """TokenCompose-style grounding loss for one layer: mean over heads and valid tokens of (1 - share)^2.

    Args:
        probs: `[b, heads, hw, tokens]` attention probabilities.
        tmask: `[b, tokens, hw]` binary token masks.
        valid: `[b, tokens]` 1 where the token has an object (and the caption was not dropped).
    Returns:
        (loss summed over valid tokens and heads, number of terms) as a 2-tuple of tensors.
    """
    mass = probs.sum(2)  # [b, heads, tokens]
    inside = torch.einsum("bhqt,btq->bht", probs, tmask)
    share = inside / (mass + 1e-8)
    per = (1 - share) ** 2 * valid[:, None, :]
    return per.sum(), valid.sum() * probs.shape[1]


def pixel_loss(probs: torch.Tensor, tmask: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenCompose's pixel-level term for one layer: binary cross-entropy between each valid token's
    head-averaged attention map (probabilities in [0, 1]) and its binary mask, mean over positions.

    Args / shapes as `token_loss`. Returns (loss summed over valid tokens, number of valid tokens).
    """
    a = probs.float().mean(1).transpose(1, 2).clamp(1e-6, 1 - 1e-6)  # [b, tokens, hw]
    bce = F.binary_cross_entropy(a, tmask, reduction="none").mean(-1)  # [b, tokens]
    return (bce * valid).sum(), valid.sum()


def loss_stages(selection: str | None) -> tuple[str, ...] | None:
    """The UNet stages of a `token_loss_layers` value: "all" -> None (every layer), "mid,up" -> ("mid", "up")."""
    if selection in (None, "", "all"):
        return None

    stages = tuple(x.strip() for x in selection.split(",") if x.strip())
    if not stages or any(x not in STAGES for x in stages):
        raise ValueError(f"token_loss_layers must be 'all' or stages from {', '.join(STAGES)} joined by ',', "
                         f"got {selection!r}")
    return stages


def loss_layers(unet, selection: str | None) -> list[str] | None:
    """Module paths of the cross-attention layers the grounding losses see (None = every layer)."""
    stages = loss_stages(selection)
    return None if stages is None else [l.name for l in cross_attention_layers(unet) if l.stage in stages]


def check_kind_weights(kind_weights: dict) -> dict:
    """The weights, if every kind is one of world.KINDS and every weight finite and > 0; ValueError otherwise."""
    unknown = set(kind_weights) - set(world.KINDS)
    if unknown:
        raise ValueError(f"unknown scene kind(s) {sorted(unknown)}; expected some of {world.KINDS}")
    if not all(0 < float(w) < float("inf") for w in kind_weights.values()):
        raise ValueError("kind weights must be finite and > 0")
    return kind_weights


def sample_weights(kinds: np.ndarray, kind_weights: dict | None) -> torch.Tensor | None:
    """Per-image sampling weights `[n_images]` from the cached kind codes (indices into world.KINDS)."""
    if not kind_weights:
        return None
    check_kind_weights(kind_weights)
    per_kind = torch.tensor([float(kind_weights.get(k, 1.0)) for k in world.KINDS])
    return per_kind[torch.from_numpy(kinds.astype(np.int64))]


def kind_shares(kinds: np.ndarray, weights: torch.Tensor | None) -> dict[str, float]:
    """Expected share of each kind in a training batch."""
    w = torch.ones(len(kinds)) if weights is None else weights
    k = torch.from_numpy(kinds.astype(np.int64))
    return {name: round(float(w[k == i].sum() / w.sum()), 4) for i, name in enumerate(world.KINDS)}


def _lr_at(step: int, cfg: TrainConfig, warm_start: int = 0) -> float:
    return cfg.lr * min(1.0, (step - warm_start + 1) / cfg.warmup)


AUX_HEAD_FILE = "text_aux_head.safetensors"  # training-only probe head, beside the pipeline (not a component)


def export_pipeline(cfg: TrainConfig, unet, text_encoder, tokenizer, vae, step: int, extra: dict,
                    aux_head: TextAuxHead | None = None) -> Path:
    """Save the pipeline (given weights) in diffusers format + training_state.json to cfg.out_dir.

    The text-aux probe head, when given, is saved too (a few KB) so that a resume on a new machine keeps it.
    """
    out = Path(cfg.out_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=make_inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    tmp = out.with_name(out.name + ".exporting")
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD)
    cfg_d = dataclasses.asdict(cfg)
    cfg_d.pop("work_dir")
    state = {"unet_step": step, "config": cfg_d, **extra}
    (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
    if aux_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in aux_head.state_dict().items()}, tmp / AUX_HEAD_FILE)
    log_src = Path(cfg.work_dir) / "loss_log.csv"
    if log_src.exists():
        (tmp / "training_log.csv").write_text(log_src.read_text())
    for keep in ("README.md", "discolens.json"):
        if (out / keep).exists():
            (tmp / keep).write_text((out / keep).read_text())
    if not (tmp / "discolens.json").exists():
        (tmp / "discolens.json").write_text(json.dumps({"guidance": 3.0, "steps": 25, "size": world.IMAGE_SIZE}))
    if out.exists():
        old = out.with_name(out.name + ".old")
        os.replace(out, old)
        os.replace(tmp, out)

        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def training_tokenizer(cfg: TrainConfig):
    """The run's tokenizer, never rebuilt under a run in progress: the work dir's (its cached token ids
    were made with it), else the exported model's being resumed, else a fresh build; kept in the work dir."""
    work_tok, exported = Path(cfg.work_dir) / "tokenizer", Path(cfg.out_dir)
    if not (work_tok / "tokenizer_config.json").exists():
        if (exported / "training_state.json").exists() and (exported / "tokenizer").exists():
            CLIPTokenizer.from_pretrained(exported / "tokenizer").save_pretrained(work_tok)
        else:
            build_clip_tokenizer_files(work_tok)
    return CLIPTokenizer.from_pretrained(work_tok)


def train_bundled(cfg: TrainConfig) -> Path:
    """Run every stage that is not done yet; returns the exported pipeline folder."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    exported_log = Path(cfg.out_dir) / "training_log.csv"
    if not (work / "loss_log.csv").exists() and exported_log.exists():  # a new machine: keep the history
        (work / "loss_log.csv").write_text(exported_log.read_text())
    log = LossLog(work / "loss_log.csv")
    t_start = time.time()

    tokenizer = training_tokenizer(cfg)
    data = build_data(cfg, tokenizer)
    vae = train_vae(cfg, data, device, log)
    latents, sf = cache_latents(cfg, data, vae, device)
    vae.register_to_config(scaling_factor=sf)
    vae.requires_grad_(False)

    # --- models: fresh, from the work-dir checkpoint, or from the committed export ---
    torch.manual_seed(cfg.seed)
    unet = make_unet(cfg)
    text = make_text_encoder(cfg, tokenizer)
    ck = work / "unet_ckpt.pt"
    exported = Path(cfg.out_dir)
    step, warm_start = 0, 0
    ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema_text = EMAModel(text.parameters(), decay=cfg.ema_decay)
    opt_state = None
    aux_head = TextAuxHead(cfg.text_hidden) if cfg.text_aux_weight > 0 else None
    aux_opt_state = None
    if ck.exists():
        st = torch.load(ck, map_location="cpu", weights_only=False)
        unet.load_state_dict(st["unet"])
        text.load_state_dict(st["text"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_text.load_state_dict(st["ema_text"])
        opt_state, step = st["opt"], st["step"]
        warm_start = st.get("warm_start", 0)
        if aux_head is not None and "aux_head" in st:
            aux_head.load_state_dict(st["aux_head"])
            aux_opt_state = st["aux_opt"]
    elif (exported / "training_state.json").exists() and (exported / "unet").exists():
        state = json.loads((exported / "training_state.json").read_text())
        unet = UNet2DConditionModel.from_pretrained(exported / "unet")
        text = CLIPTextModel.from_pretrained(exported / "text_encoder")
        ema_unet = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        ema_text = EMAModel(text.parameters(), decay=cfg.ema_decay)
        step = warm_start = int(state["unet_step"])
        # the EMA goes on with the decay it had reached: a fresh EMAModel restarts diffusers' (1+s)/(10+s)
        # ramp and would average over a few hundred steps only
        ema_unet.optimization_step = ema_text.optimization_step = step
        restored = ""
        if aux_head is not None and (exported / AUX_HEAD_FILE).exists():
            aux_head.load_state_dict(load_file(exported / AUX_HEAD_FILE))
            restored = " (text-aux probe head restored)"
        print(f"resuming from exported EMA weights at step {step} with a fresh optimizer{restored}")
    unet.to(device).train()
    text.to(device).train()
    ema_unet.to(device)
    ema_text.to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    opts = [opt]
    if aux_head is not None:  # its own optimizer: switching the loss on keeps the main optimizer's state
        aux_head.to(device).train()
        opts.append(torch.optim.AdamW(aux_head.parameters(), lr=cfg.lr, weight_decay=1e-2))
        if aux_opt_state is not None:
            opts[1].load_state_dict(aux_opt_state)
    noise_sched = DDPMScheduler(**noise_scheduler_kwargs())

    empty_ids = tokenizer([""], padding="max_length", max_length=MODEL_MAX_LENGTH, return_tensors="pt").input_ids[0]
    input_ids = torch.from_numpy(data["input_ids"]).long()
    masks = torch.from_numpy(data["masks"])
    bits = torch.from_numpy(data["bits"])
    n = len(latents)
    weights = sample_weights(data["kinds"], cfg.kind_weights)
    if weights is not None:
        print(f"batch mix by kind: {kind_shares(data['kinds'], weights)}")
    aux_labels = None
    if aux_head is not None:
        caps = [c.strip() for c in tokenizer.batch_decode(data["input_ids"], skip_special_tokens=True)]
        aux_labels = torch.from_numpy(caption_labels(caps, tokenizer, MODEL_MAX_LENGTH))

    captured: list[torch.Tensor] = []

    def sink(name, probs, logits):
        captured.append(probs)

    def save_ckpt():
        atomic_save({"unet": unet.state_dict(), "text": text.state_dict(), "ema_unet": ema_unet.state_dict(),
                      "ema_text": ema_text.state_dict(), "opt": opt.state_dict(), "step": step,
                      "warm_start": warm_start}
                     | ({"aux_head": aux_head.state_dict(), "aux_opt": opts[1].state_dict()} if aux_head is not None
                        else {}), ck)

    def export():
        u, t = copy.deepcopy(unet).cpu(), copy.deepcopy(text).cpu()
        ema_unet.copy_to(u.parameters())
        ema_text.copy_to(t.parameters())
        export_pipeline(cfg, u.eval(), t.eval(), tokenizer, vae.cpu(), step,
                        {"train_minutes_this_run": round((time.time() - t_start) / 60, 1)}, aux_head)
        vae.to(device)

    use_tok = cfg.token_loss_weight > 0 or cfg.pixel_loss_weight > 0
    ctx = capture_cross_attention(unet, sink, layers=loss_layers(unet, cfg.token_loss_layers)) if use_tok else _null()
    with StopOnSignal() as flag, ctx, tqdm(total=cfg.unet_steps, initial=step, desc="unet") as bar:
        while step < cfg.unet_steps:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            if weights is None:
                idx = torch.randint(0, n, (cfg.batch,), generator=g)
            else:
                idx = torch.multinomial(weights, cfg.batch, replacement=True, generator=g)
            x0 = (latents[idx] * sf).to(device)
            ids = input_ids[idx].clone()
            drop = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
            ids[drop] = empty_ids
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(0, 1000, (cfg.batch,), generator=g).to(device)
            xt = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t)
            captured.clear()
            emb = text(ids.to(device))[0]
            pred = unet(xt, t, encoder_hidden_states=emb).sample
            mse = F.mse_loss(pred.float(), target.float())
            loss = mse
            tl_val = pl_val = ta_val = 0.0
            if aux_head is not None:
                lab = aux_labels[idx].clone()
                lab[drop] = IGNORE
                ta = text_aux_loss(aux_head, emb, lab.to(device))
                loss = loss + cfg.text_aux_weight * ta
                ta_val = float(ta.detach())
            if use_tok:
                valid = ((bits[idx] != 0) & ~drop[:, None]).float().to(device)
                tot, cnt, ptot, pcnt = 0.0, 0.0, 0.0, 0.0
                for probs in captured:
                    side = int(math.isqrt(probs.shape[2]))
                    tm = token_masks(masks[idx], bits[idx], side).to(device)
                    s, c = token_loss(probs, tm, valid)
                    tot, cnt = tot + s, cnt + c
                    if cfg.pixel_loss_weight > 0:
                        s, c = pixel_loss(probs, tm, valid)
                        ptot, pcnt = ptot + s, pcnt + c
                tl = tot / cnt.clamp(min=1)
                loss = loss + cfg.token_loss_weight * tl
                tl_val = float(tl.detach())
                if cfg.pixel_loss_weight > 0:
                    pl = ptot / pcnt.clamp(min=1)
                    loss = loss + cfg.pixel_loss_weight * pl
                    pl_val = float(pl.detach())
            for o in opts:
                for gparam in o.param_groups:
                    gparam["lr"] = _lr_at(step, cfg, warm_start)
                o.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            for o in opts:
                o.step()
            ema_unet.step(unet.parameters())
            ema_text.step(text.parameters())
            step += 1
            bar.update(1)
            bar.set_postfix(mse=f"{mse.item():.4f}", tok=f"{tl_val:.3f}")
            log("unet", step, {"mse": mse.item(), "token_loss": tl_val, "grad_norm": float(gn),
                               "ema_decay": float(ema_unet.cur_decay_value)}
                | ({"pixel_loss": pl_val} if cfg.pixel_loss_weight > 0 else {})
                | ({"text_aux_loss": ta_val} if aux_head is not None else {}))
            over = cfg.max_minutes is not None and (time.time() - t_start) / 60 > cfg.max_minutes
            if step % cfg.checkpoint_every == 0 or flag.stop or over:
                save_ckpt()
            if step % cfg.export_every == 0 or flag.stop or over or step == cfg.unet_steps:
                export()
            if flag.stop or over:
                break
    return Path(cfg.out_dir)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False
