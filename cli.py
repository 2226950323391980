"""DiscoLens command line: batch and scripted use of the same task functions the app calls.

Commands (each calls one function of `interp.tasks.inputs`, which checks its inputs once):
    train-bundled     train (or resume) the bundled shapes-world model; one flag per TrainConfig field
    generate          generate one image from a prompt
    sample-grid       a grid of held-out generations with each prompt under its image
    eval-generation   score held-out generations with the scene checker
    maps              word maps of a real image and a prompt (one noised UNet call)
    eval-grounding    faithfulness of attention maps on held-out renders (and the head atlas)
    rank              rank captions for an image, best first
    score             score captions for an image, with the scorer's breakdown
    eval-matching     run a matching benchmark (winoground, comvg, counting, refcocog) with one scorer
    report-matching   the Discffusion report: each of the paper's claims on the benchmarks
    train-prompt      few-shot attention prompt learning on a benchmark's train split
    train-dpt         train the DPT discriminative adapter (stage 1; --stage 2 adds a LoRA), resumable
    ground            the box of a referring expression, from the DPT adapter
    caption           caption an image by masked text diffusion (D-DiT), every reverse step recorded
    vqa               answer a question about an image by masked text diffusion
    eval-text-diffusion  captioning and VQA accuracy on held-out scenes, beside ranking-based answers
    train-text-diffusion train (or resume) the text denoiser on UNet features (frozen or dual mode)
    causal-maps       suppress one word's attention and see what the checker says changed (faithful vs plain)

    python cli.py generate --prompt "a red circle" --seed 0 --steps 25 --out x.png [--json]
    python cli.py rank --image x.png --captions "a red circle" "a blue square" --scorer auto --json

Every bad input exits 2 with one line on stderr: the same message the app shows.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

# the scorer registry and TrainConfig define flags, so `--help` imports the model stack anyway: no lazy imports
import diffusers.utils.logging as diffusers_logging
import numpy as np
import transformers.utils.logging as transformers_logging

from interp.head_atlas import atlas_table
from interp.lse import POOLINGS
from interp.scorers import DEFAULT_SCORER, ScoreResult, get_scorer, scorer_names
from interp.scorers.head_weighted import VARIANTS
from interp.tasks import inputs
from interp.tasks.causal_eval import run_causal_maps
from interp.tasks.faithfulness import save_atlas
from interp.tasks.generation_eval import SPLITS
from interp.tasks.matching_eval import distributed_state
from interp.tasks.matching_report import GROUPS, report_markdown
from interp.tasks.prompt_learning import save_prompt
from interp.tasks.self_correction import OBJECTIVES, READINGS, READS
from interp.tasks.text_diffusion import ORDERS, answer_question, caption_image, evaluate_text_diffusion
from models.adapters.dpt import REC_HEADS
from models.limits import (
    DEFAULT_CORRECTION_ETA,
    MAX_BEST_OF,
    MAX_CORRECTION_ETA,
    MAX_GUIDANCE,
    MAX_PER_KIND,
    MAX_SEED,
    MAX_STEPS,
    check_int,
    check_seed,
    read_image,
    user_message,
)
from models.loading import ModelLoadError, model_step
from models.training.bundled import TrainConfig, train_bundled
from models.training.common import add_config_flags, config_from_flags
from models.training.dpt import DPTTrainConfig, train_dpt
from models.training.dpt_rec import RecTrainConfig, train_rec_head
from models.training.text_diffusion import TextDiffusionConfig, train_text_diffusion


def _check_out_dir(path: str) -> None:
    """The folder of an output file must exist (checked before the model runs, so no work is lost)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise ValueError(f"output folder does not exist: {out_dir}")


def _match_kwargs(a: argparse.Namespace) -> dict:
    """The scoring options of `_add_match_args`' flags, for `interp.tasks.inputs`."""
    return dict(timesteps=a.timesteps, noise_levels=a.noise_levels, source=a.source, layers=a.layers,
                pooling=a.pooling, noise_seed=a.noise_seed)


def _scorer_kwargs(a: argparse.Namespace) -> dict:
    return dict(variant=a.variant, grad_norm=a.grad_norm, prompt_file=a.attn_prompt)


def _jsonable(x):
    """numpy arrays (NaN -> None) as nested lists."""
    arr = np.asarray(x, dtype=float)
    return [[None if np.isnan(v) else float(v) for v in row] for row in arr]


def score_json(res: ScoreResult) -> dict:
    """The JSON object of `score`: scores, unet_evals, breakdowns, and where the scorer has them routed_to and
    the head attribution tables (layers, per_caption)."""
    parts = res.breakdown or res.structure or {}
    out = {"scores": res.by_caption, "unet_evals": res.unet_evals,
           "breakdowns": {c: b.as_dict() for c, b in parts.items()}}
    if res.routed_to is not None:
        out["routed_to"] = res.routed_to
    if res.heads is not None:  # head weighting: attribution tables [layers, heads] per caption
        out["layers"] = res.heads["layers"]
        out["per_caption"] = {c: {"score": d["score"], "plain_score": d["plain_score"], "table": _jsonable(d["table"])}
                              for c, d in res.heads["per_caption"].items()}
    return out


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _cmd_train_bundled(a: argparse.Namespace) -> int:
    out = train_bundled(config_from_flags(a, TrainConfig))
    print(json.dumps({"out_dir": str(out)}))
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    _check_out_dir(a.out)
    if a.trajectory_out and not a.self_correct:
        raise ValueError("--trajectory-out needs --self-correct")
    if a.step_range is not None and not a.self_correct:
        raise ValueError("--step-range needs --self-correct")
    if a.best_of is not None:
        if a.self_correct:
            raise ValueError("--best-of and --self-correct are two ways to steer: choose one")
        image, info = inputs.best_of_generation(a.model, a.prompt, seed=a.seed, n=a.best_of, steps=a.steps,
                                                guidance=a.guidance, lora=a.lora)
        image.save(a.out)
        if a.json:
            print(json.dumps({"out": a.out, "prompt": a.prompt, "model": a.model or "bundled", "lora": a.lora,
                              "best_of": len(info["seeds"]), "seed": info["seed"], "seeds": info["seeds"],
                              "scores": info["scores"], "unet_calls": info["unet_calls"], "size": list(image.size)}))
        return 0
    if a.self_correct:
        if a.trajectory_out:
            _check_out_dir(a.trajectory_out)  # its parent folder must exist; the folder is made
        image, traj = inputs.self_corrected_generation(a.model, a.prompt, seed=a.seed, steps=a.steps,
                                                       guidance=a.guidance, eta=a.eta, reading=a.reading,
                                                       lora=a.lora, objective=a.objective, read=a.read,
                                                       step_range=a.step_range)
        image.save(a.out)
        if a.trajectory_out:
            traj.save(a.trajectory_out)
        if a.json:
            nan_free = lambda xs: [None if x != x else float(x) for x in xs]  # NaN outside the step range
            print(json.dumps({"out": a.out, "prompt": a.prompt, "seed": int(a.seed), "eta": float(a.eta),
                              "reading": a.reading, "objective": a.objective, "negatives": traj.negatives,
                              "read": traj.read, "step_range": traj.step_range,
                              "model": a.model or "bundled", "lora": a.lora,
                              "size": list(image.size),
                              "trajectory": {"score": nan_free(traj.s_before), "score_after": nan_free(traj.s_after),
                                             "grad_norm": nan_free(traj.grad_norm),
                                             "latent_change": nan_free(traj.latent_change)}}))
        return 0
    gen = inputs.generate_image(a.model, a.prompt, seed=a.seed, steps=a.steps, guidance=a.guidance, lora=a.lora)
    gen.image.save(a.out)
    if a.json:
        print(json.dumps({"out": a.out, "prompt": gen.prompt, "seed": gen.seed, "steps": gen.steps,
                          "guidance": gen.guidance, "model": a.model or "bundled", "lora": a.lora,
                          "size": list(gen.image.size)}))
    return 0


def _image_arg(path: str):
    """The model's pipeline and the checked image of --image (the same checks as the app's uploads)."""
    return read_image(path)


def _cmd_caption(a: argparse.Namespace) -> int:
    img = _image_arg(a.image)
    res = caption_image(img, pipe=inputs.load_model(a.model), seed=check_seed(a.seed),
                        steps=None if a.steps is None else check_int(a.steps, "--steps", 1, MAX_STEPS),
                        order=a.order)
    print(json.dumps(res.to_json()) if a.json else res.to_json()["caption"])
    return 0


def _cmd_vqa(a: argparse.Namespace) -> int:
    img = _image_arg(a.image)
    res = answer_question(img, a.question, pipe=inputs.load_model(a.model), seed=check_seed(a.seed),
                          steps=None if a.steps is None else check_int(a.steps, "--steps", 1, MAX_STEPS),
                          order=a.order)
    print(json.dumps(res.to_json()) if a.json else res.to_json()["answer"])
    return 0


def _cmd_eval_text_diffusion(a: argparse.Namespace) -> int:
    n = check_int(a.n_scenes, "--n-scenes", 1, MAX_PER_KIND)
    split = inputs.check_choice(a.split, ("validation", "test"), "split")
    res = evaluate_text_diffusion(pipe=inputs.load_model(a.model), n_scenes=n, split=split,
                                  ranking=not a.no_ranking, progress=False)
    print(json.dumps(res) if a.json else json.dumps(res, indent=1))
    return 0


def _cmd_train_text_diffusion(a: argparse.Namespace) -> int:
    cfg = config_from_flags(a, TextDiffusionConfig)
    out = train_text_diffusion(cfg)
    print(json.dumps({"out": str(out), "mode": cfg.mode, "steps": cfg.steps}))
    return 0


def _cmd_ground(a: argparse.Namespace) -> int:
    res = inputs.ground_expression(a.model, a.image, a.expression, noise_seed=a.noise_seed)
    print(json.dumps({"box": [float(v) for v in res["box"]], "score": float(res["score"]),
                      "expression": res.get("expression", a.expression)}))
    return 0


def _check_init_adapter(folder: str) -> None:
    """--init-adapter must name a folder holding a trained DPT adapter."""
    if not (Path(folder) / "adapter.safetensors").exists():
        raise ValueError(f"--init-adapter: no trained adapter in {folder} (train one with train-dpt --stage 1)")


def _cmd_train_dpt(a: argparse.Namespace) -> int:
    if str(a.stage).strip().lower() == "rec":
        return _train_dpt_rec(a)
    if str(a.stage).strip() not in ("1", "2"):
        raise ValueError(f"--stage must be 1, 2 or rec, got {a.stage!r}")
    stage = int(str(a.stage).strip())
    rec_flags = (("--rec-head", "rec_head"), ("--vl-layers", "vl_layers"),
                 ("--vl-pool", "vl_pool"), ("--n-rec-train", "n_train"), ("--n-rec-val", "n_val"))
    rec_only = [f for f, d in rec_flags if getattr(a, d) is not None]
    if rec_only:
        raise ValueError(f"{', '.join(rec_only)}: only with --stage rec")
    cfg = config_from_flags(a, DPTTrainConfig)
    if stage == 2 and not cfg.lora_rank:
        cfg.lora_rank = 4  # the paper's rank
    if stage == 1:
        cfg.lora_rank = 0
    if a.init_adapter is not None:
        _check_init_adapter(a.init_adapter)
    pipe = inputs.load_model(a.model)
    train_dpt(pipe, cfg, a.work_dir, init_from=a.init_adapter)
    print(json.dumps({"work_dir": a.work_dir, "stage": stage, "steps": cfg.steps,
                      "next": "choose a snapshot on validation (python -m bench.dpt_eval), then export_adapter"}))
    return 0


def _train_dpt_rec(a: argparse.Namespace) -> int:
    """--stage rec: the grounding head of a trained adapter on cached features (models.training.dpt_rec)."""
    cfg = config_from_flags(a, RecTrainConfig)  # the shared flags (--steps, --batch, --lr, ...) and the rec ones
    cfg.vl_layers = check_int(cfg.vl_layers, "--vl-layers", 1, 8)
    cfg.vl_pool = check_int(cfg.vl_pool, "--vl-pool", 1, 8)
    cfg.n_train = check_int(cfg.n_train, "--n-rec-train", 1, 100_000)
    cfg.n_val = check_int(cfg.n_val, "--n-rec-val", 1, 10_000)
    _check_init_adapter(cfg.init_adapter)
    pipe = inputs.load_model(a.model)
    train_rec_head(pipe, cfg, a.work_dir)
    print(json.dumps({"work_dir": a.work_dir, "stage": "rec", "steps": cfg.steps,
                      "next": "choose a snapshot on validation (val_acc in log.jsonl), then export_adapter"}))
    return 0


def _cmd_sample_grid(a: argparse.Namespace) -> int:
    _check_out_dir(a.out)
    fig, n, correct = inputs.sample_grid(a.model, a.n_per_kind, a.cols, steps=a.steps, guidance=a.guidance,
                                         seed=a.seed, prompt_seed=a.prompt_seed)
    fig.savefig(a.out, dpi=110)
    print(json.dumps({"out": a.out, "n": n, "correct": correct}))
    return 0


def _cmd_eval_generation(a: argparse.Namespace) -> int:
    res = inputs.evaluate_generation(a.model, a.n_per_kind, steps=a.steps, guidance=a.guidance, seed=a.seed,
                                     split=a.split, lora=a.lora)
    if a.json:
        print(json.dumps(res))
    else:
        for k in ("single", "relation", "count"):
            print(f"{k:9s} {res[k]:.3f}")
        print(f"n={res['n']}")
    return 0


def _cmd_causal_maps(a: argparse.Namespace) -> int:
    n = check_int(a.n, "--n", 1, MAX_PER_KIND)
    seed, batch = check_seed(a.seed), check_int(a.batch_size, "--batch-size", 1, 64)
    _check_out_dir(a.out)
    for m in a.models:  # every model loads (cached) before the first one runs, so a bad name loses no work
        inputs.load_model(m, device="cpu")
    summary = run_causal_maps(a.models, n, Path(a.out), seed, batch, "python cli.py " + " ".join(sys.argv[1:]))
    print(json.dumps(summary))
    return 0


def _cmd_maps(a: argparse.Namespace) -> int:
    img, words, maps = inputs.word_maps(a.model, a.image, a.prompt, timestep=a.timestep)
    out = {"tokens": words, "maps": [[[round(float(v), 6) for v in row] for row in m] for m in maps.clamp(min=0)],
           "timestep": int(float(a.timestep)), "aggregate": "mean over layers, heads; one noised UNet call",
           "size": [img.height, img.width]}
    print(json.dumps(out))
    return 0


def _scored(a: argparse.Namespace, min_count: int) -> ScoreResult:
    return inputs.score_captions(a.model, a.image, a.captions, a.scorer, min_count=min_count, **_scorer_kwargs(a),
                                 **_match_kwargs(a))


def _cmd_rank(a: argparse.Namespace) -> int:
    ranked = [{"caption": c, "score": s} for c, s in _scored(a, min_count=2).ranking()]
    if a.json:
        print(json.dumps(ranked))
    else:
        for r in ranked:
            print(f"{r['score']:+.5f}  {r['caption']}")
    return 0


def _cmd_score(a: argparse.Namespace) -> int:
    res = _scored(a, min_count=1)
    print(json.dumps(score_json(res)) if a.json else "\n".join(f"{v:+.5f}  {c}" for c, v in zip(res.captions, res.scores)))
    return 0


def _cmd_eval_grounding(a: argparse.Namespace) -> int:
    res = inputs.evaluate_grounding(a.model, n_scenes=a.n_scenes, timesteps=a.timesteps, generations=a.generations,
                                    return_rows=bool(a.atlas_dir))
    if a.atlas_dir:
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
    # under `accelerate launch` / torchrun every process scores a share of the items on its own device
    state = distributed_state()
    res = inputs.evaluate_matching(a.model, a.benchmark, a.scorer, split=a.split, limit=a.limit,
                                   device=str(state.device) if state else None, **_scorer_kwargs(a),
                                   **_match_kwargs(a))
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
    if a.scorer is not None or a.attn_prompt:
        raise ValueError("the report varies the scorer and prompts itself: leave --scorer and --attn-prompt unset")
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out is a file, not a folder: {a.out}")
    if a.pair and not a.from_json:
        raise ValueError("--pair works on saved rows: give --from-json REPORT_JSON ... with it")
    this = "python cli.py report-matching " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["report-matching"] else None
    if a.from_json:
        rows, made, model, step = inputs.report_rows_from_json(a.from_json)
        commands = made + ([this] if this else [])
    else:
        def progress(r):
            print(f"{r['group']:9s} {r['benchmark']:10s} {r['value']:.3f}  {r['label']}  ({r['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)

        rows = inputs.report_matching(a.model, a.benchmarks, a.groups, split=a.split, limit=a.limit,
                                      schedule_steps=a.schedule_steps, prompt_steps=a.prompt_steps, progress=progress,
                                      noise_seeds=a.noise_seeds, **_match_kwargs(a))
        commands, model, step = [this] if this else [], a.model or "bundled", model_step(a.model)
    md = report_markdown(rows, command=commands, model=model, unet_step=step, pairs=[tuple(x) for x in a.pair or []])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "report.json"), "w") as f:
            json.dump({"command": commands[-1] if commands else None, "commands": commands, "model": model,
                       "unet_step": step, "rows": rows}, f, indent=1)
        with open(os.path.join(a.out, "report.md"), "w") as f:
            f.write(md + "\n")
    print(json.dumps({"rows": rows}) if a.json else md)
    return 0


def _cmd_train_prompt(a: argparse.Namespace) -> int:
    _check_out_dir(a.out)

    def progress(entry):
        if not a.json:
            print(f"step {entry.get('step', '?')}: loss {entry['loss']:.4f}", file=sys.stderr)

    prompt, log = inputs.train_prompt(a.model, a.benchmark, steps=a.steps, lr=a.lr, margin=a.margin,
                                      variant=a.variant_prompt, seed=a.seed, callback=progress, **_match_kwargs(a))
    save_prompt(prompt, a.out)
    res = {"out": a.out, "steps": len(log), "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"]}
    print(json.dumps(res) if a.json else f"saved {a.out}: loss {res['first_loss']:.4f} -> {res['last_loss']:.4f}")
    return 0


# ----------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# numbers checked by models.limits (they arrive as text, so "1e20" or "nan" get the app's message, not argparse's)
NUMBER = "N"


def _add_sampling_args(p: argparse.ArgumentParser, seed: int | None) -> None:
    p.add_argument("--steps", default=None, metavar=NUMBER, help=f"denoising steps, 1..{MAX_STEPS} (default: the model's)")
    p.add_argument("--guidance", default=None, metavar=NUMBER,
                   help=f"classifier-free guidance, 0..{MAX_GUIDANCE:g} (default: the model's)")
    p.add_argument("--seed", default=seed, metavar=NUMBER,
                   help=f"0..{MAX_SEED} (default {seed if seed is not None else 'the split’s noise seed'})")
    p.add_argument("--model", default=None, help="bundled name, local folder or hub id (default: the bundled model)")


def _add_match_args(p: argparse.ArgumentParser, inputs_: bool = True, scorer: bool = True) -> None:
    if inputs_:
        p.add_argument("--image", required=True)
        p.add_argument("--captions", nargs="*", required=True)
    p.add_argument("--model", default=None)
    if scorer:
        names = scorer_names()
        p.add_argument("--scorer", default=None, metavar="{" + ",".join(names) + "}",
                       help=f"default {DEFAULT_SCORER}; " + "; ".join(get_scorer(n).label for n in names))
        p.add_argument("--variant", choices=list(VARIANTS), default=None,
                       help="head_weighted: A_h x sum over heads of df/dA (eq7, default) or A_h x df/dA_h (gxa)")
        p.add_argument("--grad-norm", dest="grad_norm", choices=["none", "mean_abs"], default=None,
                       help="head_weighted: gradient normalisation (default none)")
        p.add_argument("--attn-prompt", dest="attn_prompt", default=None, metavar="FILE",
                       help="a learned attention prompt (cli.py train-prompt) applied while scoring")
    p.add_argument("--source", choices=["probs", "logits"], default="logits")
    p.add_argument("--layers", default=None, help="default all; 'last_per_stage' = the authors' code")
    p.add_argument("--pooling", choices=list(POOLINGS), default="lse")
    p.add_argument("--timesteps", nargs="+", default=None, metavar=NUMBER,
                   help="training timesteps of the noised pass (default 200 400 600 800)")
    p.add_argument("--noise-levels", dest="noise_levels", type=float, nargs="+", default=None,
                   help="noise levels in (0, 1) instead of --timesteps: t = round(level * T), e.g. 0.2 0.4 0.6 0.8")
    p.add_argument("--noise-seed", dest="noise_seed", default=0, metavar=NUMBER)
    p.add_argument("--json", action="store_true")


def _command_lines() -> dict[str, str]:
    """{command: its one-line help}, from the module docstring's list (one source for both)."""
    lines = __doc__.split("Commands")[1].split("\n\n")[0].splitlines()[1:]
    return {ln.split()[0]: " ".join(ln.split()[1:]) for ln in lines if ln.strip()}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="cli.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    helps = _command_lines()

    def command(name: str, fn) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=helps[name], description=helps[name])
        c.set_defaults(fn=fn)
        return c

    add_config_flags(command("train-bundled", _cmd_train_bundled), TrainConfig)

    g = command("generate", _cmd_generate)
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", required=True)
    _add_sampling_args(g, seed=0)
    g.add_argument("--json", action="store_true")
    g.add_argument("--self-correct", dest="self_correct", action="store_true",
                   help="steer sampling with the DPT adapter's gradient (Eq. 9; docs/dpt.md)")
    g.add_argument("--eta", default=DEFAULT_CORRECTION_ETA, metavar=NUMBER,
                   help=f"self-correction step size, 0..{MAX_CORRECTION_ETA:g} (default {DEFAULT_CORRECTION_ETA})")
    g.add_argument("--reading", default="noise_only", choices=READINGS,
                   help="noise_only: the corrected latent feeds the noise prediction only (the authors' code); "
                        "latent: the DDIM step starts from it too (Eq. 9 literally)")
    g.add_argument("--objective", default="score", choices=OBJECTIVES,
                   help="score: ascend the DPT score s(z_t, y) (Eq. 9); contrast: ascend log p(y | z_t) against the "
                        "prompt's shapes-world hard negatives (docs/dpt.md)")
    g.add_argument("--read", default="z_t", choices=READS,
                   help="where the adapter reads: z_t (the sampler's latent, Eq. 9) or x0 (the step's predicted clean "
                        "latent at the adapter's t; docs/dpt.md)")
    g.add_argument("--step-range", dest="step_range", default=None, metavar="START:STOP",
                   help="the sampling steps to correct, 0-based, STOP excluded (e.g. 0:8; default: all)")
    g.add_argument("--best-of", dest="best_of", default=None, metavar="N",
                   help=f"draw N samples (2..{MAX_BEST_OF}; the first at --seed) and keep the one the DPT adapter "
                        "scores highest (docs/dpt.md: best of 2 meets the generation goal)")
    g.add_argument("--lora", action="store_true",
                   help="generate with the DPT-tuned model (stage 2: its LoRA on a copy of the UNet; with "
                        "--self-correct, steered by its own stage-2 adapter)")
    g.add_argument("--trajectory-out", dest="trajectory_out", default=None,
                   help="folder for the whole trajectory (maps, previews; Trajectory.load reads it)")

    gr_ = command("ground", _cmd_ground)
    gr_.add_argument("--image", required=True)
    gr_.add_argument("--expression", required=True)
    gr_.add_argument("--noise-seed", dest="noise_seed", default=0, metavar=NUMBER)
    gr_.add_argument("--model", default=None)
    gr_.add_argument("--json", action="store_true", help="(the output is always JSON)")

    for name, fn in (("caption", _cmd_caption), ("vqa", _cmd_vqa)):
        c = command(name, fn)
        c.add_argument("--image", required=True)
        if name == "vqa":
            c.add_argument("--question", required=True, help='e.g. "how many circles ?"')
        c.add_argument("--seed", default=0, metavar=NUMBER)
        c.add_argument("--steps", default=None, metavar=NUMBER, help="reverse steps (default: chosen on validation)")
        c.add_argument("--order", default=None, choices=ORDERS, help="unmasking order")
        c.add_argument("--model", default=None)
        c.add_argument("--json", action="store_true")

    et = command("eval-text-diffusion", _cmd_eval_text_diffusion)
    et.add_argument("--n-scenes", dest="n_scenes", default=300, metavar=NUMBER)
    et.add_argument("--split", default="validation", help="validation (for choices) or test (read once)")
    et.add_argument("--no-ranking", dest="no_ranking", action="store_true",
                    help="skip the ranking-based baseline (the slow part)")
    et.add_argument("--model", default=None)
    et.add_argument("--json", action="store_true")

    tt = command("train-text-diffusion", _cmd_train_text_diffusion)
    add_config_flags(tt, TextDiffusionConfig)

    td = command("train-dpt", _cmd_train_dpt)
    td.add_argument("--stage", default=1, metavar="1|2|rec",
                    help="1: adapter on the frozen UNet; 2: + LoRA (rank 4); rec: only the grounding head of a "
                         "trained adapter (--init-adapter), on cached features, its matching kept exactly")
    td.add_argument("--init-adapter", dest="init_adapter", default=None,
                    help="the trained adapter a run starts from (its architecture and weights; give it again to resume); "
                         f"--stage rec default: {RecTrainConfig.init_adapter}")
    td.add_argument("--rec-head", dest="rec_head", default=None, choices=REC_HEADS,
                    help="--stage rec: regression ([REG] token, default) or queries (the paper's)")
    td.add_argument("--vl-layers", dest="vl_layers", default=None, type=int,
                    help=f"--stage rec: layers of the regression head (default: {RecTrainConfig.vl_layers})")
    td.add_argument("--vl-pool", dest="vl_pool", default=None, type=int,
                    help=f"--stage rec: pooling of the image memory (default: {RecTrainConfig.vl_pool})")
    td.add_argument("--n-rec-train", dest="n_train", default=None, type=int,
                    help=f"--stage rec: cached training expressions per kind (default: {RecTrainConfig.n_train})")
    td.add_argument("--n-rec-val", dest="n_val", default=None, type=int,
                    help=f"--stage rec: cached validation expressions per kind (default: {RecTrainConfig.n_val})")
    td.add_argument("--work-dir", dest="work_dir", default=os.path.expanduser("~/.cache/discolens/dpt/cli"),
                    help="resumable state and snapshots")
    td.add_argument("--model", default=None)
    add_config_flags(td, DPTTrainConfig)

    sg = command("sample-grid", _cmd_sample_grid)
    sg.add_argument("--out", required=True)
    sg.add_argument("--n-per-kind", dest="n_per_kind", default=6, metavar=NUMBER)
    sg.add_argument("--cols", default=6, metavar=NUMBER)
    sg.add_argument("--prompt-seed", dest="prompt_seed", default=777, metavar=NUMBER)
    _add_sampling_args(sg, seed=0)

    e = command("eval-generation", _cmd_eval_generation)
    e.add_argument("--n-per-kind", dest="n_per_kind", default=100, metavar=NUMBER)
    e.add_argument("--split", default="test", choices=SPLITS,
                   help="prompt set (docs/protocol.md): test (read once), validation (for choices), compositional")
    e.add_argument("--lora", action="store_true", help="the DPT-tuned model (stage-2 LoRA on a copy of the UNet)")
    _add_sampling_args(e, seed=None)
    e.add_argument("--json", action="store_true")

    cm = command("causal-maps", _cmd_causal_maps)
    cm.add_argument("--models", nargs="+", default=["shapes-v1", "shapes-v1-plain"])
    cm.add_argument("--n", default=25, metavar=NUMBER, help="prompts per kind (single, relation)")
    cm.add_argument("--seed", default=0, metavar=NUMBER)
    cm.add_argument("--batch-size", dest="batch_size", default=16, metavar=NUMBER)
    cm.add_argument("--out", required=True, help="folder for <model>.json and summary.json")

    m = command("maps", _cmd_maps)
    m.add_argument("--image", required=True)
    m.add_argument("--prompt", required=True)
    m.add_argument("--timestep", default=300, metavar=NUMBER)
    m.add_argument("--model", default=None)
    m.add_argument("--json", action="store_true")

    eg = command("eval-grounding", _cmd_eval_grounding)
    eg.add_argument("--model", default=None)
    eg.add_argument("--n-scenes", dest="n_scenes", default=60, metavar=NUMBER)
    eg.add_argument("--timesteps", nargs="+", default=[100, 300, 500, 700], metavar=NUMBER)
    eg.add_argument("--generations", default=0, metavar=NUMBER,
                    help="also score maps traced while generating this many held-out prompts per kind")
    eg.add_argument("--atlas-dir", dest="atlas_dir", default=None,
                    help="write the head atlas (atlas.json + atlas.png) to this folder")
    eg.add_argument("--json", action="store_true")

    _add_match_args(command("rank", _cmd_rank))
    _add_match_args(command("score", _cmd_score))

    em = command("eval-matching", _cmd_eval_matching)
    em.add_argument("--benchmark", required=True)
    em.add_argument("--split", choices=list(inputs.SPLITS), default="test")
    em.add_argument("--limit", default=None, metavar=NUMBER)
    _add_match_args(em, inputs_=False)

    rm = command("report-matching", _cmd_report_matching)
    rm.add_argument("--benchmarks", nargs="+", default=["winoground", "comvg", "counting", "refcocog"])
    rm.add_argument("--groups", nargs="+", default=None, help="default all: " + " ".join(GROUPS))
    rm.add_argument("--noise-seeds", dest="noise_seeds", nargs="+", default=None, metavar=NUMBER,
                    help="run every experiment once per noise seed (default: once, at --noise-seed)")
    rm.add_argument("--split", choices=list(inputs.SPLITS), default="test")
    rm.add_argument("--limit", default=None, metavar=NUMBER)
    rm.add_argument("--schedule-steps", dest="schedule_steps", default=10, metavar=NUMBER)
    rm.add_argument("--prompt-steps", dest="prompt_steps", default=50, metavar=NUMBER)
    rm.add_argument("--out", default=None, help="folder for report.json + report.md")
    rm.add_argument("--from-json", dest="from_json", nargs="+", default=None, metavar="REPORT_JSON",
                    help="run nothing: render the rows of earlier runs' report.json files (one model) as one report")
    rm.add_argument("--pair", nargs=2, action="append", default=None, metavar=("LABEL_A", "LABEL_B"),
                    help="add McNemar's test between two rows by label (e.g. across groups); repeatable")
    _add_match_args(rm, inputs_=False)

    tp = command("train-prompt", _cmd_train_prompt)
    tp.add_argument("--benchmark", required=True)
    tp.add_argument("--out", required=True)
    tp.add_argument("--steps", default=50, metavar=NUMBER)
    tp.add_argument("--lr", default=1e-3, metavar=NUMBER)
    tp.add_argument("--margin", default=0.2, metavar=NUMBER)
    tp.add_argument("--prompt-variant", dest="variant_prompt", choices=["additive", "lora"], default="additive")
    tp.add_argument("--seed", default=0, metavar=NUMBER)
    _add_match_args(tp, inputs_=False, scorer=False)
    return p


def _quiet() -> None:
    """No progress bars or warnings from the libraries on stderr (stderr is for our one-line errors)."""
    warnings.filterwarnings("ignore")
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a flag argparse refused (one line already printed)
        return int(e.code or 0)
    if args.cmd != "train-bundled":
        _quiet()
    try:
        return args.fn(args)
    except (ValueError, ModelLoadError) as e:  # the inputs' one-line messages (models.limits, interp.tasks.inputs)
        print(user_message(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
