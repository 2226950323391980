"""DiscoLens command line: batch and scripted use of the same functions the app calls.

    python cli.py generate --prompt "a red circle" --seed 0 --steps 25 --out x.png [--json]
    python cli.py eval-generation --json
    python cli.py train-bundled [--unet-steps N] [--max-minutes M]

Every bad input exits non-zero with one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class UserError(Exception):
    """An input problem reported as one line on stderr."""


def _cmd_train_bundled(a: argparse.Namespace) -> int:
    from models.bundled_training import TrainConfig, train_bundled

    cfg = TrainConfig()
    for k in ("out_dir", "work_dir", "unet_steps", "vae_steps", "batch", "token_loss_weight", "max_minutes",
              "threads", "device", "n_images", "seed", "export_every", "checkpoint_every"):
        v = getattr(a, k)
        if v is not None:
            setattr(cfg, k, v)
    out = train_bundled(cfg)
    print(json.dumps({"out_dir": str(out)}))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from models.sampling import generate_image

    if not a.prompt or not a.prompt.strip():
        raise UserError("--prompt is empty")
    if a.steps < 1 or a.steps > 1000:
        raise UserError(f"--steps must be in 1..1000, got {a.steps}")
    from models.loading import load_pipeline

    pipe = load_pipeline(a.model)
    img = generate_image(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance=a.guidance)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        raise UserError(f"output folder does not exist: {out_dir}")
    img.save(a.out)
    if a.json:
        print(json.dumps({"out": a.out, "prompt": a.prompt, "seed": a.seed, "steps": a.steps,
                          "guidance": a.guidance, "model": a.model or "bundled", "size": list(img.size)}))
    return 0


def _cmd_eval_generation(a: argparse.Namespace) -> int:
    from interp.generation_eval import evaluate_generation
    from models.loading import load_pipeline

    pipe = load_pipeline(a.model)
    res = evaluate_generation(pipe, n_per_kind=a.n_per_kind, steps=a.steps, guidance=a.guidance, seed=a.seed)
    if a.json:
        print(json.dumps(res))
    else:
        for k in ("single", "relation", "count"):
            print(f"{k:9s} {res[k]:.3f}")
        print(f"n={res['n']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train-bundled", help="train (or resume) the bundled shapes-world model")
    t.add_argument("--out-dir", dest="out_dir")
    t.add_argument("--work-dir", dest="work_dir")
    t.add_argument("--unet-steps", dest="unet_steps", type=int)
    t.add_argument("--vae-steps", dest="vae_steps", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--token-loss-weight", dest="token_loss_weight", type=float)
    t.add_argument("--max-minutes", dest="max_minutes", type=float)
    t.add_argument("--threads", type=int)
    t.add_argument("--device")
    t.add_argument("--n-images", dest="n_images", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--export-every", dest="export_every", type=int)
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    t.set_defaults(fn=_cmd_train_bundled)

    g = sub.add_parser("generate", help="generate one image from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--out", required=True)
    g.add_argument("--model", default=None, help="hub id or local folder (default: the bundled model)")
    g.add_argument("--json", action="store_true")
    g.set_defaults(fn=_cmd_generate)

    e = sub.add_parser("eval-generation", help="score generations with the scene checker")
    e.add_argument("--model", default=None)
    e.add_argument("--n-per-kind", dest="n_per_kind", type=int, default=100)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_cmd_eval_generation)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user-facing error classes give one line, anything else a traceback
        from models.loading import ModelLoadError
        from models.world import CaptionError

        if isinstance(e, (ModelLoadError, CaptionError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
