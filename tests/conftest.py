"""Shared fixtures: tiny random-init pipelines in the bundled model's layout (fast on CPU)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.load import start_server

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(1)  # tiny models gain nothing from more; and 1 thread keeps tests fast beside a training job


def tiny_train_config(tmp: Path, **kw):
    from models.training.bundled import TrainConfig

    base = dict(out_dir=str(tmp / "out"), work_dir=str(tmp / "work"), n_images=128, vae_steps=4, vae_batch=8,
                unet_steps=4, batch=8, warmup=1, unet_channels=(32, 32, 32), heads=4, text_layers=1,
                text_hidden=32, vae_channels=(8, 8, 8), checkpoint_every=2, export_every=2, threads=None)
    base.update(kw)
    return TrainConfig(**base)


def build_tiny_pipeline(folder: Path, seed: int = 0):
    """A random-init StableDiffusionPipeline in the bundled layout, saved to `folder` and loaded back."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from models.training.bundled import make_inference_scheduler, make_text_encoder, make_unet, make_vae
    from models.shapes.vocab import build_clip_tokenizer_files

    cfg = tiny_train_config(folder)
    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(build_clip_tokenizer_files(folder / "tok"))
    pipe = StableDiffusionPipeline(vae=make_vae(cfg), text_encoder=make_text_encoder(cfg, tok), tokenizer=tok,
                                   unet=make_unet(cfg), scheduler=make_inference_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    out = StableDiffusionPipeline.from_pretrained(folder / "pipe")
    out.set_progress_bar_config(disable=True)
    return out


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_pipe_dir(tiny_pipe, tmp_path_factory):
    d = tmp_path_factory.mktemp("tinysaved") / "pipe"
    tiny_pipe.save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="session")
def server():
    proc, url = start_server(threads="1", timeout=120)
    yield url
    proc.terminate()
    proc.wait(timeout=30)
