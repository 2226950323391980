"""Tracing overhead: traced vs untraced generation time, measured side by side in one run.

    python -m bench.capture_overhead                  # bundled model on this device
    python -m bench.capture_overhead --sd15           # also a full-size SD-1.5 UNet (random init; GPU advised)

Runs alternate (untraced, traced, untraced, traced, ...) after a warm-up so drift hits both equally;
the ratio is the median traced time over the median untraced time. All layers x heads x steps are
traced. Also prints the trace's bytes per step against the floor sum(heads*h*w*real tokens*2 bytes).
The last line reads exactly `capture_overhead_ratio=<x> bytes_over_floor=<y>` (bundled model).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from models.loading import load_pipeline
from models.trace import Tracer, trace


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_generation(pipe, prompt: str, steps: int, repeats: int, size: int | None) -> tuple[float, float, object]:
    dev = pipe.device
    kw = {"height": size, "width": size} if size else {}

    def run(traced: bool):
        g = torch.Generator("cpu").manual_seed(0)
        _sync(dev)
        t0 = time.perf_counter()
        if traced:
            with trace(pipe) as tr:
                pipe(prompt, num_inference_steps=steps, generator=g, guidance_scale=3.0, output_type="latent", **kw)
            out = tr.trace
        else:
            pipe(prompt, num_inference_steps=steps, generator=g, guidance_scale=3.0, output_type="latent", **kw)
            out = None
        _sync(dev)
        return time.perf_counter() - t0, out

    run(False), run(True)  # warm-up
    plain, traced, last = [], [], None
    for _ in range(repeats):
        plain.append(run(False)[0])
        dt, last = run(True)
        traced.append(dt)
    return statistics.median(plain), statistics.median(traced), last


def bytes_over_floor(tr) -> tuple[float, float]:
    per_step = tr.nbytes() / tr.n_steps
    floor = sum(l.heads * l.h * l.w * len(tr.tokens) * 2 for l in tr.layers)
    return per_step, per_step / floor


def sd15_unet_overhead(device: torch.device, latent: int, repeats: int) -> float:
    """Full-size SD-1.5 UNet (real config, random init): traced / untraced forward time."""
    from diffusers import UNet2DConditionModel

    from models.reference_configs import load_reference_config

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = UNet2DConditionModel.from_config(load_reference_config("sd15", "unet")).to(device, dtype).eval()
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    emb = torch.randn(2, 77, 768, device=device, dtype=dtype)

    class _Tok:
        model_max_length, eos_token_id, bos_token, eos_token = 77, 49407, "<|startoftext|>", "<|endoftext|>"

        def __call__(self, prompts, **kw):
            ids = torch.full((len(prompts), 77), 49407)
            ids[:, 0], ids[:, 1:8] = 49406, torch.arange(300, 307)
            return type("T", (), {"input_ids": ids})()

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    def fwd(traced: bool) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if traced:
                tr = Tracer(unet, _Tok(), prompts=["p"], device=device)  # kept on the GPU until the end
                with tr._active():
                    unet(x, torch.tensor(500, device=device), encoder_hidden_states=emb)
            else:
                unet(x, torch.tensor(500, device=device), encoder_hidden_states=emb)
        _sync(device)
        return time.perf_counter() - t0

    fwd(False), fwd(True)
    a, b = [], []
    for _ in range(repeats):
        a.append(fwd(False))
        b.append(fwd(True))
    return statistics.median(b) / statistics.median(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sd15", action="store_true")
    ap.add_argument("--sd15-latent", type=int, default=64)
    a = ap.parse_args()

    pipe = load_pipeline(a.model)
    dev = pipe.device
    if a.sd15:
        r = sd15_unet_overhead(dev, a.sd15_latent, max(2, a.repeats // 2))
        print(f"sd15 full-size UNet forward ({dev}, {a.sd15_latent}x{a.sd15_latent} latents, CFG batch 2): "
              f"traced/untraced = {r:.3f}")
    plain, traced, tr = time_generation(pipe, "a red circle left of a blue square", a.steps, a.repeats,
                                        pipe.discolens_defaults.size)
    per_step, over = bytes_over_floor(tr)
    ratio = traced / plain
    print(f"bundled model ({dev}, {torch.get_num_threads()} threads), {a.steps} steps, median of {a.repeats}: "
          f"untraced {plain:.3f} s, traced {traced:.3f} s")
    print(f"trace: {len(tr.layers)} layers, {tr.nbytes() / 1e6:.2f} MB, {per_step / 1e3:.1f} kB per step")
    print(f"capture_overhead_ratio={ratio:.3f} bytes_over_floor={over:.3f}")


if __name__ == "__main__":
    main()
