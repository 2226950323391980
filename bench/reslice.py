"""How long a selector change in the Generate & look tab takes: re-slicing the stored trace, no model run.

    python -m bench.reslice [--changes 200] [--model shapes-v1] [--out docs/measurements/reslice.json]

Generates once (traced, with previews and queries), then times random changes of each selector exactly as the
app's handlers compute them (overlays included, transport excluded): the explorer's layer / head / step, the
timestep player's step and word, and the model view (layers x heads thumbnails). Prints medians and p95 in ms.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from interp.tasks import inputs
from interp.tasks.workbench import model_view, slice_choices, slice_overlays, step_frame


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="a red circle left of a blue square")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    gen = inputs.traced_generation(a.model, a.prompt, seed=0)
    ch = slice_choices(gen.trace)
    rng = random.Random(0)
    n_steps, n_words = gen.trace.n_steps, len(gen.words)
    views = {
        "explorer (layer / head / step)": lambda: slice_overlays(gen.image, gen, rng.choice(ch["layers"]), "all",
                                                                 rng.choice(ch["steps"])),
        "explorer, one head": lambda: slice_overlays(gen.image, gen, rng.choice(ch["layers"][1:]),
                                                     rng.choice(ch["heads"][1:2]), "all"),
        "timestep player (step, word)": lambda: step_frame(gen, rng.randrange(n_words), rng.randrange(n_steps)),
        "model view (layers x heads)": lambda: model_view(gen, rng.randrange(n_words), rng.randrange(n_steps)),
    }
    for fn in views.values():  # warm up (imports, colormaps)
        fn()
    out = {"model": a.model or "shapes-v1", "prompt": a.prompt, "changes_per_view": a.changes,
           "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
           "trace_bytes": gen.trace.nbytes(), "views": {}}
    all_ms = []
    for name, fn in views.items():
        ms = [_ms(fn) for _ in range(a.changes)]
        all_ms += ms
        q = statistics.quantiles(ms, n=20)
        out["views"][name] = {"median_ms": round(statistics.median(ms), 2), "p95_ms": round(q[18], 2)}
    out["median_ms_all"] = round(statistics.median(all_ms), 2)
    out["goal_ms"] = 100
    text = json.dumps(out, indent=1)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
