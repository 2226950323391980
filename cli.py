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
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class UserError(Exception):
    """An input problem reported as one line on stderr."""


def _parse_kind_weights(items: list[str]) -> dict[str, float]:
    """`["count=3", "single=0.5"]` -> {"count": 3.0, "single": 0.5}, checked by the trainer's own check."""
    from models.training.bundled import check_kind_weights

    out = {}
    for it in items:
        kind, sep, val = it.partition("=")
        try:
            out[kind] = float(val)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--kind-weights takes KIND=WEIGHT (e.g. count=3); got {it!r}")
    try:
        return check_kind_weights(out)
    except ValueError as e:
        raise UserError(f"--kind-weights: {e}")


def _cmd_train_bundled(a: argparse.Namespace) -> int:
    from models.training.bundled import TrainConfig, loss_stages, train_bundled

    cfg = TrainConfig()
    for k in ("out_dir", "work_dir", "unet_steps", "vae_steps", "batch", "lr", "warmup", "token_loss_weight",
              "token_loss_layers", "pixel_loss_weight", "text_aux_weight", "max_minutes", "threads", "device", "n_images", "seed", "export_every",
              "checkpoint_every", "ema_decay"):
        v = getattr(a, k)
        if v is not None:
            setattr(cfg, k, v)
    if cfg.token_loss_weight < 0 or cfg.pixel_loss_weight < 0 or cfg.text_aux_weight < 0:
        raise UserError("loss weights must be >= 0")
    if cfg.lr <= 0 or cfg.warmup < 1:
        raise UserError("--lr must be > 0 and --warmup at least 1")
    if not 0 < cfg.ema_decay < 1:
        raise UserError("--ema-decay must be between 0 and 1 (exclusive)")
    if a.kind_weights:
        cfg.kind_weights = _parse_kind_weights(a.kind_weights)
    try:
        loss_stages(cfg.token_loss_layers)
    except ValueError as e:
        raise UserError(str(e))
    out = train_bundled(cfg)
    print(json.dumps({"out_dir": str(out)}))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    from models.sampling import generate_image

    if not a.prompt or not a.prompt.strip():
        raise UserError("--prompt is empty")
    if a.steps < 1 or a.steps > 1000:
        raise UserError(f"--steps must be in 1..1000, got {a.steps}")
    if a.guidance is not None and not 0 <= a.guidance <= 50:
        raise UserError(f"--guidance must be in 0..50, got {a.guidance}")
    if a.seed < 0:
        raise UserError(f"--seed must be non-negative, got {a.seed}")
    _check_out_dir(a.out)
    from models.loading import load_pipeline

    pipe = load_pipeline(a.model)
    from interp.tasks.workbench import validate_prompt

    try:
        validate_prompt(a.prompt, pipe.tokenizer)
    except ValueError as e:
        raise UserError(str(e))
    img = generate_image(pipe, a.prompt, seed=a.seed, steps=a.steps, guidance=a.guidance)
    img.save(a.out)
    if a.json:
        print(json.dumps({"out": a.out, "prompt": a.prompt, "seed": a.seed, "steps": a.steps,
                          "guidance": a.guidance if a.guidance is not None else pipe.discolens_defaults.guidance,
                          "model": a.model or "bundled", "size": list(img.size)}))
    return 0


def _cmd_sample_grid(a: argparse.Namespace) -> int:
    from interp.figures import sample_grid
    from interp.tasks.generation_eval import held_out_prompts, score_generations
    from models.loading import load_pipeline
    from models.sampling import generate_images

    if a.n_per_kind < 1:
        raise UserError("--n-per-kind must be at least 1")
    _check_out_dir(a.out)
    pipe = load_pipeline(a.model)
    caps = [c for _, c in held_out_prompts(a.n_per_kind, a.prompt_seed)]
    imgs = generate_images(pipe, caps, [a.seed + i for i in range(len(caps))], steps=a.steps, guidance=a.guidance)
    ok = [v["correct"] for v in score_generations(imgs, caps)]
    sample_grid(imgs, caps, ok, cols=a.cols).savefig(a.out, dpi=110)
    print(json.dumps({"out": a.out, "n": len(caps), "correct": sum(ok)}))
    return 0


def _cmd_eval_generation(a: argparse.Namespace) -> int:
    from interp.tasks.generation_eval import evaluate_generation
    from models.loading import load_pipeline

    if a.n_per_kind < 1:
        raise UserError("--n-per-kind must be at least 1")
    if not 1 <= a.steps <= 1000:
        raise UserError(f"--steps must be in 1..1000, got {a.steps}")
    pipe = load_pipeline(a.model)
    res = evaluate_generation(pipe, n_per_kind=a.n_per_kind, steps=a.steps, guidance=a.guidance, seed=a.seed)
    if a.json:
        print(json.dumps(res))
    else:
        for k in ("single", "relation", "count"):
            print(f"{k:9s} {res[k]:.3f}")
        print(f"n={res['n']}")
    return 0


def _check_out_dir(path: str) -> None:
    """The folder of an output file must exist (checked before the model runs, so no work is lost)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise UserError(f"output folder does not exist: {out_dir}")


def _load_benchmark(name: str):
    from models.shapes.benchmarks import load_benchmark

    try:
        return load_benchmark(name)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e).splitlines()[0])


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image not found: {path}")
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}")


def _check_vocab(pipe, prompts) -> None:
    from interp.tasks.matching import out_of_vocabulary

    for p in prompts:
        bad = out_of_vocabulary(pipe.tokenizer, p)
        if bad:
            raise UserError(f"words outside the model's vocabulary in {p!r}: {', '.join(bad)}")


def _match_options(a: argparse.Namespace, pipe):
    """MatchOptions from the scoring flags; timesteps are checked against the model's training schedule."""
    from interp.tasks.matching import MatchOptions
    from interp.tasks.matching_eval import SCORER_HOOKS
    from interp.tasks.matching_report import noise_level_timesteps

    n_train = int(pipe.scheduler.config.num_train_timesteps)
    if a.timesteps and a.noise_levels:
        raise UserError("give --timesteps or --noise-levels, not both")
    if a.noise_levels:
        try:
            ts = noise_level_timesteps(a.noise_levels, n_train)
        except ValueError as e:
            raise UserError(str(e))
    else:
        ts = tuple(a.timesteps) if a.timesteps else MatchOptions().timesteps
    if any(t < 0 or t >= n_train for t in ts):
        raise UserError(f"--timesteps must lie in 0..{n_train - 1}")
    # scorer hooks (auto / structure / head_weighted) have their own scorer_fn; their LSE options come from here
    scorer = "lse" if a.scorer in SCORER_HOOKS else a.scorer
    return MatchOptions(scorer=scorer, source=a.source, layers=a.layers, pooling=a.pooling, timesteps=ts,
                        noise_seed=a.noise_seed)


def _cmd_maps(a: argparse.Namespace) -> int:
    from interp.tasks.matching import word_maps_for_image
    from models.loading import load_pipeline

    img = _read_image(a.image)
    if not a.prompt or not a.prompt.strip():
        raise UserError("--prompt is empty")
    pipe = load_pipeline(a.model)
    n_train = pipe.scheduler.config.num_train_timesteps
    if not 0 <= a.timestep < n_train:
        raise UserError(f"--timestep must lie in 0..{n_train - 1}, got {a.timestep}")
    _check_vocab(pipe, [a.prompt])
    words, maps = word_maps_for_image(pipe, img, a.prompt, timestep=a.timestep)
    out = {"tokens": words, "maps": [[[round(float(v), 6) for v in row] for row in m] for m in maps.clamp(min=0)],
           "timestep": a.timestep, "aggregate": "mean over layers, heads; one noised UNet call",
           "size": [img.height, img.width]}
    print(json.dumps(out))
    return 0


def _scored(a: argparse.Namespace, min_count: int) -> dict:
    """Validate image and captions, load the model, score with the chosen scorer (one batched pass)."""
    from interp.tasks.matching import score_image_captions, validate_captions
    from models.loading import load_pipeline

    img = _read_image(a.image)
    try:
        caps = validate_captions(a.captions, min_count=min_count)
    except ValueError as e:
        raise UserError(str(e))
    pipe = load_pipeline(a.model)
    opts = _match_options(a, pipe)
    _check_vocab(pipe, caps)
    fn = _scorer_fn(a)
    with _attn_prompt(a, pipe):
        return fn(pipe, img, caps, opts) if fn else score_image_captions(pipe, img, caps, opts)


def _attn_prompt(a: argparse.Namespace, pipe):
    """apply_prompt context for --attn-prompt FILE (a no-op without it)."""
    from interp.tasks.prompt_learning import apply_prompt, load_prompt

    pr = None
    if getattr(a, "attn_prompt", None):
        try:
            pr = load_prompt(a.attn_prompt)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise UserError(f"cannot load attention prompt {a.attn_prompt}: {str(e).splitlines()[0]}")
    try:
        return apply_prompt(pipe, pr)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0])


def _scorer_fn(a: argparse.Namespace):
    """The scorer function of --scorer where it is not a plain MatchOptions scorer, else None."""
    from interp.tasks.matching_eval import SCORER_HOOKS, scorer_hook

    return scorer_hook(a.scorer, a.variant, a.grad_norm) if a.scorer in SCORER_HOOKS else None


def _jsonable(x):
    """numpy arrays (NaN -> None) as nested lists."""
    import numpy as np

    a = np.asarray(x, dtype=float)
    return [[None if np.isnan(v) else float(v) for v in row] for row in a]


def _cmd_rank(a: argparse.Namespace) -> int:
    from interp.lse import rank_captions

    ranked = rank_captions(_scored(a, min_count=2)["scores"])
    if a.json:
        print(json.dumps(ranked))
    else:
        for r in ranked:
            print(f"{r['score']:+.5f}  {r['caption']}")
    return 0


def _cmd_score(a: argparse.Namespace) -> int:
    res = _scored(a, min_count=1)
    out = {"scores": res["scores"], "unet_evals": res["unet_evals"],
           "breakdowns": {c: b.as_dict() for c, b in res.get("breakdowns", {}).items()}}
    if "routed_to" in res:
        out["routed_to"] = res["routed_to"]
    if "per_caption" in res:  # head weighting: attribution tables [layers, heads] per caption
        out["layers"] = res["layers"]
        out["per_caption"] = {c: {"score": d["score"], "plain_score": d["plain_score"],
                                  "table": _jsonable(d["table"])} for c, d in res["per_caption"].items()}
    print(json.dumps(out) if a.json else "\n".join(f"{v:+.5f}  {c}" for c, v in res["scores"].items()))
    return 0


def _cmd_eval_grounding(a: argparse.Namespace) -> int:
    from interp.tasks.grounding_eval import evaluate_grounding
    from models.loading import load_pipeline

    if a.n_scenes < 2:
        raise UserError("--n-scenes must be at least 2 (half calibrate the best layer / head)")
    pipe = load_pipeline(a.model)
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    if any(t < 0 or t >= n_train for t in a.timesteps):
        raise UserError(f"--timesteps must lie in 0..{n_train - 1}")
    res = evaluate_grounding(pipe, n_scenes=a.n_scenes, timesteps=a.timesteps, return_rows=bool(a.atlas_dir))
    if a.generations:
        from interp.tasks.grounding_eval import evaluate_generation_grounding

        res["generations"] = evaluate_generation_grounding(pipe, n_per_kind=a.generations)
    if a.atlas_dir:
        from interp.head_atlas import atlas_table, save_atlas

        save_atlas(atlas_table(res.pop("rows")), a.atlas_dir)
        res["atlas_dir"] = a.atlas_dir
    if a.json:
        print(json.dumps(res))
    else:
        for name, by in res["aggregates"].items():
            line = "  ".join(f"{c}: pt {m['pointing']:.2f} en {m['energy']:.2f} iou {m['iou']:.2f}" for c, m in by.items())
            print(f"{name:10s} {line}")
    return 0


def _cmd_eval_matching(a: argparse.Namespace) -> int:
    from interp.tasks.matching_eval import evaluate_matching
    from models.loading import load_pipeline

    bench = _load_benchmark(a.benchmark)
    if a.limit is not None and a.limit < 1:
        raise UserError("--limit must be at least 1")
    fn = _scorer_fn(a)
    # under `accelerate launch` / torchrun every process scores a share of the items on its own device
    from interp.tasks.matching_eval import distributed_state

    state = distributed_state()
    pipe = load_pipeline(a.model, device=str(state.device) if state else None)
    opts = _match_options(a, pipe)
    with _attn_prompt(a, pipe):
        res = evaluate_matching(pipe, bench, opts, split=a.split, limit=a.limit, per_item=False, scorer_fn=fn)
    res["unet_calls_per_pair"] = res["unet_evals_per_pair"]  # the outside-check contract's name
    res["per_split"] = res["by_type"]  # accuracy per hard-negative split (attribute swap, role swap, ...)
    res["processes"] = state.num_processes if state else 1
    if state:  # every rank leaves the gloo group together: exiting with it alive can abort a rank (SIGABRT)
        state.wait_for_everyone()
        state.destroy_process_group()
        if not state.is_main_process:
            return 0
    if a.json:
        print(json.dumps(res))
    else:
        print(json.dumps({k: res[k] for k in ("metrics", "chance", "unet_evals_per_pair")}, indent=1))
    return 0


def _cmd_report_matching(a: argparse.Namespace) -> int:
    from interp.tasks.matching_report import GROUPS, report_markdown, run_report
    from models.loading import load_pipeline

    groups = a.groups or list(GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise UserError(f"unknown --groups {' '.join(bad)}; choose from {' '.join(GROUPS)}")
    benches = [_load_benchmark(name) for name in a.benchmarks]
    for flag, v in (("--limit", a.limit), ("--schedule-steps", a.schedule_steps), ("--prompt-steps", a.prompt_steps)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be at least 1")
    if a.scorer not in ("auto", "lse") or a.attn_prompt:
        raise UserError("the report varies the scorer and prompts itself: leave --scorer and --attn-prompt unset")
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        raise UserError(f"--out is a file, not a folder: {a.out}")
    pipe = load_pipeline(a.model)
    opts = _match_options(a, pipe)

    def progress(r):
        print(f"{r['group']:9s} {r['benchmark']:10s} {r['value']:.3f}  {r['label']}  ({r['seconds']:.0f} s)",
              file=sys.stderr, flush=True)

    rows = run_report(pipe, benches, groups, opts, split=a.split, limit=a.limit,
                      schedule_steps=a.schedule_steps, prompt_steps=a.prompt_steps, progress=progress)
    command = "python cli.py report-matching " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report-matching"] else None
    md = report_markdown(rows, command=command)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump({"command": command, "model": a.model or "bundled", "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(md + "\n")
    print(json.dumps({"rows": rows}) if a.json else md)
    return 0


def _cmd_train_prompt(a: argparse.Namespace) -> int:
    from models.loading import load_pipeline
    from interp.tasks.prompt_learning import save_prompt, train_prompt

    if a.steps < 1:
        raise UserError("--steps must be at least 1")
    bench = _load_benchmark(a.benchmark)
    _check_out_dir(a.out)
    pipe = load_pipeline(a.model)
    opts = _match_options(a, pipe)

    def progress(entry):
        if not a.json:
            print(f"step {entry.get('step', '?')}: loss {entry['loss']:.4f}", file=sys.stderr)

    prompt, log = train_prompt(pipe, bench, opts, steps=a.steps, lr=a.lr, margin=a.margin, variant=a.variant_prompt,
                               seed=a.seed, callback=progress)
    save_prompt(prompt, a.out)
    res = {"out": a.out, "steps": a.steps, "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}
    print(json.dumps(res) if a.json else f"saved {a.out}: loss {res['first_loss']:.4f} -> {res['last_loss']:.4f}")
    return 0


def _add_match_args(p: argparse.ArgumentParser, inputs: bool = True) -> None:
    from interp.lse import POOLINGS
    if inputs:
        p.add_argument("--image", required=True)
        p.add_argument("--captions", nargs="*", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--scorer", choices=["auto", "lse", "denoise", "denoise_norm", "structure", "head_weighted"],
                   default="auto", help="auto (default, the best in docs/measurements/matching_report_step1807): "
                   "structure-aware where the captions share their content words, else the denoising error")
    p.add_argument("--variant", choices=["eq7", "gxa"], default="eq7",
                   help="head_weighted: A_h x sum over heads of df/dA (Eq. 7) or A_h x df/dA_h")
    p.add_argument("--grad-norm", dest="grad_norm", choices=["none", "mean_abs"], default="none")
    p.add_argument("--attn-prompt", dest="attn_prompt", default=None, metavar="FILE",
                   help="a learned attention prompt (cli.py train-prompt) applied while scoring")
    p.add_argument("--source", choices=["probs", "logits"], default="logits")
    p.add_argument("--layers", default=None, help="default all; 'last_per_stage' = the authors' code")
    p.add_argument("--pooling", choices=list(POOLINGS), default="lse")
    p.add_argument("--timesteps", type=int, nargs="+", default=None)
    p.add_argument("--noise-levels", dest="noise_levels", type=float, nargs="+", default=None,
                   help="noise levels in (0, 1) instead of --timesteps: t = round(level * T), e.g. 0.2 0.4 0.6 0.8")
    p.add_argument("--noise-seed", dest="noise_seed", type=int, default=0)
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from interp.tasks.matching_report import GROUPS
    p = argparse.ArgumentParser(prog="cli.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train-bundled", help="train (or resume) the bundled shapes-world model")
    t.add_argument("--out-dir", dest="out_dir")
    t.add_argument("--work-dir", dest="work_dir")
    t.add_argument("--unet-steps", dest="unet_steps", type=int)
    t.add_argument("--vae-steps", dest="vae_steps", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--lr", type=float, help="peak learning rate of the UNet + text encoder (default 1e-3)")
    t.add_argument("--warmup", type=int, help="linear warm-up steps from each (re)start from exported weights (default 200)")
    t.add_argument("--token-loss-weight", dest="token_loss_weight", type=float)
    t.add_argument("--token-loss-layers", dest="token_loss_layers", default=None,
                   help="layers the grounding losses see: all (default) or stages, e.g. mid,up")
    t.add_argument("--pixel-loss-weight", dest="pixel_loss_weight", type=float,
                   help="TokenCompose's pixel-level BCE term (default 0: off)")
    t.add_argument("--text-aux-weight", dest="text_aux_weight", type=float,
                   help="scene-parsing probes on the text encoder's states (models/text_aux.py; default 0.1, 0 = off)")
    t.add_argument("--kind-weights", dest="kind_weights", nargs="+", metavar="KIND=WEIGHT",
                   help="batch sampling weight per scene kind over the cached data (default count=3; count=1 = uniform)")
    t.add_argument("--ema-decay", dest="ema_decay", type=float, help="EMA decay of the exported weights (default 0.999)")
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

    sg = sub.add_parser("sample-grid", help="a grid of generations with each prompt under its image")
    sg.add_argument("--out", required=True)
    sg.add_argument("--model", default=None)
    sg.add_argument("--n-per-kind", dest="n_per_kind", type=int, default=6)
    sg.add_argument("--cols", type=int, default=6)
    sg.add_argument("--steps", type=int, default=25)
    sg.add_argument("--guidance", type=float, default=None)
    sg.add_argument("--seed", type=int, default=0)
    sg.add_argument("--prompt-seed", dest="prompt_seed", type=int, default=777)
    sg.set_defaults(fn=_cmd_sample_grid)

    e = sub.add_parser("eval-generation", help="score generations with the scene checker")
    e.add_argument("--model", default=None)
    e.add_argument("--n-per-kind", dest="n_per_kind", type=int, default=100)
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=None)
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--json", action="store_true")
    e.set_defaults(fn=_cmd_eval_generation)

    m = sub.add_parser("maps", help="word maps of a real image and a prompt (one noised UNet call)")
    m.add_argument("--image", required=True)
    m.add_argument("--prompt", required=True)
    m.add_argument("--timestep", type=int, default=300)
    m.add_argument("--model", default=None)
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=_cmd_maps)

    eg = sub.add_parser("eval-grounding", help="faithfulness of attention maps on held-out renders")
    eg.add_argument("--model", default=None)
    eg.add_argument("--n-scenes", dest="n_scenes", type=int, default=60)
    eg.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700])
    eg.add_argument("--generations", type=int, default=0,
                    help="also score maps traced while generating this many held-out prompts per kind")
    eg.add_argument("--atlas-dir", dest="atlas_dir", default=None,
                    help="write the head atlas (atlas.json + atlas.png) to this folder")
    eg.add_argument("--json", action="store_true")
    eg.set_defaults(fn=_cmd_eval_grounding)

    r = sub.add_parser("rank", help="rank captions for an image, best first")
    _add_match_args(r)
    r.set_defaults(fn=_cmd_rank)
    sc = sub.add_parser("score", help="score captions for an image (with the per-layer x per-timestep breakdown)")
    _add_match_args(sc)
    sc.set_defaults(fn=_cmd_score)
    em = sub.add_parser("eval-matching", help="run a matching benchmark (winoground, comvg, counting, refcocog)")
    em.add_argument("--benchmark", required=True)
    em.add_argument("--split", choices=["train", "test", "all"], default="test")
    em.add_argument("--limit", type=int, default=None)
    _add_match_args(em, inputs=False)
    em.set_defaults(fn=_cmd_eval_matching)

    rm = sub.add_parser("report-matching", help="the Discffusion report: each of the paper's claims on the benchmarks")
    rm.add_argument("--benchmarks", nargs="+", default=["winoground", "comvg", "counting", "refcocog"])
    rm.add_argument("--groups", nargs="+", default=None, help="default all: " + " ".join(GROUPS))
    rm.add_argument("--split", choices=["train", "test", "all"], default="test")
    rm.add_argument("--limit", type=int, default=None)
    rm.add_argument("--schedule-steps", dest="schedule_steps", type=int, default=10)
    rm.add_argument("--prompt-steps", dest="prompt_steps", type=int, default=50)
    rm.add_argument("--out", default=None, help="folder for report.json + report.md")
    _add_match_args(rm, inputs=False)
    rm.set_defaults(fn=_cmd_report_matching)

    tp = sub.add_parser("train-prompt", help="few-shot attention prompt learning on a benchmark's train split")
    tp.add_argument("--benchmark", required=True)
    tp.add_argument("--out", required=True)
    tp.add_argument("--steps", type=int, default=50)
    tp.add_argument("--lr", type=float, default=1e-3)
    tp.add_argument("--margin", type=float, default=0.2)
    tp.add_argument("--prompt-variant", dest="variant_prompt", choices=["additive", "lora"], default="additive")
    tp.add_argument("--seed", type=int, default=0)
    _add_match_args(tp, inputs=False)
    tp.set_defaults(fn=_cmd_train_prompt)
    return p


def _quiet() -> None:
    """No progress bars or warnings from the libraries on stderr (stderr is for our one-line errors)."""
    import warnings

    warnings.filterwarnings("ignore")
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    dl.disable_progress_bar()
    tl.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd != "train-bundled":
        _quiet()
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # known user-facing error classes give one line, anything else a traceback
        from models.loading import ModelLoadError
        from models.shapes.world import CaptionError

        if isinstance(e, (ModelLoadError, CaptionError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
