"""DiscoLens: look inside text-to-image diffusion models as discriminators (Gradio UI; thin wiring only).

    python app.py            # serves on http://127.0.0.1:7860 with the bundled model
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr

from interp.figures import breakdown_plotly
from interp.matching import MatchOptions, score_image_captions, validate_captions
from interp.workbench import slice_choices, slice_overlays, traced_generation
from models.loading import ModelLoadError, bundled_models, load_pipeline

MAX_STEPS = 100


def _pipe(model: str | None):
    try:
        return load_pipeline(model or None)
    except ModelLoadError as e:
        raise gr.Error(str(e))


def generate(prompt: str, model: str, seed: float, steps: float, guidance: float):
    """Generate an image and its per-word cross-attention maps."""
    if seed is None or steps is None or guidance is None:
        raise gr.Error("seed, steps and guidance must be numbers")
    if not (1 <= int(steps) <= MAX_STEPS):
        raise gr.Error(f"steps must be between 1 and {MAX_STEPS}")
    if not (0 <= float(guidance) <= 30):
        raise gr.Error("guidance must be between 0 and 30")
    if int(seed) < 0:
        raise gr.Error("seed must be non-negative")
    pipe = _pipe(model)
    try:
        res = traced_generation(pipe, prompt, seed=int(seed), steps=int(steps), guidance=float(guidance))
    except ValueError as e:
        raise gr.Error(str(e))
    ch = slice_choices(res.trace)
    return (res.image.resize((256, 256), resample=0), res.overlays(), (res.image, res.trace),
            gr.Dropdown(choices=ch["layers"], value="all"), gr.Dropdown(choices=ch["heads"], value="all"),
            gr.Dropdown(choices=ch["steps"], value="all"))


def explore(state, layer: str, head: str, step: str):
    """Word maps of one slice (layer / head / step) of the last generation's trace."""
    if not state:
        raise gr.Error("generate an image first")
    image, tr = state
    try:
        return slice_overlays(image, tr, layer, head, step)
    except (ValueError, KeyError) as e:
        raise gr.Error(str(e))


SCORERS = {"LSE over attention logits (Discffusion)": "lse", "Denoising error (Diffusion Classifier)": "denoise",
           "Denoising error, unconditional-normalised": "denoise_norm"}


def match(image, captions_text: str, model: str, scorer_label: str, timesteps_text: str):
    """Rank captions for an image; the LSE breakdown by layer and timestep."""
    if image is None:
        raise gr.Error("upload or generate an image first")
    try:
        caps = validate_captions([c for c in (captions_text or "").splitlines() if c.strip()], min_count=2)
        ts = tuple(int(t) for t in (timesteps_text or "").replace(",", " ").split())
    except ValueError as e:
        raise gr.Error(str(e) if "caption" in str(e) else "timesteps must be whole numbers, e.g. 200 400 600 800")
    if not ts or any(not 0 <= t < 1000 for t in ts):
        raise gr.Error("timesteps must lie in 0..999")
    if scorer_label not in SCORERS:
        raise gr.Error(f"unknown scorer {scorer_label!r}")
    pipe = _pipe(model)
    opts = MatchOptions(scorer=SCORERS[scorer_label], timesteps=ts)
    res = score_image_captions(pipe, image, caps, opts)
    ranked = sorted(res["scores"].items(), key=lambda kv: -kv[1])
    table = [[i + 1, c, round(v, 5)] for i, (c, v) in enumerate(ranked)]
    fig = breakdown_plotly(res["breakdowns"], [c for c, _ in ranked]) if res["breakdowns"] else None
    return table, fig, f"{res['unet_evals']} UNet evaluations ({len(ts)} timesteps x {len(caps)} captions, one batch each)"


def build_demo() -> gr.Blocks:
    models = list(bundled_models()) or ["shapes-v1"]
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
                    steps = gr.Slider(1, MAX_STEPS, value=25, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, value=3.0, step=0.5, label="Guidance", elem_id="guidance")
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

        gr.Markdown("## Match: the model as an image-text matcher\nOne noised UNet call per timestep, all captions in "
                    "one batch, the same noise for every caption.")
        with gr.Row():
            with gr.Column():
                m_image = gr.Image(label="Image", type="pil", elem_id="match-image")
                m_caps = gr.Textbox(label="Captions (one per line)", lines=4, elem_id="match-captions",
                                    value="a red circle left of a blue square\na blue square left of a red circle\n"
                                          "a red circle right of a blue square")
                with gr.Row():
                    m_scorer = gr.Dropdown(list(SCORERS), value=list(SCORERS)[0], label="Scorer", elem_id="match-scorer")
                    m_ts = gr.Textbox(value="200 400 600 800", label="Timesteps", elem_id="match-timesteps")
                m_go = gr.Button("Rank captions", elem_id="match")
            with gr.Column():
                m_table = gr.Dataframe(headers=["rank", "caption", "score"], label="Ranking", elem_id="match-ranking")
                m_cost = gr.Markdown(elem_id="match-cost")
        m_plot = gr.Plot(label="Score breakdown", elem_id="match-breakdown")
        m_go.click(match, [m_image, m_caps, model, m_scorer, m_ts], [m_table, m_plot, m_cost], api_name="match")
        image.change(lambda im: im.resize((64, 64)) if im is not None else None, image, m_image, api_name=False)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch(server_name=os.environ.get("DISCOLENS_HOST", "127.0.0.1"),
                server_port=int(os.environ.get("DISCOLENS_PORT", "7860")))
