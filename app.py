"""DiscoLens: look inside text-to-image diffusion models as discriminators (Gradio UI; thin wiring only).

    python app.py            # serves on http://127.0.0.1:7860 with the bundled model
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib

import gradio as gr

from interp.figures import breakdown_plotly
from interp.heatmaps import overlay
from interp.scorers import ScoreResult, scorers
from interp.tasks import inputs
from interp.tasks.workbench import slice_choices, slice_overlays
from models.limits import MAX_ATLAS_SCENES, MAX_GUIDANCE, MAX_STEPS, parse_numbers, user_message
from models.loading import ModelLoadError, bundled_models, model_defaults, resolve_model_id
from models.shapes import world

PLAIN_MODEL = "shapes-v1-plain"  # the same world trained without the token loss


@contextlib.contextmanager
def _shown():
    """Input errors (models.limits / interp.tasks.inputs) and unloadable models as gr.Error, one line."""
    try:
        yield
    except (ValueError, KeyError, ModelLoadError) as e:
        raise gr.Error(user_message(e)) from None


def sampling_defaults(model: str | None) -> tuple[int, float]:
    """(steps, guidance) a model is meant to be sampled with: its `discolens.json`, else diffusers' usual ones."""
    d = model_defaults(resolve_model_id((model or "").strip() or None))
    return min(d.steps, MAX_STEPS), float(d.guidance)


def generate(prompt: str, model: str, seed: float, steps: float, guidance: float):
    """Generate an image and its per-word cross-attention maps."""
    with _shown():
        res = inputs.traced_generation(model, prompt, seed=seed, steps=steps, guidance=guidance)
    ch = slice_choices(res.trace)
    return (res.image.resize((256, 256), resample=0), res.overlays(), (res.image, res.trace),
            gr.Dropdown(choices=ch["layers"], value="all"), gr.Dropdown(choices=ch["heads"], value="all"),
            gr.Dropdown(choices=ch["steps"], value="all"))


def explore(state, layer: str, head: str, step: str):
    """Word maps of one slice (layer / head / step) of the last generation's trace."""
    if not state:
        raise gr.Error("generate an image first")
    image, tr = state
    with _shown():
        return slice_overlays(image, tr, layer, head, step)


HEAD_HEADERS = ["caption", "layer", "head", "attribution"]


def scorer_description(name: str) -> str:
    """What the chosen scorer can and cannot tell apart (shown under the dropdown)."""
    return next((f"*{sc.description}*" for sc in scorers() if sc.name == name), "")


def _head_rows(res: ScoreResult) -> list[list]:
    """The head-weighted scorer's attribution tables [layers, heads] per caption, as long-format rows."""
    if res.heads is None:
        return []
    rows = []
    for c, table in res.heads["tables"].items():
        for layer, vals in zip(res.heads["layers"], table):
            rows += [[c, layer, h, float(v)] for h, v in enumerate(vals) if v == v]  # v == v: skip NaN padding
    return rows


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


def match(image, captions_text: str, model: str, scorer: str, timesteps_text: str, prompt_file=None):
    """Rank captions for an image; the LSE breakdown by layer and timestep, head attributions or structure notes."""
    with _shown():
        res = inputs.score_captions(model, image, [c for c in (captions_text or "").splitlines() if c.strip()], scorer,
                                    timesteps=parse_numbers(timesteps_text), prompt_file=prompt_file)
    ranked = res.ranking()
    table = [[i + 1, c, round(v, 5)] for i, (c, v) in enumerate(ranked)]
    fig = breakdown_plotly(res.breakdown, [c for c, _ in ranked]) if res.breakdown else None
    cost = f"{res.unet_evals} UNet evaluations in {res.unet_calls} batched calls (all captions in one batch)"
    if res.unet_backwards:
        cost += f" and {res.unet_backwards} backward passes (captum)"
    notes = _structure_notes(res)
    if res.routed_to is not None:
        notes = f"Routed to **{res.routed_to}**.\n" + notes
    return table, fig, cost, _head_rows(res), notes


def _default_model_b(models: list[str]) -> str:
    if PLAIN_MODEL in models:
        return PLAIN_MODEL
    return next((m for m in models[1:]), models[0])


def _labels(model_a: str, model_b: str) -> tuple[str, str]:
    a, b = model_a or "shapes-v1", model_b or "shapes-v1"
    return (f"A: {a}", f"B: {b}") if a == b else (a, b)


def faithfulness(seed: float, kind: str, model_a: str, model_b: str, timestep: float):
    """Word maps of two models on one held-out render, scored per word against the exact masks."""
    la, lb = _labels(model_a, model_b)
    with _shown():
        scene, image, res = inputs.compare_models({la: model_a, lb: model_b}, seed, kind, timestep)
    galleries = []
    for name in (la, lb):
        r = res["models"][name]
        galleries.append([(overlay(image, m), w if mt["pointing"] is None else
                           f"{w}: {'hit' if mt['pointing'] else 'miss'}, energy {mt['energy']:.2f}")
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
               f"t={res['timestep']}, all layers and heads averaged. Pointing: the map's peak lies in the word's mask; "
               "energy: share of the map inside the mask (a uniform map scores the mask area).")
    return image.resize((256, 256), resample=0), galleries[0], galleries[1], table, summary


def atlas(model: str, timestep: float, n_scenes: float, metric: str):
    """The head atlas of a model on held-out renders: plot, the table (for re-plotting), and what was run."""
    with _shown():
        table, fig = inputs.head_atlas(model, timestep, n_scenes, metric)
    note = (f"{model or 'shapes-v1'}: {int(float(n_scenes))} held-out scenes at t={int(float(timestep))}, one noised "
            "UNet call each; every layer x head scored per word class (energy is not chance-corrected: count masks "
            "cover 2-3 objects).")
    return fig, table, note


def replot_atlas(table, metric: str):
    """The last atlas under another metric (no model run)."""
    with _shown():
        return inputs.replot_atlas(table, metric)


def build_demo() -> gr.Blocks:
    models = list(bundled_models()) or ["shapes-v1"]
    default_steps, default_guidance = sampling_defaults(models[0])
    with gr.Blocks(title="DiscoLens") as demo:
        gr.Markdown("# DiscoLens\nText-to-image diffusion models as discriminators: "
                    "generate, then see where each word's cross-attention goes.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value="a red circle left of a blue square", elem_id="prompt")
                model = gr.Dropdown(models, value=models[0], label="Model (bundled name, local folder or hub id)",
                                    allow_custom_value=True, elem_id="model")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    steps = gr.Slider(1, MAX_STEPS, value=default_steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, MAX_GUIDANCE, value=default_guidance, step=0.5, label="Guidance", elem_id="guidance")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                image = gr.Image(label="Generated image", type="pil", elem_id="image")
        maps = gr.Gallery(label="Cross-attention per word (all layers, heads and steps averaged)",
                          columns=8, height=220, elem_id="word-maps")
        state = gr.State(None)
        gr.Markdown("### Trace explorer: one layer, head or denoising step")
        with gr.Row():
            layer = gr.Dropdown(["all"], value="all", label="Layer", elem_id="layer")
            head = gr.Dropdown(["all"], value="all", label="Head", elem_id="head")
            step = gr.Dropdown(["all"], value="all", label="Step (timestep)", elem_id="step")
        slice_maps = gr.Gallery(label="Cross-attention per word, selected slice", columns=8, height=220,
                                elem_id="slice-maps")
        go.click(generate, [prompt, model, seed, steps, guidance], [image, maps, state, layer, head, step],
                 api_name="generate")
        for w in (layer, head, step):
            w.change(explore, [state, layer, head, step], slice_maps, api_name=False)
        model.change(sampling_defaults, model, [steps, guidance], api_name=False)

        gr.Markdown("## Match: the model as an image-text matcher\nOne noised UNet call per timestep, all captions in "
                    "one batch, the same noise for every caption.")
        with gr.Row():
            with gr.Column():
                m_image = gr.Image(label="Image", type="filepath", elem_id="match-image")  # read by models.limits.read_image
                m_caps = gr.Textbox(label="Captions (one per line)", lines=4, elem_id="match-captions",
                                    value="a red circle left of a blue square\na blue square left of a red circle\n"
                                          "a red circle right of a blue square")
                with gr.Row():
                    # the app opens on LSE: its layer x timestep breakdown figure explains the score
                    m_scorer = gr.Dropdown([(sc.label, sc.name) for sc in scorers()], value="lse", label="Scorer",
                                           elem_id="match-scorer")
                    m_ts = gr.Textbox(value="200 400 600 800", label="Timesteps", elem_id="match-timesteps")
                m_about = gr.Markdown(scorer_description("lse"), elem_id="match-scorer-about")
                m_prompt = gr.File(label="Attention prompt (optional; a .safetensors file from cli.py train-prompt)",
                                   file_types=[".safetensors"], type="filepath", elem_id="match-prompt")
                m_go = gr.Button("Rank captions", elem_id="match")
            with gr.Column():
                m_table = gr.Dataframe(headers=["rank", "caption", "score"], label="Ranking", elem_id="match-ranking")
                m_cost = gr.Markdown(elem_id="match-cost")
        m_plot = gr.Plot(label="Score breakdown", elem_id="match-breakdown")
        m_heads = gr.Dataframe(headers=HEAD_HEADERS, label="Head attributions [layers x heads] (gradient-weighted "
                               "scorer: sum over positions and words of A_h x df/dA, mean over timesteps)",
                               elem_id="match-heads")
        m_notes = gr.Markdown(elem_id="match-notes")
        m_go.click(match, [m_image, m_caps, model, m_scorer, m_ts, m_prompt], [m_table, m_plot, m_cost, m_heads, m_notes],
                   api_name="match")
        m_scorer.change(scorer_description, m_scorer, m_about, api_name=False)
        image.change(lambda im: im.resize((64, 64)) if im is not None else None, image, m_image, api_name=False)

        gr.Markdown("## Faithfulness: are the words where the maps say?\nA held-out render of the shapes world, "
                    "its caption's word maps in two models (e.g. trained with and without the token loss), and "
                    "each word's map scored against the exact mask of its object(s).")
        with gr.Row():
            f_seed = gr.Number(value=0, precision=0, label="Scene seed", elem_id="faith-seed")
            f_kind = gr.Dropdown(list(world.KINDS), value="relation", label="Scene kind", elem_id="faith-kind")
            f_model_a = gr.Dropdown(models, value=models[0], label="Model A", allow_custom_value=True,
                                    elem_id="faith-model-a")
            f_model_b = gr.Dropdown(models, value=_default_model_b(models), label="Model B", allow_custom_value=True,
                                    elem_id="faith-model-b")
            f_t = gr.Number(value=300, precision=0, label="Timestep", elem_id="faith-timestep")
        f_go = gr.Button("Compare word maps", variant="primary", elem_id="faith-go")
        with gr.Row():
            f_image = gr.Image(label="Held-out render", type="pil", elem_id="faith-image", scale=1)
            with gr.Column(scale=3):
                f_maps_a = gr.Gallery(label="Model A: word maps", columns=8, height=200, elem_id="faith-maps-a")
                f_maps_b = gr.Gallery(label="Model B: word maps", columns=8, height=200, elem_id="faith-maps-b")
        f_summary = gr.Markdown(elem_id="faith-summary")
        f_table = gr.Dataframe(label="Per word: pointing game (1 = hit) and energy inside the mask", elem_id="faith-table")
        f_go.click(faithfulness, [f_seed, f_kind, f_model_a, f_model_b, f_t],
                   [f_image, f_maps_a, f_maps_b, f_table, f_summary], api_name="faithfulness")

        gr.Markdown("### Head atlas of model A: which word class does each layer x head ground best?")
        with gr.Row():
            a_scenes = gr.Number(value=12, precision=0, minimum=1, maximum=MAX_ATLAS_SCENES,
                                 label="Held-out scenes", elem_id="atlas-scenes")
            a_metric = gr.Radio(list(inputs.ATLAS_METRICS), value="energy", label="Metric", elem_id="atlas-metric")
            a_go = gr.Button("Head atlas", elem_id="atlas-go")
        a_note = gr.Markdown(elem_id="atlas-note")
        a_plot = gr.Plot(label="Head atlas", elem_id="atlas-plot")
        a_state = gr.State(None)
        a_go.click(atlas, [f_model_a, f_t, a_scenes, a_metric], [a_plot, a_state, a_note], api_name="atlas")
        a_metric.change(replot_atlas, [a_state, a_metric], a_plot, api_name=False)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("DISCOLENS_HOST", "127.0.0.1"),
                server_port=int(os.environ.get("DISCOLENS_PORT", "7860")))
