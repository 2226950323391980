"""Real Stable Diffusion architecture configs, and random-init pipelines built from them, offline.

The config JSONs under `assets/configs/<arch>/` are the ones of the hub repositories (see
`assets/configs/README.md` for where each came from):

* ``"sd15"``     — runwayml/stable-diffusion-v1-5: UNet 860 M (attention_head_dim 8, i.e. 8 heads
  everywhere; cross_attention_dim 768), CLIP ViT-L/14 text encoder (12 layers, hidden 768, quick_gelu).
* ``"sd21base"`` — stabilityai/stable-diffusion-2-1-base: UNet with attention_head_dim [5, 10, 20, 20]
  (heads per level; 64-dim heads), use_linear_projection, cross_attention_dim 1024, no
  upcast_attention; OpenCLIP ViT-H text encoder (23 layers, hidden 1024, gelu). (The 768-v model
  stabilityai/stable-diffusion-2-1 has the same UNet but ``upcast_attention: true`` and sample_size 96.)
* ``"sdxl"``     — stabilityai/stable-diffusion-xl-base-1.0, UNet only (`component="unet"`).

Note diffusers' historic naming: ``attention_head_dim`` in these configs is the number of heads.

No weights exist locally: `build_reference_pipeline` random-initialises (seeded) every component from
the configs, at full size or scaled down by `scaled_config` (channels divided, block structure,
layer counts and head-count pattern kept), with a small local CLIP-format tokenizer (the real CLIP
vocabulary cannot be downloaded), so the text encoder's vocabulary and positions follow the tokenizer.

Example:
    >>> pipe = build_reference_pipeline("sd21base", scale="tiny")
    >>> image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    >>> save_reference_pipeline("sd15", "out/sd15-tiny")      # then StableDiffusionPipeline.from_pretrained
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.shapes.vocab import build_clip_tokenizer_files

__all__ = [
    "ARCHS", "COMPONENTS", "SCALES", "CONFIG_ROOT", "load_reference_config", "scaled_config",
    "build_text_encoder_config", "build_reference_pipeline", "save_reference_pipeline",
]

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "assets" / "configs"

ARCHS: tuple[str, ...] = ("sd15", "sd21base", "sdxl")
PIPELINE_ARCHS: tuple[str, ...] = ("sd15", "sd21base")
COMPONENTS: dict[str, str] = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "scheduler": "scheduler/scheduler_config.json",
    "model_index": "model_index.json",
}
# scale name -> width divisor. 8 keeps every head count of SD-1.5 / SD-2.1 / SDXL integral-dimensioned
# (SD-1.5: 8 heads of 5/10/20 dims; SD-2.x and SDXL: 5/10/20 heads of 8 dims).
SCALES: dict[str, int] = {"full": 1, "tiny": 8}
# spatial size of the tiny pipelines' defaults: 8x8 latents <-> 64x64 images (VAE factor 8)
TINY_LATENT = 8

# keys of a saved transformers config that are bookkeeping, not architecture
_TRANSFORMERS_META = ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "model_type")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def load_reference_config(arch: str, component: str) -> dict[str, Any]:
    """The real hub config of one component of a reference architecture.

    Args:
        arch: ``"sd15"``, ``"sd21base"`` or ``"sdxl"`` (SDXL: ``"unet"`` only).
        component: ``"unet"``, ``"vae"``, ``"text_encoder"``, ``"scheduler"`` or ``"model_index"``.

    Returns:
        A fresh dict (safe to mutate) with the JSON's content, private keys (``_class_name``...) included.

    Raises:
        ValueError: unknown arch or component.
        FileNotFoundError: a component this arch does not ship (e.g. SDXL's VAE).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {tuple(COMPONENTS)}")
    path = CONFIG_ROOT / arch / COMPONENTS[component]
    if not path.is_file():
        raise FileNotFoundError(f"no {component} config for {arch!r} (looked for {path})")
    return json.loads(path.read_text())


def _per_block(value: int | list[int] | tuple[int, ...] | None, n: int) -> list[int] | None:
    if value is None:
        return None
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def _divide(value: int, divisor: int, what: str) -> int:
    if value % divisor:
        raise ValueError(f"{what}={value} is not divisible by width_divisor={divisor}")
    return value // divisor


def _group_count(groups: int, channels: list[int]) -> int:
    """The largest group count <= `groups` dividing every channel count (GroupNorm's constraint)."""
    g = math.gcd(groups, math.gcd(*channels))
    return max(g, 1)


def _scale_unet(cfg: dict[str, Any], d: int) -> dict[str, Any]:
    channels = [_divide(c, d, "block_out_channels") for c in cfg["block_out_channels"]]
    n = len(channels)
    # diffusers: num_attention_heads (if given) wins, else attention_head_dim is the head count
    heads = _per_block(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n)
    for c, h in zip(channels, heads):
        if c % h:
            raise ValueError(f"scaled width {c} is not divisible by its {h} heads "
                             f"(width_divisor={d}); pick a divisor that keeps channels/heads integral")
    cfg["block_out_channels"] = channels
    cfg["norm_num_groups"] = _group_count(cfg.get("norm_num_groups", 32), channels)
    cross = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross, (list, tuple)):
        cfg["cross_attention_dim"] = [_divide(c, d, "cross_attention_dim") for c in cross]
    else:
        cfg["cross_attention_dim"] = _divide(cross, d, "cross_attention_dim")
    # SDXL: added "text_time" conditioning = pooled text (width/d) + 6 time ids x addition_time_embed_dim/d
    for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim", "encoder_hid_dim",
                "time_embedding_dim", "time_cond_proj_dim"):
        if cfg.get(key) is not None:
            cfg[key] = _divide(cfg[key], d, key)
    return cfg


def _scale_vae(cfg: dict[str, Any], d: int) -> dict[str, Any]:
    channels = [_divide(c, d, "block_out_channels") for c in cfg["block_out_channels"]]
    cfg["block_out_channels"] = channels
    cfg["norm_num_groups"] = _group_count(cfg.get("norm_num_groups", 32), channels)
    return cfg


def _scale_text_encoder(cfg: dict[str, Any], d: int) -> dict[str, Any]:
    heads = cfg.get("num_attention_heads", 8)
    hidden = _divide(cfg["hidden_size"], d, "hidden_size")
    if hidden % heads:
        raise ValueError(f"scaled hidden_size {hidden} is not divisible by its {heads} heads (width_divisor={d})")
    cfg["hidden_size"] = hidden
    cfg["intermediate_size"] = _divide(cfg["intermediate_size"], d, "intermediate_size")
    if cfg.get("projection_dim"):
        cfg["projection_dim"] = max(1, cfg["projection_dim"] // d)
    cfg["num_hidden_layers"] = max(1, math.ceil(cfg["num_hidden_layers"] / d))
    return cfg


def scaled_config(config: dict[str, Any], width_divisor: int, sample_size: int | None = None) -> dict[str, Any]:
    """A scaled-down copy of a UNet, VAE or CLIP-text config that keeps the architecture's structure.

    UNet (``UNet2DConditionModel``): ``block_out_channels``, ``cross_attention_dim`` (and SDXL's added
    conditioning widths) are divided by `width_divisor`; block types, ``layers_per_block``,
    ``transformer_layers_per_block``, the per-level head counts (``attention_head_dim``), hence the
    number of cross-attention layers and their heads, ``use_linear_projection``, ``upcast_attention``
    and the cross_attention_dim / width ratio are kept (head *dims* shrink by `width_divisor`).
    VAE (``AutoencoderKL``): ``block_out_channels`` divided, block structure kept.
    CLIP text (``model_type == "clip_text_model"``): ``hidden_size``, ``intermediate_size`` and
    ``projection_dim`` divided, heads kept, ``num_hidden_layers`` -> ceil(layers / width_divisor).
    ``norm_num_groups`` becomes the largest count <= the original dividing every scaled width.
    Other configs (schedulers, model_index) come back unchanged.

    Args:
        config: a config dict as from `load_reference_config` (not modified).
        width_divisor: >= 1; 1 returns an unscaled copy (except `sample_size`).
        sample_size: if given, replaces ``sample_size`` (UNet: latent side, VAE: image side), which
            sets a pipeline's default output size; ``None`` keeps the original.

    Returns:
        The scaled copy.

    Raises:
        ValueError: `width_divisor` < 1, or a width not divisible by it / by its head count.
    """
    if width_divisor < 1:
        raise ValueError(f"width_divisor must be >= 1, got {width_divisor}")
    cfg = copy.deepcopy(config)
    kind = cfg.get("_class_name") or cfg.get("model_type")
    if width_divisor > 1:
        if kind == "UNet2DConditionModel":
            cfg = _scale_unet(cfg, width_divisor)
        elif kind == "AutoencoderKL":
            cfg = _scale_vae(cfg, width_divisor)
        elif kind == "clip_text_model":
            cfg = _scale_text_encoder(cfg, width_divisor)
    if sample_size is not None and kind in ("UNet2DConditionModel", "AutoencoderKL"):
        cfg["sample_size"] = int(sample_size)
    return cfg


# ------------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------------
def _width_divisor(scale: str | int) -> int:
    if isinstance(scale, int):
        return scale
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {tuple(SCALES)} or an int divisor")
    return SCALES[scale]


def build_text_encoder_config(config: dict[str, Any], tokenizer) -> "CLIPTextConfig":
    """A `CLIPTextConfig` from a (scaled) hub text-encoder config, fitted to a local tokenizer.

    ``vocab_size`` = len(tokenizer), ``max_position_embeddings`` = tokenizer.model_max_length, and the
    bos / eos / pad ids are the tokenizer's; the rest (width, depth, heads, activation...) is the config's.
    Bookkeeping keys (``torch_dtype`` — SD-2.1's says float16 —, ``architectures``...) are dropped, so
    the model is built in float32.

    Args:
        config: text-encoder config dict (``model_type == "clip_text_model"``).
        tokenizer: a `CLIPTokenizer`.

    Returns:
        The `CLIPTextConfig`.
    """
    kw = {k: v for k, v in config.items() if k not in _TRANSFORMERS_META}
    kw.update(vocab_size=len(tokenizer), max_position_embeddings=int(tokenizer.model_max_length),
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
    return CLIPTextConfig(**kw)


def _load_tokenizer(tokenizer_dir: str | Path | None):
    if tokenizer_dir is not None:
        return CLIPTokenizer.from_pretrained(str(tokenizer_dir))

    with tempfile.TemporaryDirectory(prefix="discolens-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(str(build_clip_tokenizer_files(tmp)))


def build_reference_pipeline(arch: str, scale: str | int = "tiny", tokenizer_dir: str | Path | None = None,
                             seed: int = 0, scheduler: str | None = None) -> "StableDiffusionPipeline":
    """A random-init `StableDiffusionPipeline` with a reference architecture, offline.

    Components: UNet2DConditionModel, AutoencoderKL and CLIPTextModel from the (scaled) hub configs,
    each initialised under ``torch.manual_seed(seed + i)`` (the global RNG state is restored after);
    the scheduler from the hub scheduler config (PNDM for both archs) or `scheduler`; the tokenizer
    from `tokenizer_dir`. safety_checker / feature_extractor are None, requires_safety_checker False.

    Shapes (tiny, width divisor 8): defaults to 64x64 images <-> 8x8x4 latents; prompt embeddings
    ``[batch, model_max_length, cross_attention_dim]`` = ``[B, 16, 96]`` (sd15) / ``[B, 16, 128]``
    (sd21base) with the project's tokenizer. Full: the hub sample sizes (512 <-> 64x64x4), widths
    768 / 1024, full depth; only the vocabulary and position table follow the tokenizer.

    Args:
        arch: ``"sd15"`` or ``"sd21base"``.
        scale: ``"tiny"`` (width / 8), ``"full"`` (real sizes) or an int width divisor; any divisor > 1
            also sets the default size to 8x8 latents / 64x64 images.
        tokenizer_dir: a CLIP-format tokenizer folder (e.g. from
            `models.shapes.vocab.build_clip_tokenizer_files`); ``None`` builds the project's one in a temp dir.
        seed: base seed of the random init.
        scheduler: a diffusers scheduler class name (e.g. ``"DDIMScheduler"``) to build from the hub
            scheduler config instead of its own class; ``None`` keeps the hub's.

    Returns:
        The pipeline, on CPU, float32, eval mode.

    Raises:
        ValueError: unknown arch or scale.
    """
    if arch not in PIPELINE_ARCHS:
        raise ValueError(f"no pipeline for arch {arch!r}; expected one of {PIPELINE_ARCHS}")
    d = _width_divisor(scale)
    tiny = d > 1 and scale != "full"
    tokenizer = _load_tokenizer(tokenizer_dir)

    unet_cfg = scaled_config(load_reference_config(arch, "unet"), d, sample_size=TINY_LATENT if tiny else None)
    vae_cfg = load_reference_config(arch, "vae")
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    vae_cfg = scaled_config(vae_cfg, d, sample_size=TINY_LATENT * vae_factor if tiny else None)
    te_cfg = build_text_encoder_config(scaled_config(load_reference_config(arch, "text_encoder"), d), tokenizer)
    sched_cfg = load_reference_config(arch, "scheduler")
    sched_cls = getattr(diffusers, scheduler or sched_cfg["_class_name"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(unet_cfg)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL.from_config(vae_cfg)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(te_cfg)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=sched_cls.from_config(sched_cfg), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_reference_pipeline(arch: str, folder: str | Path, scale: str | int = "tiny",
                            tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build a reference pipeline and save it (safetensors) so ``StableDiffusionPipeline.from_pretrained(folder)`` loads it.

    Args:
        arch: ``"sd15"`` or ``"sd21base"``.
        folder: output folder (created).
        scale: as in `build_reference_pipeline`. ``"full"`` writes ~4 GB.
        tokenizer_dir: as in `build_reference_pipeline`.
        seed: base seed of the random init.

    Returns:
        `folder` as a Path.
    """
    folder = Path(folder)
    pipe = build_reference_pipeline(arch, scale=scale, tokenizer_dir=tokenizer_dir, seed=seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
