"""Loading pipelines: the bundled model (default), a local diffusers folder, or a hub id.

The bundled model loads with the very same `StableDiffusionPipeline.from_pretrained` call as a hub id.

Example:
    >>> pipe = load_pipeline()                                         # bundled shapes-world model
    >>> pipe = load_pipeline("stabilityai/stable-diffusion-2-1-base")  # where there is a network
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parent.parent
BUNDLED_NAME = "shapes-v1"
BUNDLED_DIR = REPO / "assets" / "models" / BUNDLED_NAME


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class ModelDefaults:
    """Sampling defaults of a model: its native image size and the guidance it works best at."""

    guidance: float = 7.5
    steps: int = 25
    size: int | None = None  # None: the pipeline's own default


def bundled_models() -> dict[str, Path]:
    """Bundled model folders under assets/models, by name."""
    root = REPO / "assets" / "models"
    return {p.name: p for p in sorted(root.glob("*")) if (p / "model_index.json").exists()}


def resolve_model_id(model_id: str | None) -> str:
    """None or a bundled model's name -> its folder; anything else is returned unchanged."""
    if model_id is None or model_id == "" or model_id == "bundled":
        return str(BUNDLED_DIR)
    if model_id in bundled_models():
        return str(bundled_models()[model_id])
    return model_id


def model_step(model_id: str | None) -> int | None:
    """The UNet training step of a DiscoLens-trained model folder (its `training_state.json`), else None."""
    p = Path(resolve_model_id(model_id)) / "training_state.json"
    if not p.is_file():
        return None
    step = json.loads(p.read_text()).get("unet_step")
    return int(step) if isinstance(step, int) else None


def model_defaults(path_or_id: str) -> ModelDefaults:
    """Defaults stored beside a DiscoLens-trained model (`discolens.json`), else diffusers' usual ones."""
    p = Path(path_or_id)
    meta = p / "discolens.json"
    if meta.exists():
        d = json.loads(meta.read_text())
        return ModelDefaults(**{k: d[k] for k in ("guidance", "steps", "size") if k in d})
    if (p / "training_state.json").exists():
        return ModelDefaults(guidance=3.0, steps=25, size=64)
    return ModelDefaults()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model_id: str | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None):
    """Load a StableDiffusionPipeline (cached per arguments).

    Args:
        model_id: None for the bundled model, a bundled model's name, a local folder or a hub id.
        device: default CUDA when available, else CPU.
        dtype: default fp16 on CUDA, fp32 on CPU.
    Returns:
        The pipeline, on `device`, progress bar off, with `.discolens_defaults` (ModelDefaults).
    Raises:
        ModelLoadError: one clear line (unknown id offline, a folder that is not a pipeline, ...).
    """
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    return _load_cached(resolve_model_id(model_id), str(dev), dt)


def _load_error(path_or_id: str, e: Exception) -> str:
    """One line for a failed load: offline misses say what would work instead of diffusers' advice."""
    text = str(e).strip()
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    if "local_files_only" in text or "cached snapshot" in text or "outgoing traffic" in text or offline:
        known = ", ".join(bundled_models()) or "none"
        return (f"cannot load model {path_or_id!r}: it is not a bundled model ({known}), not a local pipeline "
                "folder, and not in the local hub cache (this machine is offline)")
    first = text.splitlines()[0] if text else type(e).__name__
    return f"cannot load model {path_or_id!r}: {first[:200]}"


@functools.lru_cache(maxsize=4)
def _load_cached(path_or_id: str, device: str, dtype: torch.dtype):
    p = Path(path_or_id)
    looks_local = p.is_absolute() or path_or_id.startswith(".") or p.exists()
    if looks_local and not (p / "model_index.json").exists():
        if p == BUNDLED_DIR:
            raise ModelLoadError(f"the bundled model is missing at {p} (train it: python cli.py train-bundled)")
        raise ModelLoadError(f"{path_or_id} is not a diffusers pipeline folder (no model_index.json)")
    # lazy: diffusers' pipelines module pulls in transformers' processors (~6 s); every `import models.X`
    # runs this package's __init__, so only a load pays for it
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(path_or_id, dtype=dtype, use_safetensors=True,
                                                       safety_checker=None, requires_safety_checker=False)
    except Exception as e:  # hub / file errors come in many classes; report one line
        raise ModelLoadError(_load_error(path_or_id, e)) from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.discolens_defaults = model_defaults(path_or_id)
    return pipe


_WITH_UNET: dict[tuple[int, str, float], tuple[object, object]] = {}


def pipe_with_unet(pipe, unet: torch.nn.Module):
    """A pipeline sharing `pipe`'s components (and its generation defaults) except its UNet, which is `unet`."""
    # lazy: as in _load_cached (diffusers' pipelines module is slow to import)
    from diffusers import StableDiffusionPipeline

    new = StableDiffusionPipeline(**{**pipe.components, "unet": unet}, requires_safety_checker=False)
    new.set_progress_bar_config(disable=True)
    new.register_to_config(_name_or_path=pipe.name_or_path)  # the same model name (its shipped adapters)
    if hasattr(pipe, "discolens_defaults"):
        new.discolens_defaults = pipe.discolens_defaults
    return new


def with_unet(pipe, unet_dir: str | Path):
    """A pipeline sharing `pipe`'s components except its UNet, loaded from `unet_dir` (a diffusers
    `UNet2DConditionModel` folder, e.g. the one D-DiT's dual mode exports), on the same device and dtype; cached
    per pipe, folder and file time (at most 4). `pipe` itself is not changed."""
    # lazy: as in _load_cached (diffusers' pipelines module is slow to import)
    from diffusers import UNet2DConditionModel

    d = Path(unet_dir)
    if not (d / "config.json").exists():
        raise ModelLoadError(f"{d} is not a diffusers UNet folder (no config.json)")
    key = (id(pipe), str(d.resolve()), max(f.stat().st_mtime for f in d.iterdir()))
    if key not in _WITH_UNET:
        unet = UNet2DConditionModel.from_pretrained(d, dtype=pipe.unet.dtype).to(pipe.unet.device).eval()
        new = pipe_with_unet(pipe, unet)
        while len(_WITH_UNET) >= 4:
            _WITH_UNET.pop(next(iter(_WITH_UNET)))
        _WITH_UNET[key] = (pipe, new)  # holding `pipe` keeps its id from being reused while cached
    return _WITH_UNET[key][1]


@contextlib.contextmanager
def frozen(pipe) -> Iterator[None]:
    """requires_grad False and eval mode for the pipeline's UNet, VAE and text encoder; the flags and modes are
    restored on exit (also after an exception), so a training run never leaves a shared pipeline changed."""
    mods = [m for m in (getattr(pipe, n, None) for n in ("unet", "vae", "text_encoder")) if isinstance(m, torch.nn.Module)]
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
