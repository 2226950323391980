"""The faces' entry points: every app action and every CLI command calls ONE function here, which checks the
user's inputs once (`models.limits`), loads the model and runs the task.

Errors are ValueError (or `models.loading.ModelLoadError`) with a one-line message for the user; the app
shows it as `gr.Error`, the CLI prints it on stderr and exits 2. Checks that need no model come first (a bad
number fails before a model loads); checks against the model (timesteps against its scheduler, words against
its tokenizer, prompt length in tokens) follow the load. Values come as the faces give them: numbers or text.
Quantities only the CLI offers are named by their flag in messages (`--limit`, `--n-scenes`).

    >>> gen = generate_image(None, "a red circle", seed=0, steps=25)            # the bundled model
    >>> res = score_captions(None, gen.image, ["a red circle", "a blue square"], scorer="auto")
    >>> res.ranking()[0]
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable, Mapping, Sequence

import plotly.graph_objects as go
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw
from plotly.subplots import make_subplots

from interp.figures import atlas_plotly
from interp.figures import sample_grid as sample_grid_figure
from interp.figures_text import candidates_plotly, token_attention_overlay
from interp.heatmaps import normalize
from interp.lse import POOLINGS
from interp.scorers import DEFAULT_SCORER, DEFAULT_TIMESTEPS, MatchOptions, Scorer, ScoreResult, get_scorer
from interp.tasks import failures, workbench
from interp.tasks.faithfulness import atlas_for_model, compare_word_maps, render_scene
from interp.tasks.generation_eval import SPLITS as GENERATION_SPLITS
from interp.tasks.generation_eval import evaluate_generation as _evaluate_generation
from interp.tasks.generation_eval import held_out_prompts, score_generations
from interp.tasks.grounding_dpt import ground
from interp.tasks.grounding_eval import evaluate_generation_grounding
from interp.tasks.grounding_eval import evaluate_grounding as _evaluate_grounding
from interp.tasks.matching import DEFAULT_MAP_TIMESTEP, score_image_captions, word_maps_for_image
from interp.tasks.matching_eval import evaluate_matching as _evaluate_matching
from interp.tasks.matching_report import GROUPS, noise_level_timesteps, run_report
from interp.tasks.prompt_learning import apply_prompt, load_prompt
from interp.tasks.prompt_learning import train_prompt as _train_prompt
from interp.tasks.self_correction import (OBJECTIVES, READINGS, READS, best_of_n, best_of_seeds,
                                         generate_self_corrected, prompt_negatives)
from interp.tasks.text_diffusion import answer_question, caption_image, eval_scenes
from models.limits import (
    DEFAULT_CORRECTION_ETA,
    MAX_ATLAS_SCENES,
    MAX_PER_KIND,
    MAX_SCENES,
    MAX_STEPS,
    MIN_RANK_CANDIDATES,
    check_best_of,
    check_choice,
    check_correction_eta,
    check_fits,
    check_float,
    check_guidance,
    check_int,
    check_prompt,
    check_seed,
    check_step_range,
    check_steps,
    check_timestep,
    check_timesteps,
    check_vocabulary,
    read_image,
    user_message,
    validate_captions,
)
from models.loading import ModelDefaults, bundled_models, load_pipeline
from models.sampling import generate_images
from models.shapes import world
from models.shapes.benchmarks import Benchmark, load_benchmark
from models.training.dpt import find_reader, find_tuned, tuned_dir_for

__all__ = ["report_rows_from_json", "ATLAS_METRICS", "SPLITS", "Generation", "load_model", "generate_image", "traced_generation",
           "best_of_generation", "edited_generation", "any_word_map", "rank_images", "classify", "caption_word_maps",
           "matching_failures", "generation_failures", "HostedPolicy", "hosted_policy",
           "sample_grid", "evaluate_generation", "word_maps", "make_scorer", "attention_prompt", "match_options",
           "score_captions", "evaluate_matching", "report_matching", "train_prompt", "evaluate_grounding",
           "compare_models", "head_atlas", "replot_atlas", "benchmark"]

ATLAS_METRICS = ("energy", "pointing")
MAX_EDIT_SCALE = 10.0  # factor on a word's attention in the app's intervention control
MAX_IMAGES = 16  # images ranked against one caption (text -> image)
MAX_LABELS = 16  # labels of one zero-shot classification
MAX_FAILURE_ITEMS = 200  # benchmark items scored in one Failures run
MAX_FAILURE_PROMPTS = 50  # held-out prompts per kind generated in one Failures run
SPLITS = ("train", "test", "all")
SOURCES = ("probs", "logits")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_model(model: str | None, device: str | None = None):
    """The pipeline of a bundled name, local folder or hub id (None / "": the bundled model).

    Offline, a name that is neither bundled nor a local path is refused with one short line (instead of the
    hub client's long message)."""
    name = (model or "").strip() if isinstance(model, str) or model is None else model
    if isinstance(name, str) and name and _offline() and name not in bundled_models() and name != "bundled" \
            and not (name.startswith((".", "/", "~")) or os.path.exists(name)):
        raise ValueError(f"unknown model {name!r}: not a bundled model ({', '.join(bundled_models())}) nor a local "
                         "folder, and the hub cannot be reached (offline)")
    return load_pipeline(name or None, device=device)


def _n_train(pipe) -> int:
    return int(pipe.scheduler.config.num_train_timesteps)


def _check_texts(pipe, texts: Sequence[str], what: Callable[[int], str]) -> None:
    """Each text fits the model's text encoder, and a closed-vocabulary model knows its words."""
    for i, t in enumerate(texts):
        check_fits(pipe.tokenizer, t, what(i))
    check_vocabulary(pipe.tokenizer, texts)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    """One generated image and the settings it was made with (the model's defaults filled in)."""

    image: Image.Image
    prompt: str
    seed: int
    steps: int
    guidance: float


def _generation_inputs(model, prompt, seed, steps, guidance):
    prompt, seed = check_prompt(prompt), check_seed(seed)
    steps = None if steps is None else check_steps(steps)
    guidance = check_guidance(guidance)
    pipe = load_model(model)
    _check_texts(pipe, [prompt], lambda i: "the prompt")
    return pipe, prompt, seed, steps, guidance


def generate_image(model: str | None, prompt: str, seed=0, steps=None, guidance=None, lora: bool = False
                   ) -> Generation:
    """One image from one prompt (CLI `generate`); steps / guidance None: the model's defaults; `lora`: from the
    DPT-tuned model (its stage-2 LoRA on a copy of the UNet; ValueError when the model has none)."""
    pipe, prompt, seed, steps, guidance = _generation_inputs(model, prompt, seed, steps, guidance)
    if lora:
        pipe = find_tuned(pipe)[0]
    d = pipe.discolens_defaults
    steps, guidance = steps or d.steps, d.guidance if guidance is None else guidance
    [img] = generate_images(pipe, [prompt], [seed], steps=steps, guidance=guidance)
    return Generation(img, prompt, seed, steps, guidance)


def traced_generation(model: str | None, prompt: str, seed=0, steps=None, guidance=None, negative_prompt=None,
                      scheduler=None, progress=None) -> workbench.TracedGeneration:
    """One image with every cross-attention layer, head and step traced (the app's Generate)."""
    scheduler = None if scheduler in (None, "") else check_choice(scheduler, tuple(workbench.SCHEDULERS), "scheduler")
    negative_prompt = None if not (negative_prompt or "").strip() else check_prompt(negative_prompt, "the negative prompt")
    pipe, prompt, seed, steps, guidance = _generation_inputs(model, prompt, seed, steps, guidance)
    if negative_prompt:
        _check_texts(pipe, [negative_prompt], lambda i: "the negative prompt")
    return workbench.traced_generation(pipe, prompt, seed=seed, steps=steps, guidance=guidance,
                                       negative_prompt=negative_prompt, scheduler=scheduler, progress=progress)


def edited_generation(model: str | None, gen: workbench.TracedGeneration, word, scale, box=None,
                      progress=None) -> workbench.TracedGeneration:
    """The same generation with one word's cross-attention scaled, everywhere or inside a box (the app's
    intervention control): `word` indexes `gen.words`, `scale` in 0..MAX_EDIT_SCALE, `box` "x0 y0 x1 y1" or None."""
    w = check_int(word, "word", 0, max(len(gen.words) - 1, 0))
    s = check_float(scale, "scale", 0.0, MAX_EDIT_SCALE)
    b = workbench.parse_box(box) if isinstance(box, (str, type(None))) else workbench.parse_box(" ".join(map(str, box)))
    return workbench.edited_generation(load_model(model), gen, w, s, b, progress=progress)


def any_word_map(model: str | None, gen: workbench.TracedGeneration, word: str):
    """Where the model would have put `word` in a generation, from its stored queries (no UNet call):
    (map `[H, W]`, the word's tokens)."""
    word = check_prompt(word, "the word")
    pipe = load_model(model)
    check_fits(pipe.tokenizer, word, "the word")
    check_vocabulary(pipe.tokenizer, [word])
    return workbench.any_word_map(pipe, gen, word)


def sample_grid(model: str | None, n_per_kind=6, cols=6, steps=None, guidance=None, seed=0, prompt_seed=777):
    """Held-out prompts generated and checked: (matplotlib figure, number of images, number judged correct)."""
    n = check_int(n_per_kind, "--n-per-kind", 1, MAX_PER_KIND)
    cols = check_int(cols, "--cols", 1, 100)
    steps = None if steps is None else check_steps(steps)
    guidance, seed, prompt_seed = check_guidance(guidance), check_seed(seed), check_seed(prompt_seed, "prompt seed")
    pipe = load_model(model)
    caps = [c for _, c in held_out_prompts(n, prompt_seed)]
    imgs = generate_images(pipe, caps, [seed + i for i in range(len(caps))], steps=steps, guidance=guidance)
    ok = [v["correct"] for v in score_generations(imgs, caps)]
    return sample_grid_figure(imgs, caps, ok, cols=cols), len(caps), sum(ok)


def evaluate_generation(model: str | None, n_per_kind=100, steps=None, guidance=None, seed=None,
                        split: str = "test", lora: bool = False) -> dict:
    """The scene checker's verdicts on a split's generations (`interp.tasks.generation_eval`; seed None: the
    split's own noise seeds); `lora`: of the DPT-tuned model (stage 2)."""
    n = check_int(n_per_kind, "--n-per-kind", 1, MAX_PER_KIND)
    steps = None if steps is None else check_steps(steps)
    guidance = check_guidance(guidance)
    seed = None if seed is None else check_seed(seed)
    split = check_choice(split, GENERATION_SPLITS, "split")
    pipe = load_model(model)
    res = _evaluate_generation(find_tuned(pipe)[0] if lora else pipe, n_per_kind=n, steps=steps, guidance=guidance,
                               seed=seed, split=split)
    return {**res, "lora": bool(lora)}


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------
def make_scorer(name: str | None = None, variant: str | None = None, grad_norm: str | None = None) -> Scorer:
    """The registered scorer `name` (None: the default), with head_weighted's options when given."""
    sc = get_scorer(DEFAULT_SCORER if name is None else name)  # unknown name: ValueError listing the known ones
    kw = {k: v for k, v in (("variant", variant), ("grad_norm", grad_norm)) if v is not None}
    if not kw:
        return sc
    try:
        return get_scorer(sc.name, **kw)
    except TypeError:
        raise ValueError(f"the {sc.name} scorer takes no {' or '.join(kw)} option") from None


def attention_prompt(path):
    """A saved attention prompt (`cli.py train-prompt`) from a file path, or None without one."""
    if not path:
        return None
    path = os.fspath(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", path))
    try:
        return load_prompt(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"cannot load the attention prompt {path}: {user_message(e)}") from None


def benchmark(name) -> Benchmark:
    """A benchmark by name or folder."""
    if isinstance(name, Benchmark):
        return name
    try:
        return load_benchmark(name)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(user_message(e)) from None


def match_options(pipe, scorer: str = "lse", timesteps=None, noise_levels=None, source: str = "logits",
                  layers: str | None = None, pooling: str = "lse", noise_seed=0) -> MatchOptions:
    """MatchOptions with timesteps checked against the model's training schedule (or from noise levels)."""
    n_train = _n_train(pipe)
    if timesteps and noise_levels:
        raise ValueError("give timesteps or noise levels, not both")
    if noise_levels:
        ts = noise_level_timesteps(noise_levels, n_train)  # each level strictly between 0 and 1
    else:
        ts = check_timesteps(DEFAULT_TIMESTEPS if timesteps is None else timesteps, n_train)
    return MatchOptions(scorer=scorer, source=check_choice(source, SOURCES, "attention source"), layers=layers,
                        pooling=check_choice(pooling, tuple(POOLINGS), "pooling"), timesteps=ts,
                        noise_seed=check_seed(noise_seed, "noise seed"))


def score_captions(model: str | None, image, captions: Sequence[str], scorer: str | None = None, *,
                   variant: str | None = None, grad_norm: str | None = None, prompt_file=None,
                   min_count: int = MIN_RANK_CANDIDATES, **options) -> ScoreResult:
    """Score captions against one image with a registered scorer (the app's Match, CLI `rank` / `score`).

    Args:
        model: bundled name, folder or hub id (None: the bundled model).
        image: a PIL image or a file path.
        captions: at least `min_count`, at most `models.limits.MAX_CANDIDATES`.
        scorer, variant, grad_norm: `make_scorer`.
        prompt_file: a saved attention prompt applied while scoring (None: none).
        **options: `match_options`'s (timesteps, noise_levels, source, layers, pooling, noise_seed).
    """
    img = read_image(image)
    caps = validate_captions(captions, min_count=min_count)
    sc = make_scorer(scorer, variant, grad_norm)
    prompt = attention_prompt(prompt_file)
    pipe = load_model(model)
    opts = match_options(pipe, sc.name, **options)
    _check_texts(pipe, caps, lambda i: f"caption {i + 1}")
    with apply_prompt(pipe, prompt):
        return score_image_captions(pipe, img, caps, opts, scorer=sc)


def evaluate_matching(model: str | None, bench, scorer: str | None = None, *, split: str = "test", limit=None,
                      variant: str | None = None, grad_norm: str | None = None, prompt_file=None,
                      device: str | None = None, **options) -> dict:
    """A matching benchmark's metrics with one scorer (`interp.tasks.matching_eval.evaluate_matching`)."""
    b = benchmark(bench)
    split = check_choice(split, SPLITS, "split")
    limit = None if limit is None else check_int(limit, "--limit", 1)
    sc = make_scorer(scorer, variant, grad_norm)
    prompt = attention_prompt(prompt_file)
    pipe = load_model(model, device=device)
    opts = match_options(pipe, sc.name, **options)
    with apply_prompt(pipe, prompt):
        return _evaluate_matching(pipe, b, opts, split=split, limit=limit, per_item=False, scorer=sc)


def report_matching(model: str | None, benchmarks: Sequence, groups: Sequence[str] | None = None, *,
                    split: str = "test", limit=None, schedule_steps=10, prompt_steps=50,
                    progress: Callable[[dict], None] | None = None, noise_seeds: Sequence | None = None,
                    **options) -> list[dict]:
    """The Discffusion report's rows (`interp.tasks.matching_report.run_report`); `noise_seeds`: run every
    experiment once per seed (None: once, at the options' noise seed)."""
    groups = list(groups or GROUPS)
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"unknown --groups {' '.join(bad)}; choose from {' '.join(GROUPS)}")
    benches = [benchmark(name) for name in benchmarks]
    split = check_choice(split, SPLITS, "split")
    limit = None if limit is None else check_int(limit, "--limit", 1)
    schedule_steps = check_int(schedule_steps, "--schedule-steps", 1)
    prompt_steps = check_int(prompt_steps, "--prompt-steps", 1)
    seeds = None if not noise_seeds else [check_seed(x, "--noise-seeds") for x in noise_seeds]
    pipe = load_model(model)
    opts = match_options(pipe, "lse", **options)
    return run_report(pipe, benches, groups, opts, split=split, limit=limit, schedule_steps=schedule_steps,
                      prompt_steps=prompt_steps, progress=progress,
                      noise_seeds=tuple(seeds) if seeds else (opts.noise_seed,))


def report_rows_from_json(paths: Sequence[str]) -> tuple[list[dict], list[str], str, int | None]:
    """Rows of earlier `report-matching --out` runs (their report.json files), to render as one report:
    (rows, the runs' commands, model, unet_step). Refuses unreadable files, files without rows, runs of
    different models or steps, and a row (group, label, benchmark, noise seed) that two files both hold."""
    rows: list[dict] = []
    commands: list[str] = []
    models: set = set()
    seen: set = set()
    for p in paths:
        if not os.path.isfile(p):
            raise ValueError(f"--from-json: no such file: {p}")
        try:
            with open(p) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--from-json: {p} is not a readable JSON file ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("rows"), list) or not d["rows"]:
            raise ValueError(f"--from-json: {p} holds no report rows (write one with report-matching --out)")
        models.add((d.get("model"), d.get("unet_step")))
        for r in d["rows"]:
            k = (r.get("group"), r.get("label"), r.get("benchmark"), r.get("noise_seed", 0))
            if k in seen:
                raise ValueError(f"--from-json: the row {k} is in two files; give each run once")
            seen.add(k)
            rows.append(r)
        commands += d.get("commands") or ([d["command"]] if d.get("command") else [])
    if len(models) > 1:
        raise ValueError(f"--from-json: the files measure different models {sorted(models, key=str)}; "
                         "render one model's runs together")
    model, step = models.pop()
    return rows, commands, model or "?", step


def train_prompt(model: str | None, bench, *, steps=50, lr: float = 1e-3, margin: float = 0.2,
                 variant: str = "additive", seed=0, callback: Callable[[dict], None] | None = None, **options):
    """Few-shot attention prompt learning on a benchmark's train split: (prompt, log)."""
    b = benchmark(bench)
    steps = check_int(steps, "--steps", 1)
    lr = check_float(lr, "--lr", 0.0)
    margin = check_float(margin, "--margin", 0.0)
    seed = check_seed(seed)
    pipe = load_model(model)
    opts = match_options(pipe, "lse", **options)
    return _train_prompt(pipe, b, opts, steps=steps, lr=lr, margin=margin, variant=variant, seed=seed,
                         callback=callback)


# ----------------------------------------------------------------------------------------------
# Word maps and grounding
# ----------------------------------------------------------------------------------------------
def word_maps(model: str | None, image, prompt: str, timestep=DEFAULT_MAP_TIMESTEP, noise_seed=0):
    """A real image's aggregate word maps at one timestep: (image, words, maps `[words, H, W]`)."""
    img = read_image(image)
    prompt, noise_seed = check_prompt(prompt), check_seed(noise_seed, "noise seed")
    pipe = load_model(model)
    t = check_timestep(timestep, _n_train(pipe))
    _check_texts(pipe, [prompt], lambda i: "the prompt")
    words, maps = word_maps_for_image(pipe, img, prompt, timestep=t, noise_seed=noise_seed)
    return img, words, maps


def evaluate_grounding(model: str | None, n_scenes=60, timesteps=(100, 300, 500, 700), generations=0,
                       return_rows: bool = False) -> dict:
    """Faithfulness of the attention maps on held-out renders (and, with `generations`, on generations)."""
    n = check_int(n_scenes, "--n-scenes", 2, MAX_SCENES)  # half the scenes calibrate the best layer / head
    gens = check_int(generations, "--generations", 0, MAX_PER_KIND)
    pipe = load_model(model)
    ts = check_timesteps(timesteps, _n_train(pipe))
    res = _evaluate_grounding(pipe, n_scenes=n, timesteps=ts, return_rows=return_rows)
    if gens:
        res["generations"] = evaluate_generation_grounding(pipe, n_per_kind=gens)
    return res


def compare_models(models: Mapping[str, str | None], seed, kind: str, timestep) -> tuple[world.Scene, Image.Image, dict]:
    """Word maps of several models (by label) on one held-out render, scored against its exact masks:
    (scene, image, `interp.tasks.faithfulness.compare_word_maps`'s result)."""
    scene = render_scene(check_seed(seed, "scene seed"), kind)
    pipes = {label: load_model(m) for label, m in models.items()}
    t = check_timestep(timestep, min(_n_train(p) for p in pipes.values()))
    image = world.render(scene)
    return scene, image, compare_word_maps(pipes, image, scene.caption, t, scene=scene)


def head_atlas(model: str | None, timestep, n_scenes, metric: str = "energy"):
    """A model's head atlas on held-out renders: (table, plotly figure under `metric`)."""
    n = check_int(n_scenes, "number of scenes", 1, MAX_ATLAS_SCENES)
    metric = check_choice(metric, ATLAS_METRICS, "metric")
    pipe = load_model(model)
    t = check_timestep(timestep, _n_train(pipe))
    table = atlas_for_model(pipe, n_scenes=n, timesteps=(t,))
    return table, atlas_plotly(table, metric=metric)


def replot_atlas(table, metric: str):
    """The atlas figure of an existing table under another metric (no model run); None without a table."""
    metric = check_choice(metric, ATLAS_METRICS, "metric")
    return atlas_plotly(table, metric=metric) if table else None


# ----------------------------------------------------------------------------------------------
# Match & rank: the other directions; Failures
# ----------------------------------------------------------------------------------------------
def rank_images(model: str | None, images: Sequence, caption: str, scorer: str | None = "denoise_norm",
                **options) -> list[tuple[int, float]]:
    """One caption against K images (text -> image): (image index, score) best first.

    Each image is scored with the caption alone; use a scorer whose scores compare across images (denoise_norm,
    the default: the denoising error relative to the empty prompt's on the same image)."""
    if not images:
        raise ValueError("no images given: upload at least two")
    if len(images) > MAX_IMAGES:
        raise ValueError(f"at most {MAX_IMAGES} images per caption, got {len(images)}")
    imgs = [read_image(im) for im in images]
    if len(imgs) < 2:
        raise ValueError(f"ranking needs at least 2 images, got {len(imgs)}")
    [cap] = validate_captions([caption], min_count=1)
    sc = make_scorer(scorer)
    pipe = load_model(model)
    opts = match_options(pipe, sc.name, **options)
    _check_texts(pipe, [cap], lambda i: "the caption")
    scores = [score_image_captions(pipe, im, [cap], opts, scorer=sc).scores[0] for im in imgs]
    return sorted(enumerate(scores), key=lambda p: -p[1])


def classify(model: str | None, image, template: str, labels, scorer: str | None = None, **options):
    """Zero-shot classification (DiffDis's use): the captions `template` with each label in its `{}`, ranked:
    (ScoreResult, {caption: label})."""
    template = check_prompt(template, "the template")
    if template.count("{}") != 1:
        raise ValueError("the template needs exactly one {} where the label goes, e.g. 'a {} circle'")
    labs = [" ".join(l.split()) for l in (labels.replace(",", "\n").splitlines() if isinstance(labels, str) else labels)]
    labs = list(dict.fromkeys(l for l in labs if l))
    if len(labs) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels, got {len(labs)}")
    if len(labs) < 2:
        raise ValueError(f"classification needs at least 2 labels, got {len(labs)}")
    caps = {template.replace("{}", l): l for l in labs}
    return score_captions(model, image, list(caps), scorer, **options), caps


def caption_word_maps(model: str | None, image, captions: Sequence[str], timestep=DEFAULT_MAP_TIMESTEP):
    """Each caption's word maps on one image (one noised UNet call each): {caption: (words, maps `[words, H, W]`)}."""
    img = read_image(image)
    caps = validate_captions(captions, min_count=1)
    pipe = load_model(model)
    t = check_timestep(timestep, _n_train(pipe))
    _check_texts(pipe, caps, lambda i: f"caption {i + 1}")
    return {c: word_maps_for_image(pipe, img, c, timestep=t) for c in caps}


def matching_failures(model: str | None, bench, scorer: str | None = None, split: str = "test", limit=20,
                      **options) -> dict:
    """The items of a benchmark split the scorer gets wrong (`interp.tasks.failures.matching_failures`)."""
    b = benchmark(bench)
    split = check_choice(split, SPLITS, "split")
    limit = check_int(limit, "number of items", 1, MAX_FAILURE_ITEMS)
    sc = make_scorer(scorer)
    pipe = load_model(model)
    opts = match_options(pipe, sc.name, **options)
    return failures.matching_failures(pipe, b, opts, sc, split=split, limit=limit)


def generation_failures(model: str | None, n_per_kind=5, split: str = "test", steps=None, guidance=None) -> dict:
    """Held-out prompts whose generation the scene checker rejects (`interp.tasks.failures.generation_failures`)."""
    n = check_int(n_per_kind, "prompts per kind", 1, MAX_FAILURE_PROMPTS)
    split = check_choice(split, GENERATION_SPLITS, "split")
    steps = None if steps is None else check_steps(steps)
    guidance = check_guidance(guidance)
    return failures.generation_failures(load_model(model), n_per_kind=n, split=split, steps=steps, guidance=guidance)


# ----------------------------------------------------------------------------------------------
# Hosted mode (a public Space): which models, which sizes
# ----------------------------------------------------------------------------------------------
HOSTED_ENV = "DISCOLENS_HOSTED"


@dataclasses.dataclass(frozen=True)
class HostedPolicy:
    """What a hosted app (a Space, a class server) lets visitors ask for.

    models: the names allowed (bundled ones); hub ids ("owner/name") too when `allow_hub` (on a GPU host);
    local paths and uploaded weights are refused; the caps bound one request's work."""

    models: tuple[str, ...]
    allow_hub: bool = False
    max_steps: int = 50
    max_captions: int = 8
    max_images: int = 8
    max_items: int = 30
    max_per_kind: int = 5
    max_atlas_scenes: int = 12

    def model(self, model: str | None) -> str | None:
        """`model` if allowed, else ValueError naming what is."""
        m = (model or "").strip()
        if not m or m in self.models:
            return m or None
        hub_like = m.count("/") == 1 and not m.startswith((".", "/", "~")) and not os.path.exists(m)
        if self.allow_hub and hub_like:
            return m
        what = ", ".join(self.models) + (" or a hub id (owner/name)" if self.allow_hub else "")
        raise ValueError(f"this hosted app serves {what}; {m!r} is not allowed here")

    def cap(self, value, cap: int, what: str):
        """`value` unless it is a number above `cap` (ValueError)."""
        try:
            big = value is not None and float(value) > cap
        except (TypeError, ValueError):
            return value
        if big:
            raise ValueError(f"{what} is limited to {cap} in this hosted app, got {value}")
        return value


def hosted_policy(argv: Sequence[str] | None = None, cuda: bool | None = None) -> HostedPolicy | None:
    """The hosted policy when `--hosted` is in argv or DISCOLENS_HOSTED is set (not 0 / false), else None."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ.get(HOSTED_ENV, "").strip().lower()
    if "--hosted" not in argv and env in ("", "0", "false", "no", "off"):
        return None
    if cuda is None:
        cuda = torch.cuda.is_available()
    return HostedPolicy(models=tuple(bundled_models()) or ("shapes-v1",), allow_hub=bool(cuda))


# ----------------------------------------------------------------------------------------------
# DPT: grounding, self-correction, training
# ----------------------------------------------------------------------------------------------
def ground_expression(model: str | None, image, expression: str, noise_seed=0) -> dict:
    """The referred object's box in image pixels and its probability (CLI `ground`): {"box", "score", ...}."""
    img = read_image(image) if not isinstance(image, Image.Image) else image
    expression = check_prompt(expression, "the expression")
    noise_seed = check_seed(noise_seed, "noise seed")
    pipe = load_model(model)  # `ground` checks the expression's words against the adapter's vocabulary
    return ground(pipe, img, expression, noise_seed=noise_seed)


def self_corrected_generation(model: str | None, prompt: str, seed=0, steps=None, guidance=None,
                              eta=DEFAULT_CORRECTION_ETA, reading: str = "noise_only", progress=None,
                              lora: bool = False, objective: str = "score", read: str = "z_t", step_range=None):
    """One image with DPT self-correction (Eq. 9) and its trajectory (CLI `generate --self-correct`, app's
    Self-correction view): (PIL image, Trajectory). `lora`: the DPT-tuned model (stage 2) steered by its own
    stage-2 adapter; `objective`: "score" (Eq. 9) or "contrast" (against the prompt's world negatives); `read`:
    "z_t" (Eq. 9) or "x0" (the adapter reads the step's predicted clean latent); `step_range`: the corrected
    steps, "START:STOP" or (start, stop) (`check_step_range`; None: all)."""
    eta = check_correction_eta(eta)
    reading = check_choice(reading, READINGS, "reading")
    objective = check_choice(objective, OBJECTIVES, "objective")
    read = check_choice(read, READS, "read")
    check_step_range(step_range, MAX_STEPS if steps is None else check_steps(steps))  # its form, before loading
    if objective == "contrast":
        prompt_negatives(check_prompt(prompt))  # a prompt outside the world's grammar: one line, before loading
    pipe, prompt, seed, steps, guidance = _generation_inputs(model, prompt, seed, steps, guidance)
    step_range = check_step_range(step_range, steps or getattr(pipe, "discolens_defaults", ModelDefaults()).steps)
    pipe, adapter = find_reader(pipe, lora)  # no adapter: the message says how to train one, before any sampling
    return generate_self_corrected(pipe, prompt, seed=seed, eta=eta, steps=steps, guidance=guidance,
                                   reading=reading, adapter=adapter, callback=progress, objective=objective,
                                   read=read, step_range=step_range)


def best_of_generation(model: str | None, prompt: str, seed=0, n=2, steps=None, guidance=None, lora: bool = False
                       ) -> tuple[Image.Image, dict]:
    """Best of N (CLI `generate --best-of N`, the app's Self-correction view): N plain samples, the first at `seed`
    (`best_of_seeds`), and the one the DPT adapter scores highest kept; `lora`: the DPT-tuned model and its own
    adapter. Returns (the chosen image, `best_of_n`'s info: seed, index, seeds, scores, images, unet_calls)."""
    n = check_best_of(n)
    pipe, prompt, seed, steps, guidance = _generation_inputs(model, prompt, seed, steps, guidance)
    pipe, adapter = find_reader(pipe, lora)  # no adapter: says how, before sampling
    return best_of_n(pipe, prompt, best_of_seeds(seed, n), steps=steps, guidance=guidance, adapter=adapter)


# ----------------------------------------------------------------------------------------------
# The app's Self-correction and Image -> text views
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SelfCorrectionView:
    """What the app's Self-correction tab shows (plain images, one plotly figure, one table).

    Attributes:
        image / plain: the self-corrected and the plain image (same seed), upscaled to `side`.
        boxed: the corrected image with each noun phrase's DPT grounding box drawn.
        figure: s_before, s_after, grad_norm and latent_change per step (NaN outside the correction range).
        strip: per step, the colour-mapped gradient map and the x0 preview, as (image, label) pairs.
        headers / rows: a table: the ITM score of the prompt, each phrase's box and score, the run's summary.
        trajectory: the `Trajectory` itself.
    """

    image: Image.Image
    plain: Image.Image
    boxed: Image.Image
    figure: object
    strip: list
    headers: list
    rows: list
    trajectory: object


def _upscaled(im: Image.Image, side: int) -> Image.Image:
    return im.resize((side, side), Image.NEAREST) if im.width < side else im


def _trajectory_figure(traj):
    x = list(range(len(traj.s_before)))
    at = "x0(z_t)" if getattr(traj, "read", "z_t") == "x0" else "z_t"
    title = f"DPT score s({at}, y)" if traj.objective == "score" else f"log p(y | {at}) among y and its negatives"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, subplot_titles=(title, "gradient and change"))
    for name, ys, r in (("s before", traj.s_before, 1), ("s after", traj.s_after, 1),
                        ("|ds/dz|", traj.grad_norm, 2), ("|eta * grad|", traj.latent_change, 2)):
        fig.add_trace(go.Scatter(x=x, y=[None if v != v else v for v in ys], mode="lines+markers", name=name),
                      row=r, col=1)
    fig.update_xaxes(title_text="sampling step", row=2, col=1)
    fig.update_layout(height=460, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig


def self_correction_view(model: str | None, prompt: str, seed=0, steps=None, guidance=None,
                         eta=DEFAULT_CORRECTION_ETA, reading: str = "noise_only", side: int = 256,
                         progress=None, lora: bool = False, objective: str = "score", read: str = "z_t",
                         step_range=None) -> SelfCorrectionView:
    """The app's Self-correction tab: the self-corrected image beside the plain one (same seed), the trajectory's
    curves, gradient maps and previews, the adapter's ITM score of the prompt and a box per noun phrase.

        >>> v = self_correction_view(None, "a red circle left of a blue square", seed=0, eta=100)
        >>> v.image.size, v.rows[0]          # (256, 256), ["ITM score (prompt)", "...", 0.93]
        >>> v.figure                          # plotly: s before / after, grad norm, latent change per step
    """
    img, traj = self_corrected_generation(model, prompt, seed=seed, steps=steps, guidance=guidance, eta=eta,
                                          reading=reading, progress=progress, lora=lora, objective=objective,
                                          read=read, step_range=step_range)
    prompt = check_prompt(prompt)
    plain = generate_image(model, prompt, seed=seed, steps=traj.steps, guidance=traj.guidance, lora=lora).image
    pipe = load_model(model)
    itm = get_scorer("dpt_lora" if lora else "dpt").score(pipe, img, [prompt]).scores[0]
    if lora:
        pipe = find_tuned(pipe)[0]
    rows = [["ITM score (prompt)", prompt, round(float(itm), 4)]]
    boxed = _upscaled(img, side).convert("RGB")
    draw = ImageDraw.Draw(boxed)
    sx, sy = boxed.width / img.width, boxed.height / img.height
    try:
        phrases = world.parse_caption(prompt).phrases
    except world.CaptionError:
        phrases = ()
    colours = ("#ff00ff", "#00ffff", "#ffff00", "#ffffff")
    for i, ph in enumerate(phrases):
        expr = "the " + " ".join(w for w in (ph.size, ph.color, ph.shape) if w)
        try:
            g = ground(pipe, img, expr, adapter_dir=tuned_dir_for(pipe) if lora else None)
        except ValueError as e:
            rows.append([f"box: {expr}", user_message(e), None])
            continue
        x0, y0, x1, y1 = g["box"]
        draw.rectangle([x0 * sx, y0 * sy, x1 * sx, y1 * sy], outline=colours[i % len(colours)], width=3)
        draw.text((x0 * sx + 3, y0 * sy + 2), expr[4:], fill=colours[i % len(colours)])
        rows.append([f"box: {expr}", " ".join(f"{v:.0f}" for v in g["box"]), round(g["score"], 4)])
    s = traj.summary()
    rows += [[k, "", round(v, 4) if isinstance(v, float) else v] for k, v in s.items()]
    strip = []
    for k in range(len(traj.grad_map)):
        g = traj.grad_map[k]
        rgb = (colormaps["magma"](normalize(g))[..., :3] * 255).astype("uint8")
        strip.append((_upscaled(Image.fromarray(rgb), 96), f"step {k}: |grad|"))
    for k in range(len(traj.previews)):
        strip.append((_upscaled(Image.fromarray(traj.previews[k]), 96), f"step {k}: x0"))
    return SelfCorrectionView(_upscaled(img, side), _upscaled(plain, side), boxed, _trajectory_figure(traj), strip,
                              ["what", "text / box (x0 y0 x1 y1)", "value"], rows, traj)


TEXT_TASKS = ("caption", "question")
EXAMPLE_QUESTIONS = ("how many circles ?", "what color is the circle ?", "what shape is the red object ?",
                     "where is the red circle ?")
MAX_HELDOUT_SCENES = 20


def heldout_scene(index) -> tuple[Image.Image, str]:
    """A held-out (validation) scene of the text-diffusion evaluation, rendered: (image, its caption)."""
    i = check_int(index, "scene", 0, MAX_HELDOUT_SCENES - 1)
    scene = eval_scenes("validation", MAX_HELDOUT_SCENES)[i]
    return world.render(scene), scene.caption


def image_to_text(model: str | None, image, task: str = "caption", question: str = "", seed=0):
    """The app's Image -> text tab: caption an image, or answer a question about it, by masked text diffusion
    (D-DiT) with the joint attention recorded: (PIL image, CaptionResult or AnswerResult).

        >>> img, res = image_to_text(None, "two_circles.png", "question", "how many circles ?")
        >>> res.answer, res.sample.length
    """
    if image is None:
        raise ValueError("no image: upload one or pick a held-out scene")
    img = image.convert("RGB") if isinstance(image, Image.Image) else read_image(image)
    task = check_choice(task, TEXT_TASKS, "task")
    seed = check_seed(seed)
    if task == "question" and not (question or "").strip():
        raise ValueError("the question is empty; e.g. 'how many circles ?'")
    pipe = load_model(model)
    if task == "caption":
        return img, caption_image(img, pipe=pipe, seed=seed, record_attention=True)
    return img, answer_question(img, question, pipe=pipe, seed=seed, record_attention=True)


def text_sample_views(image, sample, step, position):
    """One position's candidates over the steps (plotly) and its joint attention at one step over the image (PIL)."""
    if sample is None:
        raise ValueError("run a caption or a question first")
    p = check_int(position, "position", 0, sample.length - 1)
    k = check_int(step, "step", 0, len(sample.steps) - 1)
    img = image.convert("RGB") if isinstance(image, Image.Image) else read_image(image)
    return candidates_plotly(sample, p), token_attention_overlay(_upscaled(img, 256), sample, k, p)
