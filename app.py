"""DiscoLens: look inside text-to-image diffusion models as discriminators (Gradio UI; thin wiring only).

    python app.py                 # serves on http://127.0.0.1:7860 with the bundled model
    python app.py --hosted        # a public Space / class server: bundled models only, capped sizes

Host and port: Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (a Hugging Face Space sets them), else
DISCOLENS_HOST / DISCOLENS_PORT, else 127.0.0.1:7860. DISCOLENS_HOSTED=1 is `--hosted`.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib
import tempfile
import threading
from pathlib import Path

import gradio as gr
from PIL import Image

from interp.figures import breakdown_plotly, fused_terms_plotly, heads_plotly, structure_plotly
from interp.figures_text import timeline_plotly
from interp.heatmaps import colorbar, overlay
from interp.scorers import DEFAULT_SCORER, ScoreResult, scorers
from interp.tasks import export, inputs
from interp.tasks.self_correction import OBJECTIVES, READINGS, READS
from interp.tasks.workbench import SCHEDULERS, TraceCache, model_view, slice_choices, slice_overlays, step_frame, word_choices
from models.limits import (DEFAULT_CORRECTION_ETA, MAX_ATLAS_SCENES, MAX_BEST_OF, MAX_CORRECTION_ETA, MAX_GUIDANCE,
                           MAX_STEPS, parse_numbers, user_message)
from models.loading import ModelLoadError, bundled_models, model_defaults, resolve_model_id
from models.shapes import world

PLAIN_MODEL = "shapes-v1-plain"  # the same world trained without the token loss
HOSTED = inputs.hosted_policy()
CACHE = TraceCache(int(float(os.environ.get("DISCOLENS_CACHE_MB", "256")) * 2**20))  # results, LRU in bytes
MODEL = "model"  # concurrency id of every event that runs a model: one job on the model at a time
MAP_NOTE = ("Colours: blue = the map's lowest value, red = its highest; **each map is scaled to its own min..max**, "
            "so compare where a word attends, not how much.")
BENCHMARKS = ("winoground", "comvg", "counting", "refcocog")

try:  # ZeroGPU Spaces: run model calls on a borrowed GPU
    import spaces

    GPU = spaces.GPU
except ImportError:  # everywhere else: no-op
    def GPU(fn):
        return fn

_ERRORS: dict[tuple[str, str], str] = {}  # (session, action) -> the last error message, shown beside the action
_ERRORS_LOCK = threading.Lock()


def _session() -> str:
    req = gr.context.LocalContext.request.get(None)
    return getattr(req, "session_hash", None) or "-"


@contextlib.contextmanager
def _shown(action: str = ""):
    """Input errors (models.limits / interp.tasks.inputs) and unloadable models as gr.Error, one line; the message
    is also kept for the status line beside the action (`_status`), which stays after the toast has gone."""
    try:
        yield
    except (ValueError, KeyError, ModelLoadError) as e:
        msg = user_message(e)
        with _ERRORS_LOCK:
            if len(_ERRORS) > 10_000:
                _ERRORS.clear()
            _ERRORS[(_session(), action)] = msg
        raise gr.Error(msg, print_exception=False) from None


def _status(action: str):
    """A failure handler: the last error of `action` in this session, as a status line."""
    def show(request: gr.Request):
        with _ERRORS_LOCK:
            msg = _ERRORS.pop((getattr(request, "session_hash", None) or "-", action), "the last run failed")
        return f"<span style='color:#b91c1c'>**Error:** {msg}</span>"
    return show


def _ok() -> str:
    return ""


def _model(model: str | None) -> str | None:
    """The model box's value, checked against the hosted policy when hosted."""
    return HOSTED.model(model) if HOSTED else model


def _cap(value, cap_name: str, what: str):
    return HOSTED.cap(value, getattr(HOSTED, cap_name), what) if HOSTED else value


def _progress(progress, what: str):
    """A `progress(done, total)` callback for the tasks that drives gr.Progress."""
    if progress is None:
        return None
    return lambda i, n: progress((i, n), desc=what)


def sampling_defaults(model: str | None) -> tuple[int, float]:
    """(steps, guidance) a model is meant to be sampled with: its `discolens.json`, else diffusers' usual ones."""
    d = model_defaults(resolve_model_id((model or "").strip() or None))
    return min(d.steps, MAX_STEPS), float(d.guidance)


# ----------------------------------------------------------------------------------------------
# Generate & look
# ----------------------------------------------------------------------------------------------
def _player_update(gen):
    n = gen.trace.n_steps
    return gr.Slider(minimum=0, maximum=max(n - 1, 1), value=n - 1, step=1, label=f"Denoising step (0..{n - 1})")


@GPU
def generate(prompt: str, model: str = "shapes-v1", seed: float = 0, steps: float = 25, guidance: float = 3.0,
             negative_prompt: str = "", scheduler: str = "model default", progress=gr.Progress()):
    """Generate an image, its per-word cross-attention maps and every view of the stored trace."""
    with _shown("generate"):
        _cap(steps, "max_steps", "steps")
        gen = inputs.traced_generation(_model(model), prompt, seed=seed, steps=steps, guidance=guidance,
                                       negative_prompt=negative_prompt, scheduler=scheduler or None,
                                       progress=_progress(progress, "denoising"))
    key = CACHE.put(gen)
    ch = slice_choices(gen.trace)
    words = word_choices(gen)
    w = next((i for i, wd in enumerate(gen.words) if wd not in ("a", "of")), 0)
    last = gen.trace.n_steps - 1
    prev, heat, caption = step_frame(gen, w, last)
    return (gen.image.resize((256, 256), resample=0), gen.overlays(), key,
            gr.Dropdown(choices=ch["layers"], value="all"), gr.Dropdown(choices=ch["heads"], value="all"),
            gr.Dropdown(choices=ch["steps"], value="all"), slice_overlays(gen.image, gen),
            gr.Dropdown(choices=words, value=w), _player_update(gen), _big(prev), _big(heat), caption,
            _grid(gen, model_view(gen, w, None)), gr.Dropdown(choices=words, value=w))


def _grid(gen, cells):
    """The model view gallery: one column per head, tall enough for every layer without a scroll bar."""
    heads = max(l.heads for l in gen.trace.layers)
    rows = len(gen.trace.layers)
    return gr.Gallery(value=cells, columns=heads, height=rows * max(90, 560 // heads + 22) + 60)


def _big(im: Image.Image, side: int = 256) -> Image.Image:
    return im.resize((side, side), resample=Image.NEAREST) if im.width < side else im


def explore(state, layer: str, head: str, step: str):
    """Word maps of one slice (layer / head / step) of the last generation's trace (no model run)."""
    with _shown("explore"):
        return slice_overlays(CACHE.get(state).image, CACHE.get(state), layer, head, step)


def player_frame(state, word: int, step: float):
    """The timestep player's frame: the step's x0 preview and the word's map at that step (no model run)."""
    with _shown("player"):
        prev, heat, caption = step_frame(CACHE.get(state), int(word or 0), int(step or 0))
    return _big(prev), _big(heat), caption


def player_tick(state, step: float):
    """One tick of the player: the next step, and the timer stops at the last one."""
    if not state:
        return gr.Slider(), gr.Timer(active=False)
    with _shown("player"):
        n = CACHE.get(state).trace.n_steps
    nxt = int(step or 0) + 1
    if nxt >= n:
        return gr.Slider(value=n - 1), gr.Timer(active=False)
    return gr.Slider(value=nxt), gr.Timer(active=nxt < n - 1)


def play(state, step: float):
    """Play from the start (or from the current step if it is not the last)."""
    with _shown("player"):
        n = CACHE.get(state).trace.n_steps
    start = 0 if int(step or 0) >= n - 1 else int(step or 0)
    return gr.Slider(value=start), gr.Timer(active=True)


def model_grid(state, word: int, step: float, all_steps: bool):
    """Layers x heads thumbnails of one word's map at one step (or all steps averaged; no model run)."""
    with _shown("model-view"):
        gen = CACHE.get(state)
        return _grid(gen, model_view(gen, int(word or 0), None if all_steps else int(step or 0)))


def model_grid_at_step(state, word: int, step: float, all_steps: bool):
    """The model view follows the player's step (unless it shows all steps averaged)."""
    return gr.skip() if all_steps or not state else model_grid(state, word, step, False)


@GPU
def any_word(state, model: str, word: str):
    """Where the model would have put a word that was not in the prompt (stored queries; no UNet call)."""
    with _shown("any-word"):
        gen = CACHE.get(state)
        m, toks = inputs.any_word_map(_model(model), gen, word)
    note = (f"**{word.strip()}** (tokens: {' '.join(toks)}): the stored queries of every layer, head and step attend to "
            "the prompt's keys plus this word's keys (the word encoded alone, through each layer's key projection), "
            "softmax over both; no new UNet call. " + MAP_NOTE)
    return _big(overlay(gen.image, m)), note


@GPU
def intervene(state, model: str, word: int, scale: float, box: str, progress=gr.Progress()):
    """The same seed and settings with one word's cross-attention scaled (everywhere or in a box): before / after."""
    with _shown("intervene"):
        gen = CACHE.get(state)
        after = inputs.edited_generation(_model(model), gen, word, scale, box or None,
                                         progress=_progress(progress, "denoising (edited)"))
    w = gen.words[int(word)]
    where = f"inside the box {box.strip()}" if (box or "").strip() else "everywhere"
    note = (f"'{w}' attention x{float(scale):g} {where}, same seed ({gen.settings['seed']}), steps and guidance. "
            "Scale 0 removes the word's share of each layer's output; the maps below are the edited run's.")
    return _big(gen.image), _big(after.image), after.overlays(), note


def export_generation(state):
    """The image, the labelled word maps (PNG), the trace (safetensors) and its JSON manifest."""
    with _shown("export"):
        gen = CACHE.get(state)
    return [str(p) for p in export.export_generation(gen, tempfile.mkdtemp(prefix="discolens_"))]


# ----------------------------------------------------------------------------------------------
# Match & rank
# ----------------------------------------------------------------------------------------------
def scorer_description(name: str) -> str:
    """What the chosen scorer can and cannot tell apart (shown under the dropdown)."""
    return next((f"*{sc.description}*" for sc in scorers() if sc.name == name), "")


def _structure_notes(res: ScoreResult) -> str:
    """One line per caption: what the structure scorer bound, or why it fell back to LSE."""
    lines = []
    for c, s in (res.structure or {}).items():
        if s.method != "structure":
            lines.append(f"- `{c}`: {s.note}")
            continue
        parts = [f"bound words {', '.join(s.bound_words)}", f"binding {s.binding:+.4f}"]
        if s.relation is not None:
            parts.append(f"relation '{s.relation_word}' {s.relation:+.4f}")
        if s.note:
            parts.append(s.note)
        lines.append(f"- `{c}`: " + "; ".join(parts))
    return "\n".join(lines)


def _figure(res: ScoreResult, order: list[str]):
    """The figure that explains a score, and a line saying what it shows (or why there is none)."""
    if res.breakdown:
        return breakdown_plotly(res.breakdown, order), "LSE score by layer x timestep (brighter = more of the score)."
    if res.heads is not None:
        return heads_plotly(res.heads, order), "Head attributions: which layer x head drives each caption's score."
    if res.structure and any(s.method == "structure" for s in res.structure.values()):
        return structure_plotly(res.structure, order), "The structure score's terms: binding and relation direction."
    fallback = {c: s.lse for c, s in (res.structure or {}).items() if getattr(s, "lse", None) is not None}
    if res.structure and len(fallback) == len(res.structure):
        return (breakdown_plotly(fallback, order), "Every caption fell back to LSE (nothing to bind): its layer x "
                "timestep breakdown.")
    if res.extra.get("terms"):
        return (fused_terms_plotly(res.extra["terms"], order), "The fused score's two readings of the same UNet call: "
                f"the DPT adapter's match score and minus {res.extra['denoise_weight']:g} x the caption's denoising "
                "error relative to the candidates' mean (the weight chosen on validation).")
    used = res.routed_to or res.scorer
    if used.startswith("dpt"):
        return None, (f"No breakdown: the **{used}** score is the DPT adapter's match score, one number per caption "
                      "(max cosine over its matching queries). Choose **dpt_fused** to see it beside the denoising "
                      "error, **lse** for a layer x timestep breakdown.")
    return None, (f"No layer x timestep breakdown: the **{used}** score is one number per caption and timestep "
                  "(the denoising error of the whole image), not a sum over layers. Choose **lse** for a breakdown, "
                  "**head_weighted** for heads, **structure** for its terms.")


def _differing(a: str, b: str) -> tuple[set[str], set[str]]:
    wa, wb = a.split(), b.split()
    return {w for w in wa if w not in wb}, {w for w in wb if w not in wa}


@GPU
def match(image, captions_text: str, model: str = "shapes-v1", scorer: str = DEFAULT_SCORER,
          timesteps_text: str = "200 400 600 800", prompt_file=None, compare_maps: bool = True,
          progress=gr.Progress()):
    """Rank captions for an image: table, the score's figure (or why there is none), cost, notes, and the
    winner's and the runner-up's word maps for the words where they differ."""
    with _shown("match"):
        if HOSTED and prompt_file:
            raise ValueError("this hosted app takes no uploaded weights (attention prompts)")
        caps = [c for c in (captions_text or "").splitlines() if c.strip()]
        _cap(len(caps), "max_captions", "the number of captions")
        progress(0, desc="scoring")
        res = inputs.score_captions(_model(model), image, caps, scorer, timesteps=parse_numbers(timesteps_text),
                                    prompt_file=prompt_file)
        ranked = res.ranking()
        table = [[i + 1, c, round(v, 5)] for i, (c, v) in enumerate(ranked)]
        fig, about = _figure(res, [c for c, _ in ranked])
        cost = f"{res.unet_evals} UNet evaluations in {res.unet_calls} batched calls (all captions in one batch)"
        if res.unet_backwards:
            cost += f" and {res.unet_backwards} backward passes (captum)"
        notes = _structure_notes(res)
        if res.routed_to is not None:
            notes = f"Routed to **{res.routed_to}**.\n" + notes
        win = run = []
        if compare_maps and len(ranked) >= 2:
            progress(0.7, desc="word maps of the top two")
            (a, _), (b, _) = ranked[:2]
            maps = inputs.caption_word_maps(_model(model), image, [a, b])
            da, db = _differing(a, b)
            img = inputs.read_image(image)
            win = [(overlay(img, m), w) for w, m in zip(*maps[a]) if not da or w in da]
            run = [(overlay(img, m), w) for w, m in zip(*maps[b]) if not db or w in db]
    key = CACHE.put({"kind": "match", "table": table, "scores": res.by_caption, "heads": res.heads,
                     "breakdown": {c: {"layers": list(b.layers), "timesteps": list(b.timesteps),
                                       "table": [list(map(float, r)) for r in b.table]}
                                   for c, b in (res.breakdown or {}).items()}, "scorer": res.scorer,
                     "routed_to": res.routed_to})
    return table, fig, cost, about, notes, win, run, key


def export_match(state):
    """The ranking as JSON and CSV, and the score's details (breakdown / head tables) as JSON."""
    with _shown("match-export"):
        r = CACHE.get(state)
    folder = Path(tempfile.mkdtemp(prefix="discolens_"))
    paths = export.export_table(["rank", "caption", "score"], r["table"], folder, "ranking")
    paths.append(export.export_json(r, folder / "scores.json"))
    return [str(p) for p in paths]


def export_dataframe(df, stem: str = "table"):
    """A table as shown (a Dataframe's value) as JSON and CSV."""
    with _shown("export-table"):
        if df is None or (hasattr(df, "empty") and df.empty) or (isinstance(df, dict) and not df.get("data")):
            raise ValueError("nothing to export yet: run the view first")
        if isinstance(df, dict):
            headers, rows = df["headers"], df["data"]
        else:
            headers, rows = [str(c) for c in df.columns], df.values.tolist()
    folder = tempfile.mkdtemp(prefix="discolens_")
    return [str(p) for p in export.export_table(headers, rows, folder, stem)]


def export_failures(state):
    """Every failure of the last Failures run (captions, scores, category, image path) as JSON and CSV."""
    with _shown("failures-export"):
        res = CACHE.get(state)
    keys = ["id", "type", "category", "true_caption", "wrong_caption", "true_score", "wrong_score", "image_path"]
    folder = Path(tempfile.mkdtemp(prefix="discolens_"))
    paths = export.export_table(keys, [[f[k] for k in keys] for f in res["failures"]], folder, "failures")
    paths.append(export.export_json({k: v for k, v in res.items() if k != "failures"}, folder / "summary.json"))
    return [str(p) for p in paths]


def _paths(files) -> list:
    return [getattr(f, "name", f) for f in (files or [])]


@GPU
def rank_images(files, caption: str, model: str = "shapes-v1", scorer: str = "denoise_norm",
                timesteps_text: str = "200 400 600 800", progress=gr.Progress()):
    """One caption against K images (text -> image): the images best first, with their scores."""
    with _shown("rank-images"):
        paths = _paths(files)
        _cap(len(paths), "max_images", "the number of images")
        progress(0, desc="scoring each image")
        ranked = inputs.rank_images(_model(model), paths, caption, scorer, timesteps=parse_numbers(timesteps_text))
        imgs = [inputs.read_image(p) for p in paths]
    gallery = [(imgs[i].resize((128, 128), resample=0) if imgs[i].width < 128 else imgs[i], f"#{r + 1}: {s:.4f}")
               for r, (i, s) in enumerate(ranked)]
    table = [[r + 1, Path(paths[i]).name, round(s, 5)] for r, (i, s) in enumerate(ranked)]
    return gallery, table


@GPU
def classify(image, template: str, labels: str, model: str = "shapes-v1", scorer: str = DEFAULT_SCORER,
             timesteps_text: str = "200 400 600 800", progress=gr.Progress()):
    """Zero-shot classification: the template with each label, ranked; the winning label."""
    with _shown("classify"):
        progress(0, desc="scoring")
        res, caps = inputs.classify(_model(model), image, template, labels, scorer,
                                    timesteps=parse_numbers(timesteps_text))
    ranked = res.ranking()
    table = [[i + 1, caps[c], c, round(v, 5)] for i, (c, v) in enumerate(ranked)]
    return table, f"### It is **{caps[ranked[0][0]]}** (margin {ranked[0][1] - ranked[1][1]:.4f} over {caps[ranked[1][0]]})"


# ----------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------
FAIL_HEADERS = ["#", "id", "category", "true caption", "wrong caption", "true score", "wrong score"]


@GPU
def matching_failures(model: str, bench: str, split: str, scorer: str, n_items: float, timesteps_text: str,
                      progress=gr.Progress()):
    """The items the scorer gets wrong, with both captions, both scores and the category."""
    with _shown("failures"):
        _cap(n_items, "max_items", "the number of items")
        progress(0, desc=f"scoring {bench}")
        res = inputs.matching_failures(_model(model), bench, scorer, split, n_items,
                                       timesteps=parse_numbers(timesteps_text))
    rows = [[i, f["id"], f["category"], f["true_caption"], f["wrong_caption"], round(f["true_score"], 5),
             round(f["wrong_score"], 5)] for i, f in enumerate(res["failures"])]
    metrics = ", ".join(f"{k} {v:.2f}" for k, v in res["metrics"].items() if isinstance(v, float))
    summary = (f"**{len(res['failures'])} failures** on {res['n_items']} {res['benchmark']} {res['split']} items with "
               f"**{res['scorer']}** ({metrics}; {res['unet_evals']} UNet evaluations). Click a row (or give its # "
               "and press Open) to compare the two captions' word maps.")
    return rows, summary, CACHE.put(res)


@GPU
def open_failure(state, row: float, model: str = "shapes-v1", progress=gr.Progress()):
    """One failure: its image, and the true and the wrong caption's word maps on it."""
    with _shown("failures-open"):
        res = CACHE.get(state)
        i = inputs.check_int(row, "row", 0, max(len(res["failures"]) - 1, 0))
        if not res["failures"]:
            raise ValueError("no failures to open")
        f = res["failures"][i]
        progress(0, desc="word maps")
        maps = inputs.caption_word_maps(_model(model), f["image_path"], [f["true_caption"], f["wrong_caption"]])
        img = inputs.read_image(f["image_path"])
    gal = [[(overlay(img, m), w) for w, m in zip(*maps[c])] for c in (f["true_caption"], f["wrong_caption"])]
    text = (f"**{f['id']}** ({f['category']}): true **{f['true_caption']}** {f['true_score']:.4f} vs wrong "
            f"**{f['wrong_caption']}** {f['wrong_score']:.4f}. " + MAP_NOTE)
    return _big(img), gal[0], gal[1], text


def select_failure(evt: gr.SelectData):
    """A click on a table row -> its row number."""
    return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index


@GPU
def generation_failures(model: str, n_per_kind: float, split: str, progress=gr.Progress()):
    """Held-out prompts whose image the scene checker rejects, with its reason."""
    with _shown("gen-failures"):
        _cap(n_per_kind, "max_per_kind", "prompts per kind")
        progress(0, desc="generating held-out prompts")
        res = inputs.generation_failures(_model(model), n_per_kind, split)
    gallery = [(_big(f["image"], 128), f"{f['caption']}: {f['reason']}") for f in res["failures"]]
    rows = [[i, f["kind"], f["caption"], f["seed"], f["reason"]] for i, f in enumerate(res["failures"])]
    rates = ", ".join(f"{k} {v:.2f}" for k, v in res["rates"].items() if v is not None)
    summary = (f"**{len(res['failures'])} of {res['n']}** held-out {res['split']} generations rejected by the scene "
               f"checker (right: {rates}). Click one for its word maps.")
    return gallery, rows, summary, CACHE.put(res)


@GPU
def open_generation_failure(state, row: float, model: str = "shapes-v1"):
    """A rejected generation's word maps (one noised UNet call on that image)."""
    with _shown("gen-failures-open"):
        res = CACHE.get(state)
        if not res["failures"]:
            raise ValueError("no failures to open")
        f = res["failures"][inputs.check_int(row, "row", 0, len(res["failures"]) - 1)]
        maps = inputs.caption_word_maps(_model(model), f["image"], [f["caption"]])
    return [(overlay(f["image"], m), w) for w, m in zip(*maps[f["caption"]])], f"**{f['caption']}**: {f['reason']}"


# ----------------------------------------------------------------------------------------------
# Faithfulness
# ----------------------------------------------------------------------------------------------
def _default_model_b(models: list[str]) -> str:
    if PLAIN_MODEL in models:
        return PLAIN_MODEL
    return next((m for m in models[1:]), models[0])


def _labels(model_a: str, model_b: str) -> tuple[str, str]:
    a, b = model_a or "shapes-v1", model_b or "shapes-v1"
    return (f"A: {a}", f"B: {b}") if a == b else (a, b)


@GPU
def faithfulness(seed: float, kind: str, model_a: str, model_b: str, timestep: float, progress=gr.Progress()):
    """Word maps of two models on one held-out render, scored per word against the exact masks."""
    la, lb = _labels(model_a, model_b)
    with _shown("faithfulness"):
        progress(0, desc="two noised UNet calls")
        scene, image, res = inputs.compare_models({la: _model(model_a), lb: _model(model_b)}, seed, kind, timestep)
    galleries = []
    for name in (la, lb):
        r = res["models"][name]
        galleries.append([(overlay(image, m), w if mt["pointing"] is None else
                           f"{w} {'✓' if mt['pointing'] else '✗'} {mt['energy']:.2f}")
                          for w, m, mt in zip(res["words"], r["maps"], r["metrics"])])
    headers = ["word", "class", "mask area"] + [f"{n} {k}" for n in (la, lb) for k in ("pointing", "energy")]
    rows = []
    for i, w in enumerate(res["words"]):
        ms = [res["models"][n]["metrics"][i] for n in (la, lb)]
        if ms[0]["pointing"] is None:
            rows.append([w, ms[0]["word_class"] or "", "-"] + ["-"] * 4)
            continue
        rows.append([w, ms[0]["word_class"], round(ms[0]["area"], 3)]
                    + [v for m in ms for v in (int(m["pointing"]), round(m["energy"], 3))])
    rows.append(["mean (masked words)", "", ""] + [round(res["models"][n][k], 3) for n in (la, lb)
                                                   for k in ("mean_pointing", "mean_energy")])
    table = {"headers": headers, "data": rows}
    summary = (f"**{scene.caption}** ({scene.kind} scene, seed {int(float(seed))}); one noised UNet call per model at "
               f"t={res['timestep']}, all layers and heads averaged. Labels: ✓ / ✗ = the map's peak is / is not in "
               "the word's mask (pointing), then the share of the map inside the mask (energy; a uniform map scores "
               "the mask area, the chance level in the table). " + MAP_NOTE)
    return image.resize((256, 256), resample=0), galleries[0], galleries[1], table, summary


@GPU
def atlas(model: str, timestep: float, n_scenes: float, metric: str, progress=gr.Progress()):
    """The head atlas of a model on held-out renders: plot, the table (for re-plotting), and what was run."""
    with _shown("atlas"):
        _cap(n_scenes, "max_atlas_scenes", "the number of scenes")
        progress(0, desc="held-out scenes")
        table, fig = inputs.head_atlas(_model(model), timestep, n_scenes, metric)
    note = (f"{model or 'shapes-v1'}: {int(float(n_scenes))} held-out scenes at t={int(float(timestep))}, one noised "
            "UNet call each; every layer x head scored per word class. **Chance levels**: a uniform map's energy is "
            "the mask's share of the image (one object 5-10 %, a count scene's 2-3 objects 10-25 %), and its peak "
            "lands in the mask (pointing) with that same probability; the values are not chance-corrected.")
    return fig, table, note


def export_atlas(table):
    """The last head atlas's table (every layer x head, per word class and metric) as JSON."""
    with _shown("atlas-export"):
        if not table:
            raise ValueError("nothing to export yet: run the head atlas first")
    return [str(export.export_json(table, Path(tempfile.mkdtemp(prefix="discolens_")) / "head_atlas.json"))]


def replot_atlas(table, metric: str):
    """The last atlas under another metric (no model run)."""
    with _shown("atlas"):
        return inputs.replot_atlas(table, metric)


# ----------------------------------------------------------------------------------------------
# Self-correction (DPT)
# ----------------------------------------------------------------------------------------------
@GPU
def self_correction(prompt: str, model: str = "shapes-v1", seed: float = 0, steps: float = 25, guidance: float = 3.0,
                    eta: float = DEFAULT_CORRECTION_ETA, reading: str = "noise_only", lora: bool = False,
                    objective: str = "score", read: str = "z_t", step_range: str = "", progress=gr.Progress()):
    """A DPT self-corrected generation beside the plain one (same seed), its trajectory, ITM score and boxes;
    `lora`: both from the DPT-tuned model (stage 2), steered by its own adapter; `objective`: score (Eq. 9) or
    contrast (against the prompt's hard negatives); `read`: z_t (Eq. 9) or x0 (the predicted clean latent);
    `step_range`: the corrected steps, "START:STOP" (empty: all)."""
    with _shown("self-correction"):
        _cap(steps, "max_steps", "steps")
        v = inputs.self_correction_view(_model(model), prompt, seed=seed, steps=steps, guidance=guidance, eta=eta,
                                        reading=reading, progress=_progress(progress, "self-corrected denoising"),
                                        lora=bool(lora), objective=objective, read=read, step_range=step_range)
    t = v.trajectory
    note = (f"**{t.prompt}**, seed {t.seed}, {t.steps} steps, guidance {t.guidance:g}, η = {t.eta:g} "
            f"({t.reading}, objective {t.objective}"
            + (f" against {len(t.negatives)} negatives: {'; '.join(t.negatives)}" if t.negatives else "")
            + f", read at {t.read}); corrected steps {t.step_range[0]}..{t.step_range[1]}; {t.unet_calls} UNet calls, "
            f"{t.unet_backwards} backward passes. Left: self-corrected; right: plain sampler, same seed"
            + ("; both from the DPT-tuned model (stage-2 LoRA)." if lora else "."))
    return v.image, v.plain, v.boxed, v.figure, v.strip, {"headers": v.headers, "data": v.rows}, note


@GPU
def best_of(prompt: str, model: str = "shapes-v1", seed: float = 0, steps: float = 25, guidance: float = 3.0,
            n: float = 2, lora: bool = False):
    """Best of N, the alternative to self-correction: N plain samples (the first at `seed`), each with the DPT
    adapter's score, the kept one marked; `lora`: the DPT-tuned model and its own adapter."""
    with _shown("best-of"):
        _cap(steps, "max_steps", "steps")
        _, info = inputs.best_of_generation(_model(model), prompt, seed=seed, n=n, steps=steps, guidance=guidance,
                                            lora=bool(lora))
    k = info["index"]
    gallery = [(im.resize((192, 192), resample=0) if im.width < 192 else im,
                f"seed {sd}: s = {sc:.3f}" + (" (kept)" if i == k else ""))
               for i, (im, sd, sc) in enumerate(zip(info["images"], info["seeds"], info["scores"]))]
    note = (f"Best of {len(info['seeds'])}: kept seed {info['seed']} (DPT score {info['scores'][k]:.3f}); the first "
            f"sample is the plain sampler at seed {info['seeds'][0]}. {info['unet_calls']} UNet calls, no backward "
            "passes" + (", from the DPT-tuned model." if lora else ".") + " On the bundled model's test prompts best "
            "of 2 counts 0.93 against the plain 0.74 (docs/dpt.md).")
    return gallery, note


# ----------------------------------------------------------------------------------------------
# Image -> text (D-DiT)
# ----------------------------------------------------------------------------------------------
def heldout_scene(index: float):
    """A held-out (validation) scene, rendered, and its caption (no model run)."""
    with _shown("heldout-scene"):
        img, caption = inputs.heldout_scene(index)
    return img, f"Held-out scene {int(float(index))}: *{caption}*"


@GPU
def image_to_text(image, task: str = "caption", question: str = "", model: str = "shapes-v1", seed: float = 0,
                  progress=gr.Progress()):
    """Caption an image, or answer a question about it, by masked text diffusion; its unmasking timeline."""
    with _shown("image-to-text"):
        progress(0, desc="masked text diffusion")
        img, res = inputs.image_to_text(_model(model), image, task, question, seed)
        s = res.sample
        pos, step = min(s.prefix_len, s.length - 1), len(s.steps) - 1
        cand, att = inputs.text_sample_views(img, s, step, pos)
    text = (f"### Caption: **{res.caption}**" if task == "caption" else
            f"### {res.question} → **{res.answer}**")
    return (text, timeline_plotly(s),
            gr.Slider(minimum=0, maximum=max(s.length - 1, 1), value=pos, step=1, label=f"Text position (0..{s.length - 1})"),
            cand, gr.Slider(minimum=0, maximum=max(step, 1), value=step, step=1, label=f"Reverse step (0..{step})"),
            att, CACHE.put({"image": img, "sample": s}))


def text_frame(state, step: float, position: float):
    """One position's candidates over the steps and its attention over the image at one step (no model run)."""
    with _shown("image-to-text-frame"):
        if not state:
            raise ValueError("run a caption or a question first")
        r = CACHE.get(state)
        return inputs.text_sample_views(r["image"], r["sample"], step, position)


# ----------------------------------------------------------------------------------------------
# Learn
# ----------------------------------------------------------------------------------------------
LEARN = r"""
## How to read each view

**Word maps (Generate & look).** Each cross-attention layer lets every image position (query *q*) look at the
prompt's tokens (keys *k*): $A = \mathrm{softmax}(q k^\top / \sqrt{d})$, one map per token, per head, per layer, per
denoising step. A word's map is its tokens' columns summed, averaged over heads, steps and layers (upsampled to the
image). Each map is scaled to its own min..max: compare *where*, not *how much*.

**Timestep player.** At step *t* the model predicts the clean image
$\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\epsilon)/\sqrt{\bar\alpha_t}$; the player shows that prediction and
the chosen word's map at that step. Early steps decide the layout, late ones the details.

**Model view.** The same word's map in every layer (rows) and head (columns): which heads ground the word, which
look elsewhere. Click a thumbnail to enlarge it.

**Any word's map.** The queries *q* are stored with the trace, so a word that was not in the prompt can be attended
to afterwards: its keys $k_w$ (the word encoded alone) join the prompt's keys in the softmax, and its column is
read out — no new UNet call (the idea of OVAM).

**Attention edit.** The chosen word's attention column is multiplied by a scale (0 removes it) everywhere or inside
a box, and the same seed is generated again: if the map is causal, the object should change where it was edited.

**LSE score (Match).** Per caption, pool its word maps with LogSumExp,
$s = \frac{1}{\lambda}\log\sum_{i} e^{\lambda a_i}$, over positions and tokens, then average over layers and
timesteps (Discffusion Eq. 4). It cannot read word order: a caption and its role swap attend to the same words.

**Denoising score.** Noise the image to timestep *t* and ask how well each caption predicts the noise:
$s = -\mathbb{E}_t\,\|\epsilon - \epsilon_\theta(x_t, t, c)\|^2$ (the Diffusion Classifier). *denoise_norm*
subtracts the empty prompt's error, so scores compare across images (text → image).

**Structure score.** Bind each phrase's words (do "red" and "circle" attend to one place?) and check the relation's
direction (is the subject's centroid on the relation's side of the object's?): $s = \text{binding} + \text{relation}$.

**auto (routed).** Structure where the captions use the same words rearranged (role swaps, attribute swaps,
flipped relations), denoising elsewhere — the best measured scorer on the four benchmarks.

**Pointing and energy (Faithfulness).** Pointing: is the map's peak inside the word's object mask? Energy:
$\sum_{p\in M} a_p / \sum_p a_p$, the share of the map inside the mask; a uniform map scores the mask area.

**Failures.** The benchmark items a scorer gets wrong, with the category of the difference between the captions,
and the held-out prompts whose generation the scene checker rejects, with its reason.

**Export.** Every view's data: the image and labelled word maps as PNG, the trace as safetensors with a JSON
manifest (shapes `[steps, heads, h, w, tokens]`), rankings as JSON / CSV. Plots have a camera button (PNG).
"""


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
CSS = """
#word-maps .caption-label, #slice-maps .caption-label, .gallery-item .caption-label {white-space: normal !important;}
#match-scorer {min-width: 420px}
"""


def ImageInput(**kw) -> gr.Image:
    """An image upload (`gr.Image(type="filepath")`) that passes an unreadable file's path on to the task (whose
    `read_image` says what is wrong, in the same words as the CLI) instead of failing inside Gradio with a bare
    "Error". (A wrapped instance method, not a subclass: Gradio writes a .pyi stub beside any component subclass.)"""
    comp = gr.Image(**kw)
    strict = comp.preprocess

    def preprocess(payload):
        try:
            return strict(payload)
        except (OSError, ValueError, Image.DecompressionBombError):  # PIL's UnidentifiedImageError is an OSError
            return str(payload.path) if payload is not None and payload.path else None

    comp.preprocess = preprocess
    return comp


def _gallery(label: str, elem_id: str, columns: int = 8, height="auto") -> gr.Gallery:
    return gr.Gallery(label=label, columns=columns, height=height, object_fit="contain", elem_id=elem_id,
                      allow_preview=True, interactive=False)


def build_demo() -> gr.Blocks:
    models = list(bundled_models()) or ["shapes-v1"]
    default_steps, default_guidance = sampling_defaults(models[0])
    scorer_choices = [(sc.label, sc.name) for sc in scorers()]
    with gr.Blocks(title="DiscoLens") as demo:
        gr.Markdown("# DiscoLens\nText-to-image diffusion models as discriminators: generate and see where each "
                    "word's cross-attention goes, rank captions and images, find the failures. New here? "
                    "Open **Learn**, or click an example on any tab.")
        model = gr.Dropdown(models, value=models[0], label="Model (bundled name" + (
            ")" if HOSTED and not HOSTED.allow_hub else ", hub id" + ("" if HOSTED else " or local folder") + ")"),
            allow_custom_value=not HOSTED or HOSTED.allow_hub, elem_id="model")
        with gr.Tabs(elem_id="tabs"):
            # ---------------- Generate & look ----------------
            with gr.Tab("Generate & look", id="generate-tab", elem_id="generate-tab"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt (optional)", value="", elem_id="negative")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed (0..4294967295)", elem_id="seed")
                            steps = gr.Number(value=default_steps, precision=0, label=f"Steps (1..{MAX_STEPS})",
                                              elem_id="steps")
                            guidance = gr.Number(value=default_guidance, label=f"Guidance (0..{MAX_GUIDANCE:g})",
                                                 elem_id="guidance")
                            scheduler = gr.Dropdown(list(SCHEDULERS), value="model default", label="Scheduler",
                                                    elem_id="scheduler")
                        go = gr.Button("Generate", variant="primary", elem_id="generate")
                        gen_status = gr.Markdown(elem_id="generate-status")
                        gr.Examples([["a red circle left of a blue square", 0], ["two green triangles", 3],
                                     ["a big yellow square above a purple circle", 7]], [prompt, seed],
                                    label="Examples (click, then Generate)")
                    with gr.Column(scale=1):
                        image = gr.Image(label="Generated image", type="pil", elem_id="image", interactive=False,
                                         height=280)
                maps = _gallery("Cross-attention per word (all layers, heads and steps averaged)", "word-maps")
                with gr.Row():
                    gr.Image(colorbar(), show_label=False, container=False, interactive=False, height=18,
                             elem_id="colorbar", scale=1)
                    gr.Markdown(MAP_NOTE, elem_id="map-note")
                state = gr.State(None)
                with gr.Accordion("Timestep player: the x0 preview and a word's map at each denoising step", open=True):
                    with gr.Row():
                        p_word = gr.Dropdown([], label="Word", elem_id="player-word", scale=1)
                        p_step = gr.Slider(0, 24, value=24, step=1, label="Denoising step", elem_id="player-step",
                                           scale=3)
                        p_play = gr.Button("▶ Play", elem_id="player-play", scale=1)
                    with gr.Row():
                        p_prev = gr.Image(label="x0 preview at this step", elem_id="player-preview",
                                          interactive=False, height=260)
                        p_map = gr.Image(label="the word's map at this step", elem_id="player-map",
                                         interactive=False, height=260)
                    p_caption = gr.Markdown(elem_id="player-caption")
                    timer = gr.Timer(0.4, active=False)
                with gr.Accordion("Model view: one word's map in every layer (rows) x head (columns); click to enlarge",
                                  open=True):
                    with gr.Row():
                        with gr.Column(scale=1):
                            mv = _gallery("layers x heads", "model-view", columns=4, height=1100)
                        with gr.Column(scale=1):
                            mv_all = gr.Checkbox(True, label="all steps averaged (untick: the player's step)",
                                                 elem_id="model-view-all")
                            gr.Markdown("Rows: the cross-attention layers in UNet order (down, mid, up), labelled "
                                        "`stage.block.attn.index`; columns: heads. Each thumbnail is the word's map in "
                                        "that layer and head, scaled on its own. Heads that ground the word light up "
                                        "on its object; others attend to the background or to everything.")
                with gr.Accordion("Trace explorer: one layer, head or denoising step", open=False):
                    with gr.Row():
                        layer = gr.Dropdown(["all"], value="all", label="Layer", elem_id="layer")
                        head = gr.Dropdown(["all"], value="all", label="Head", elem_id="head")
                        step = gr.Dropdown(["all"], value="all", label="Step (timestep)", elem_id="step")
                    slice_maps = _gallery("Cross-attention per word, selected slice", "slice-maps")
                with gr.Accordion("Any word's map, after the fact (no new UNet call)", open=True):
                    with gr.Row():
                        aw_word = gr.Textbox(value="green", label="A word (need not be in the prompt)",
                                             elem_id="any-word")
                        aw_go = gr.Button("Where would it go?", elem_id="any-word-go")
                    with gr.Row():
                        aw_map = gr.Image(label="its map", elem_id="any-word-map", interactive=False, height=260)
                        aw_note = gr.Markdown(elem_id="any-word-note")
                    aw_status = gr.Markdown()
                    gr.Examples([["green"], ["triangle"], ["square"]], [aw_word], label="Examples")
                with gr.Accordion("Attention edit: scale one word's attention, regenerate with the same seed",
                                  open=True):
                    with gr.Row():
                        ed_word = gr.Dropdown([], label="Word", elem_id="edit-word")
                        ed_scale = gr.Number(0.0, label="Scale (0 removes, >1 amplifies; 0..10)", elem_id="edit-scale")
                        ed_box = gr.Textbox("", label="Box x0 y0 x1 y1 in 0..1 (empty: everywhere)", elem_id="edit-box")
                        ed_go = gr.Button("Regenerate with the edit", elem_id="edit-go")
                    with gr.Row():
                        ed_before = gr.Image(label="before", elem_id="edit-before", interactive=False, height=260)
                        ed_after = gr.Image(label="after", elem_id="edit-after", interactive=False, height=260)
                    ed_maps = _gallery("after: word maps", "edit-maps")
                    ed_note = gr.Markdown(elem_id="edit-note")
                    gr.Examples([[0.0, ""], [0.0, "0 0 0.5 1"], [3.0, ""]], [ed_scale, ed_box], label="Examples")
                with gr.Row():
                    ex_go = gr.Button("Export: image, word maps (PNG), trace (safetensors + manifest)",
                                      elem_id="export-generation")
                    ex_files = gr.File(label="Exported files", file_count="multiple", elem_id="export-files")

                gen_inputs = [prompt, model, seed, steps, guidance, negative, scheduler]
                gen_outputs = [image, maps, state, layer, head, step, slice_maps, p_word, p_step, p_prev, p_map,
                               p_caption, mv, ed_word]
                ev = go.click(generate, gen_inputs, gen_outputs, api_name="generate", concurrency_id=MODEL,
                              concurrency_limit=1)
                ev.success(_ok, None, gen_status, api_name=False)
                ev.failure(_status("generate"), None, gen_status, api_name=False)
                prompt.submit(generate, gen_inputs, gen_outputs, api_name=False, concurrency_id=MODEL)
                gr.on([layer.change, head.change, step.change], explore, [state, layer, head, step], slice_maps,
                      api_name="explore", concurrency_limit=8, trigger_mode="always_last")
                gr.on([p_step.change, p_word.change], player_frame, [state, p_word, p_step],
                      [p_prev, p_map, p_caption], api_name="player_frame", concurrency_limit=8,
                      trigger_mode="always_last")
                gr.on([p_word.change, mv_all.change], model_grid, [state, p_word, p_step, mv_all], mv,
                      api_name="model_view", concurrency_limit=8, trigger_mode="always_last")
                p_step.change(model_grid_at_step, [state, p_word, p_step, mv_all], mv, api_name=False,
                              concurrency_limit=8, trigger_mode="always_last")
                p_play.click(play, [state, p_step], [p_step, timer], api_name=False)
                timer.tick(player_tick, [state, p_step], [p_step, timer], api_name=False)
                ev = aw_go.click(any_word, [state, model, aw_word], [aw_map, aw_note], api_name="any_word",
                                 concurrency_id=MODEL)
                ev.success(_ok, None, aw_status, api_name=False)
                ev.failure(_status("any-word"), None, aw_status, api_name=False)
                ev = ed_go.click(intervene, [state, model, ed_word, ed_scale, ed_box],
                                 [ed_before, ed_after, ed_maps, ed_note], api_name="intervene", concurrency_id=MODEL)
                ev.failure(_status("intervene"), None, ed_note, api_name=False)
                ex_go.click(export_generation, state, ex_files, api_name="export_generation")

            # ---------------- Match & rank ----------------
            with gr.Tab("Match & rank", id="match-tab", elem_id="match-tab"):
                gr.Markdown("One noised UNet call per timestep, all captions in one batch, the same noise for every "
                            "caption. Three directions: captions for an image, images for a caption, labels for an image.")
                m_scorer = gr.Dropdown(scorer_choices, value=DEFAULT_SCORER, label="Scorer", elem_id="match-scorer")
                m_about = gr.Markdown(scorer_description(DEFAULT_SCORER), elem_id="match-scorer-about")
                m_ts = gr.Textbox(value="200 400 600 800", label="Timesteps", elem_id="match-timesteps")
                with gr.Tabs():
                    with gr.Tab("Image → captions", elem_id="match-i2t"):
                        with gr.Row():
                            with gr.Column():
                                m_image = ImageInput(label="Image", type="filepath", elem_id="match-image", height=220)
                                m_caps = gr.Textbox(label="Captions (one per line)", lines=4, elem_id="match-captions",
                                                    value="a red circle left of a blue square\n"
                                                          "a blue square left of a red circle\n"
                                                          "a red circle right of a blue square")
                                m_compare = gr.Checkbox(True, label="word maps of the top two (2 more UNet calls)",
                                                        elem_id="match-compare")
                                m_prompt = gr.File(label="Attention prompt (optional; a .safetensors file from "
                                                   "cli.py train-prompt)", file_types=[".safetensors"],
                                                   type="filepath", elem_id="match-prompt", visible=not HOSTED)
                                m_go = gr.Button("Rank captions", variant="primary", elem_id="match")
                                m_status = gr.Markdown(elem_id="match-status")
                            with gr.Column():
                                m_table = gr.Dataframe(headers=["rank", "caption", "score"], label="Ranking",
                                                       elem_id="match-ranking", wrap=True)
                                m_cost = gr.Markdown(elem_id="match-cost")
                                m_notes = gr.Markdown(elem_id="match-notes")
                        m_fig_about = gr.Markdown(elem_id="match-breakdown-about")
                        m_plot = gr.Plot(label="Why this score", elem_id="match-breakdown")
                        with gr.Row():
                            m_win = _gallery("Winner: word maps where the captions differ", "match-winner-maps", 4)
                            m_run = _gallery("Runner-up: word maps where the captions differ", "match-runner-maps", 4)
                        with gr.Row():
                            m_ex = gr.Button("Export ranking and scores (JSON / CSV)", elem_id="match-export")
                            m_files = gr.File(label="Exported files", file_count="multiple", elem_id="match-files")
                        m_state = gr.State(None)
                        ex_img = str(Path(__file__).parent / "assets" / "benchmarks" / "comvg" / "images" / "0000.png")
                        gr.Examples([[ex_img, "a red square above a blue square\na yellow square above a blue square"],
                                     [ex_img, "a red square above a blue square\na blue square above a red square"]],
                                    [m_image, m_caps], label="Examples")
                    with gr.Tab("Text → images", elem_id="match-t2i"):
                        with gr.Row():
                            with gr.Column():
                                t_files = gr.File(label="Images (2 or more)", file_count="multiple",
                                                  file_types=["image"], type="filepath", elem_id="t2i-images")
                                t_caption = gr.Textbox(value="a red square above a blue square", label="Caption",
                                                       elem_id="t2i-caption")
                                t_scorer = gr.Dropdown(scorer_choices, value="denoise_norm",
                                                       label="Scorer (denoise_norm compares across images)",
                                                       elem_id="t2i-scorer")
                                t_go = gr.Button("Rank images", variant="primary", elem_id="t2i-go")
                                t_status = gr.Markdown()
                            with gr.Column():
                                t_gallery = _gallery("Images, best first", "t2i-ranked", 4)
                                t_table = gr.Dataframe(headers=["rank", "image", "score"], elem_id="t2i-table")
                        bench_dir = Path(__file__).parent / "assets" / "benchmarks" / "winoground" / "images"
                        gr.Examples([[[str(bench_dir / "0000_0.png"), str(bench_dir / "0000_1.png")],
                                      "a yellow circle left of a blue triangle"]], [t_files, t_caption],
                                    label="Examples")
                    with gr.Tab("Zero-shot labels", elem_id="match-zs"):
                        with gr.Row():
                            with gr.Column():
                                z_image = ImageInput(label="Image", type="filepath", elem_id="zs-image", height=220)
                                z_template = gr.Textbox("a {} square above a blue square",
                                                        label="Template ({} = the label)", elem_id="zs-template")
                                z_labels = gr.Textbox("red, yellow, green, purple", label="Labels (comma or line)",
                                                      elem_id="zs-labels")
                                z_go = gr.Button("Classify", variant="primary", elem_id="zs-go")
                                z_status = gr.Markdown()
                            with gr.Column():
                                z_answer = gr.Markdown(elem_id="zs-answer")
                                z_table = gr.Dataframe(headers=["rank", "label", "caption", "score"], elem_id="zs-table")
                        gr.Examples([[ex_img, "a {} square above a blue square", "red, yellow, green, purple"],
                                     [str(Path(__file__).parent / "assets" / "benchmarks" / "counting" / "images" /
                                          "0000.png"), "{} blue circles", "two, three"]],
                                    [z_image, z_template, z_labels], label="Examples (which colour / which count?)")
                ev = m_go.click(match, [m_image, m_caps, model, m_scorer, m_ts, m_prompt, m_compare],
                                [m_table, m_plot, m_cost, m_fig_about, m_notes, m_win, m_run, m_state],
                                api_name="match", concurrency_id=MODEL)
                ev.success(_ok, None, m_status, api_name=False)
                ev.failure(_status("match"), None, m_status, api_name=False)
                m_ex.click(export_match, m_state, m_files, api_name="export_match")
                m_scorer.change(scorer_description, m_scorer, m_about, api_name=False)
                image.change(lambda im: im.resize((64, 64)) if im is not None else None, image, m_image, api_name=False)
                ev = t_go.click(rank_images, [t_files, t_caption, model, t_scorer, m_ts], [t_gallery, t_table],
                                api_name="rank_images", concurrency_id=MODEL)
                ev.success(_ok, None, t_status, api_name=False)
                ev.failure(_status("rank-images"), None, t_status, api_name=False)
                ev = z_go.click(classify, [z_image, z_template, z_labels, model, m_scorer, m_ts], [z_table, z_answer],
                                api_name="classify", concurrency_id=MODEL)
                ev.success(_ok, None, z_status, api_name=False)
                ev.failure(_status("classify"), None, z_status, api_name=False)

            # ---------------- Failures ----------------
            with gr.Tab("Failures", id="failures-tab", elem_id="failures-tab"):
                gr.Markdown("### Matching failures: benchmark items the scorer gets wrong")
                with gr.Row():
                    f_bench = gr.Dropdown(list(BENCHMARKS), value="comvg", label="Benchmark", elem_id="fail-bench")
                    f_split = gr.Dropdown(list(inputs.SPLITS), value="test", label="Split", elem_id="fail-split")
                    f_scorer = gr.Dropdown(scorer_choices, value="lse", label="Scorer", elem_id="fail-scorer")
                    f_n = gr.Number(20, precision=0, label="Items (first N of the split)", elem_id="fail-n")
                    f_ts = gr.Textbox("300 600", label="Timesteps", elem_id="fail-timesteps")
                f_go = gr.Button("Find failures", variant="primary", elem_id="fail-go")
                f_summary = gr.Markdown(elem_id="fail-summary")
                f_table = gr.Dataframe(headers=FAIL_HEADERS, elem_id="fail-table", wrap=True, interactive=False)
                with gr.Row():
                    f_row = gr.Number(0, precision=0, label="Row #", elem_id="fail-row")
                    f_open = gr.Button("Open", elem_id="fail-open")
                with gr.Row():
                    f_image = gr.Image(label="Image", elem_id="fail-image", interactive=False, height=220, scale=1)
                    with gr.Column(scale=3):
                        f_true = _gallery("True caption: word maps", "fail-true-maps", 5)
                        f_wrong = _gallery("Wrong caption (scored higher or equal): word maps", "fail-wrong-maps", 5)
                f_text = gr.Markdown(elem_id="fail-text")
                f_state = gr.State(None)
                with gr.Row():
                    f_ex = gr.Button("Export failures (JSON / CSV)", elem_id="fail-export")
                    f_files = gr.File(label="Exported files", file_count="multiple", elem_id="fail-files")
                gr.Examples([["comvg", "lse"], ["winoground", "denoise"], ["counting", "auto"]], [f_bench, f_scorer],
                            label="Examples")
                f_ex.click(export_failures, f_state, f_files, api_name="export_failures")
                ev = f_go.click(matching_failures, [model, f_bench, f_split, f_scorer, f_n, f_ts],
                                [f_table, f_summary, f_state], api_name="failures", concurrency_id=MODEL)
                ev.failure(_status("failures"), None, f_summary, api_name=False)
                f_table.select(select_failure, None, f_row, api_name=False).then(
                    open_failure, [f_state, f_row, model], [f_image, f_true, f_wrong, f_text], api_name=False,
                    concurrency_id=MODEL)
                ev = f_open.click(open_failure, [f_state, f_row, model], [f_image, f_true, f_wrong, f_text],
                                  api_name="open_failure", concurrency_id=MODEL)
                ev.failure(_status("failures-open"), None, f_text, api_name=False)

                gr.Markdown("### Generation failures: held-out prompts whose image the scene checker rejects")
                with gr.Row():
                    g_n = gr.Number(3, precision=0, label="Prompts per kind (single, relation, count)",
                                    elem_id="genfail-n")
                    g_split = gr.Dropdown(["test", "validation", "compositional"], value="test", label="Split",
                                          elem_id="genfail-split")
                    g_go = gr.Button("Generate and check", variant="primary", elem_id="genfail-go")
                g_summary = gr.Markdown(elem_id="genfail-summary")
                g_gallery = _gallery("Rejected generations (caption: the checker's reason)", "genfail-gallery", 6)
                g_table = gr.Dataframe(headers=["#", "kind", "caption", "seed", "reason"], elem_id="genfail-table",
                                       wrap=True, interactive=False)
                g_maps = _gallery("Its word maps (one noised UNet call on that image)", "genfail-maps")
                g_text = gr.Markdown()
                g_state = gr.State(None)
                g_row = gr.Number(0, precision=0, visible=False)
                ev = g_go.click(generation_failures, [model, g_n, g_split], [g_gallery, g_table, g_summary, g_state],
                                api_name="generation_failures", concurrency_id=MODEL)
                ev.failure(_status("gen-failures"), None, g_summary, api_name=False)
                g_gallery.select(select_failure, None, g_row, api_name=False).then(
                    open_generation_failure, [g_state, g_row, model], [g_maps, g_text], api_name=False,
                    concurrency_id=MODEL)
                g_table.select(select_failure, None, g_row, api_name=False).then(
                    open_generation_failure, [g_state, g_row, model], [g_maps, g_text],
                    api_name="open_generation_failure", concurrency_id=MODEL)

            # ---------------- Faithfulness ----------------
            with gr.Tab("Faithfulness", id="faith-tab", elem_id="faith-tab"):
                gr.Markdown("A held-out render of the shapes world, its caption's word maps in two models (e.g. "
                            "trained with and without the token loss), and each word's map scored against the exact "
                            "mask of its object(s).")
                with gr.Row():
                    f_seed = gr.Number(value=0, precision=0, label="Scene seed", elem_id="faith-seed")
                    f_kind = gr.Dropdown(list(world.KINDS), value="relation", label="Scene kind", elem_id="faith-kind")
                    f_model_a = gr.Dropdown(models, value=models[0], label="Model A", allow_custom_value=not HOSTED,
                                            elem_id="faith-model-a")
                    f_model_b = gr.Dropdown(models, value=_default_model_b(models), label="Model B",
                                            allow_custom_value=not HOSTED, elem_id="faith-model-b")
                    f_t = gr.Number(value=300, precision=0, label="Timestep", elem_id="faith-timestep")
                fa_go = gr.Button("Compare word maps", variant="primary", elem_id="faith-go")
                with gr.Row():
                    fa_image = gr.Image(label="Held-out render", type="pil", elem_id="faith-image", scale=1,
                                        interactive=False, height=240)
                    with gr.Column(scale=3):
                        f_maps_a = _gallery("Model A: word maps (✓/✗ pointing, energy)", "faith-maps-a", 6)
                        f_maps_b = _gallery("Model B: word maps (✓/✗ pointing, energy)", "faith-maps-b", 6)
                f_summary2 = gr.Markdown(elem_id="faith-summary")
                fa_table = gr.Dataframe(label="Per word: pointing game (1 = hit) and energy inside the mask",
                                        elem_id="faith-table")
                with gr.Row():
                    fa_ex = gr.Button("Export the table (JSON / CSV)", elem_id="faith-export")
                    fa_files = gr.File(label="Exported files", file_count="multiple", elem_id="faith-files")
                fa_ex.click(lambda df: export_dataframe(df, "faithfulness"), fa_table, fa_files,
                            api_name="export_faithfulness")
                gr.Examples([[0, "relation"], [3, "count"], [5, "single"]], [f_seed, f_kind], label="Examples")
                ev = fa_go.click(faithfulness, [f_seed, f_kind, f_model_a, f_model_b, f_t],
                                 [fa_image, f_maps_a, f_maps_b, fa_table, f_summary2], api_name="faithfulness",
                                 concurrency_id=MODEL)
                ev.failure(_status("faithfulness"), None, f_summary2, api_name=False)

                gr.Markdown("### Head atlas of model A: which word class does each layer x head ground best?")
                with gr.Row():
                    a_scenes = gr.Number(value=12, precision=0, label=f"Held-out scenes (1..{MAX_ATLAS_SCENES})",
                                         elem_id="atlas-scenes")
                    a_metric = gr.Radio(list(inputs.ATLAS_METRICS), value="energy", label="Metric", elem_id="atlas-metric")
                    a_go = gr.Button("Head atlas", elem_id="atlas-go")
                a_note = gr.Markdown(elem_id="atlas-note")
                a_plot = gr.Plot(label="Head atlas", elem_id="atlas-plot")
                a_state = gr.State(None)
                ev = a_go.click(atlas, [f_model_a, f_t, a_scenes, a_metric], [a_plot, a_state, a_note],
                                api_name="atlas", concurrency_id=MODEL)
                ev.failure(_status("atlas"), None, a_note, api_name=False)
                a_metric.change(replot_atlas, [a_state, a_metric], a_plot, api_name="replot_atlas")
                with gr.Row():
                    a_ex = gr.Button("Export the atlas table (JSON)", elem_id="atlas-export")
                    a_files = gr.File(label="Exported files", file_count="multiple", elem_id="atlas-files")
                a_ex.click(export_atlas, a_state, a_files, api_name="export_atlas")

            # ---------------- Learn ----------------
            with gr.Tab("Learn", id="learn-tab", elem_id="learn-tab"):
                gr.Markdown(LEARN, latex_delimiters=[{"left": "$", "right": "$", "display": False}],
                            elem_id="learn-text")
            # ---------------- Self-correction (DPT) ----------------
            with gr.Tab("Self-correction", id="dpt-tab", elem_id="dpt-tab"):
                gr.Markdown("DPT self-correction (Qu et al., Eq. 9): at each sampling step the latent is pushed up the "
                            "gradient of the adapter's matching score, z_t ← z_t + η ∂s/∂z_t, then the usual guided "
                            "step follows. Compared with the plain sampler at the same seed.")
                with gr.Row():
                    sc_prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square",
                                           elem_id="dpt-prompt", scale=3)
                    sc_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="dpt-seed")
                    sc_steps = gr.Number(value=default_steps, precision=0, label=f"Steps (1..{MAX_STEPS})",
                                         elem_id="dpt-steps")
                    sc_guidance = gr.Number(value=default_guidance, label=f"Guidance (0..{MAX_GUIDANCE:g})",
                                            elem_id="dpt-guidance")
                with gr.Row():
                    sc_eta = gr.Number(value=DEFAULT_CORRECTION_ETA, label=f"η, step size (0..{MAX_CORRECTION_ETA:g})",
                                       info=f"{DEFAULT_CORRECTION_ETA:g} is the paper's; on the bundled model ~100 reading z_t, "
                                            "~3 reading x0 with the contrast objective (docs/dpt.md). 0 = the plain "
                                            "sampler.", elem_id="dpt-eta")
                    sc_reading = gr.Dropdown(list(READINGS), value=READINGS[0], label="Reading of Eq. 9",
                                             info="noise_only: the authors' code; latent: the literal equation",
                                             elem_id="dpt-reading")
                    sc_objective = gr.Dropdown(list(OBJECTIVES), value=OBJECTIVES[0], label="Objective",
                                               info="score: s(z_t, y) (Eq. 9); contrast: log p(y | z_t) against the "
                                                    "prompt's hard negatives", elem_id="dpt-objective")
                    sc_read = gr.Dropdown(list(READS), value=READS[0], label="Adapter reads",
                                          info="z_t: the sampler's latent (Eq. 9); x0: the step's predicted clean "
                                               "latent, at the adapter's t", elem_id="dpt-read")
                    sc_range = gr.Textbox("", label="Corrected steps (START:STOP)", placeholder="all, or e.g. 0:8",
                                          info="0-based, STOP excluded; empty: every step", elem_id="dpt-range")
                    sc_lora = gr.Checkbox(value=False, label="DPT-tuned model (stage 2)",
                                          info="the UNet with its discriminative LoRA, steered by its own adapter",
                                          elem_id="dpt-lora")
                    sc_go = gr.Button("Generate with self-correction", variant="primary", elem_id="dpt-go")
                sc_status = gr.Markdown(elem_id="dpt-status")
                with gr.Row():
                    sc_image = gr.Image(label="self-corrected", elem_id="dpt-image", interactive=False, height=260)
                    sc_plain = gr.Image(label="plain (same seed)", elem_id="dpt-plain", interactive=False, height=260)
                    sc_boxed = gr.Image(label="DPT grounding: a box per noun phrase", elem_id="dpt-boxes",
                                        interactive=False, height=260)
                sc_note = gr.Markdown(elem_id="dpt-note")
                sc_plot = gr.Plot(label="Trajectory", elem_id="dpt-plot")
                sc_strip = _gallery("Per step: |∂s/∂z| map, then the predicted x0", "dpt-strip", 8)
                sc_table = gr.Dataframe(headers=["what", "text / box (x0 y0 x1 y1)", "value"], elem_id="dpt-table",
                                        interactive=False, wrap=True)
                gr.Examples([["a red circle left of a blue square", 100.0, "score", "z_t", "", False],
                             ["two red circles", 3.0, "contrast", "x0", "0:8", True],
                             ["a small green triangle", 0.0, "score", "z_t", "", False]],
                            [sc_prompt, sc_eta, sc_objective, sc_read, sc_range, sc_lora], label="Examples")
                ev = sc_go.click(self_correction, [sc_prompt, model, sc_seed, sc_steps, sc_guidance, sc_eta, sc_reading,
                                                   sc_lora, sc_objective, sc_read, sc_range],
                                 [sc_image, sc_plain, sc_boxed, sc_plot, sc_strip, sc_table, sc_note],
                                 api_name="self_correction", concurrency_id=MODEL)
                ev.success(_ok, None, sc_status, api_name=False)
                ev.failure(_status("self-correction"), None, sc_status, api_name=False)
                gr.Markdown("**Best of N**, the alternative a user would pick at about the same cost: N plain samples "
                            "(the first at the seed above), the adapter keeps the one it scores highest. Uses the "
                            "prompt, seed, steps, guidance and model above.")
                with gr.Row():
                    bo_n = gr.Number(value=2, precision=0, label=f"N (2..{MAX_BEST_OF})", elem_id="dpt-bestof-n")
                    bo_go = gr.Button("Best of N", elem_id="dpt-bestof-go")
                bo_status = gr.Markdown(elem_id="dpt-bestof-status")
                bo_gallery = _gallery("Samples with their DPT score", "dpt-bestof", 8)
                bo_note = gr.Markdown(elem_id="dpt-bestof-note")
                ev = bo_go.click(best_of, [sc_prompt, model, sc_seed, sc_steps, sc_guidance, bo_n, sc_lora],
                                 [bo_gallery, bo_note], api_name="best_of", concurrency_id=MODEL)
                ev.success(_ok, None, bo_status, api_name=False)
                ev.failure(_status("best-of"), None, bo_status, api_name=False)

            # ---------------- Image -> text (D-DiT) ----------------
            with gr.Tab("Image → text", id="ddit-tab", elem_id="ddit-tab"):
                gr.Markdown("Masked text diffusion (D-DiT) on the UNet's reading of the image: the text starts as "
                            "[MASK] and is unmasked over a few reverse steps; a question is a kept prefix.")
                with gr.Row():
                    with gr.Column():
                        tx_image = gr.Image(label="Image (upload, or pick a held-out scene)", type="pil",
                                            elem_id="ddit-image", height=220)
                        with gr.Row():
                            tx_scene = gr.Number(0, precision=0, label=f"Held-out scene (0..{inputs.MAX_HELDOUT_SCENES - 1})",
                                                 elem_id="ddit-scene")
                            tx_pick = gr.Button("Use this held-out scene", elem_id="ddit-pick")
                        tx_scene_note = gr.Markdown(elem_id="ddit-scene-note")
                        tx_task = gr.Radio(list(inputs.TEXT_TASKS), value="caption", label="Caption or question",
                                           elem_id="ddit-task")
                        tx_question = gr.Textbox("how many circles ?", label="Question (for 'question')",
                                                 elem_id="ddit-question")
                        gr.Examples([[q] for q in inputs.EXAMPLE_QUESTIONS], [tx_question], label="Example questions")
                        tx_seed = gr.Number(0, precision=0, label="Sampling seed", elem_id="ddit-seed")
                        tx_go = gr.Button("Run", variant="primary", elem_id="ddit-go")
                        tx_status = gr.Markdown(elem_id="ddit-status")
                    with gr.Column():
                        tx_text = gr.Markdown(elem_id="ddit-text")
                        tx_timeline = gr.Plot(label="Unmasking timeline", elem_id="ddit-timeline")
                with gr.Row():
                    with gr.Column():
                        tx_pos = gr.Slider(0, 8, value=0, step=1, label="Text position", elem_id="ddit-position")
                        tx_cands = gr.Plot(label="Candidates at this position", elem_id="ddit-candidates")
                    with gr.Column():
                        tx_step = gr.Slider(0, 8, value=0, step=1, label="Reverse step", elem_id="ddit-step")
                        tx_att = gr.Image(label="This token's attention over the image at this step",
                                          elem_id="ddit-attention", interactive=False, height=260)
                tx_state = gr.State(None)
                ev = tx_pick.click(heldout_scene, tx_scene, [tx_image, tx_scene_note], api_name="heldout_scene")
                ev.failure(_status("heldout-scene"), None, tx_scene_note, api_name=False)
                ev = tx_go.click(image_to_text, [tx_image, tx_task, tx_question, model, tx_seed],
                                 [tx_text, tx_timeline, tx_pos, tx_cands, tx_step, tx_att, tx_state],
                                 api_name="image_to_text", concurrency_id=MODEL)
                ev.success(_ok, None, tx_status, api_name=False)
                ev.failure(_status("image-to-text"), None, tx_status, api_name=False)
                gr.on([tx_pos.release, tx_step.release], text_frame, [tx_state, tx_step, tx_pos], [tx_cands, tx_att],
                      api_name="image_to_text_frame", concurrency_limit=8, trigger_mode="always_last")
        model.change(sampling_defaults, model, [steps, guidance], api_name=False)
    return demo


demo = build_demo()
demo.queue(default_concurrency_limit=4, max_size=256)


def main() -> None:
    """Serve: Gradio's host / port variables win (a Space sets them), then DISCOLENS_HOST / _PORT, then 127.0.0.1:7860."""
    host = os.environ.get("GRADIO_SERVER_NAME") or os.environ.get("DISCOLENS_HOST") or "127.0.0.1"
    port = int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("DISCOLENS_PORT") or 7860)
    demo.launch(server_name=host, server_port=port, max_file_size="20mb", show_error=True, css=CSS)


if __name__ == "__main__":
    main()
