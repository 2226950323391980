"""The Gradio app: builds without starting a server, generates with traced word maps, validates inputs."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pytest

import app
from interp.tasks.matching import MatchOptions
from conftest import ROOT


class TestApp:
    def test_demo_is_a_blocks_with_the_generate_endpoint(self):
        """`app.demo` exists at import time and exposes /generate."""
        assert isinstance(app.demo, gr.Blocks)
        assert "generate" in [d.api_name for d in app.demo.fns.values()]

    def test_generate_returns_image_and_word_maps(self, tiny_pipe_dir):
        """A prompt gives the image and one overlay per word, labelled with the word."""
        img, maps, state, *dropdowns = app.generate("a red circle", str(tiny_pipe_dir), 0, 2, 3.0)
        assert img.size == (256, 256)
        assert [w for _, w in maps] == ["a", "red", "circle"]

    def test_explore_slices_the_last_trace(self, tiny_pipe_dir):
        """The explorer shows one overlay per word for a chosen layer, head and step."""
        _, _, state, *_ = app.generate("a red circle", str(tiny_pipe_dir), 0, 2, 3.0)
        out = app.explore(state, "mid.attn.0", "1", "0 (t=999)")
        assert [w for _, w in out] == ["a", "red", "circle"]
        everything = app.explore(state, "all", "all", "all")
        assert any((a[0].tobytes() != b[0].tobytes()) for a, b in zip(out, everything))

    def test_explore_before_generate_is_an_error(self):
        """Exploring with no trace yet is a clear gr.Error."""
        with pytest.raises(gr.Error, match="generate an image first"):
            app.explore(None, "all", "all", "all")

    @pytest.mark.parametrize("prompt,steps,guidance,seed,match", [
        ("", 2, 3.0, 0, "empty"),
        ("   ", 2, 3.0, 0, "empty"),
        ("a red circle", 0, 3.0, 0, "steps"),
        ("a red circle", 2, -1.0, 0, "guidance"),
        ("a red circle", 2, 3.0, -5, "seed"),
        ("a red circle " * 20, 2, 3.0, 0, "too long"),
    ])
    def test_bad_inputs_raise_gr_error(self, tiny_pipe_dir, prompt, steps, guidance, seed, match):
        """Bad inputs become a gr.Error with a clear message."""
        with pytest.raises(gr.Error, match=match):
            app.generate(prompt, str(tiny_pipe_dir), seed, steps, guidance)

    def test_sampling_defaults_follow_the_model(self, tmp_path):
        """The sliders take a model's own discolens.json defaults; a hub id gets diffusers' 7.5."""
        import json

        (tmp_path / "discolens.json").write_text(json.dumps({"guidance": 2.5, "steps": 20, "size": 64}))
        assert app.sampling_defaults(str(tmp_path)) == (20, 2.5)
        shipped = json.loads((ROOT / "assets" / "models" / "shapes-v1" / "discolens.json").read_text())
        assert app.sampling_defaults("shapes-v1") == (shipped["steps"], shipped["guidance"])
        assert app.sampling_defaults("stabilityai/stable-diffusion-2-1-base") == (25, 7.5)

    def test_unknown_model_is_a_gr_error(self):
        """A model that cannot be loaded is reported, not raised as a traceback."""
        with pytest.raises(gr.Error, match="cannot load model|not a diffusers pipeline"):
            app.generate("a red circle", "/nonexistent/model/folder", 0, 2, 3.0)


class TestMatchTab:
    def _img(self):
        import numpy as np

        from models.shapes import world

        return world.render(world.scene_from_caption("a red circle left of a blue square", np.random.default_rng(0)))

    def test_match_ranks_all_captions(self, tiny_pipe_dir):
        """All captions come back ranked 1..K with a breakdown figure and the UNet cost."""
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost, heads, notes = app.match(self._img(), caps, str(tiny_pipe_dir), "lse", "300 600")
        assert [r[0] for r in table] == [1, 2] and {r[1] for r in table} == set(caps.splitlines())
        assert table[0][2] >= table[1][2] and fig is not None and "4 UNet evaluations" in cost
        assert heads == [] and notes == ""

    def test_scorer_dropdown_is_the_registry(self):
        """The dropdown offers every registered scorer (by name), labelled by the scorer."""
        from interp.scorers import scorer_names

        [dd] = [c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") == "match-scorer"]
        assert [v for _, v in dd["props"]["choices"]] == list(scorer_names())

    def test_structure_scorer_notes_bound_words(self, tiny_pipe_dir):
        """The structure scorer ranks the captions and says which words it bound, and the relation term."""
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost, heads, notes = app.match(self._img(), caps, str(tiny_pipe_dir),
                                                   "structure", "300")
        assert {r[1] for r in table} == set(caps.splitlines()) and fig is None and heads == []
        lines = notes.splitlines()
        assert len(lines) == 2 and all("bound words red, circle, blue, square" in l or
                                       "bound words blue, square, red, circle" in l for l in lines)
        assert all("relation 'left of'" in l for l in lines)

    def test_structure_scorer_notes_the_lse_fallback(self, tiny_pipe_dir):
        """Captions with nothing to bind fall back to LSE, and the notes say so."""
        *_, notes = app.match(self._img(), "red\nblue", str(tiny_pipe_dir), "structure",
                              "300")
        assert notes.count("LSE fallback") == 2

    def test_head_weighted_scorer_shows_head_attributions(self, tiny_pipe_dir):
        """The gradient-weighted scorer returns one attribution per caption x layer x head, and its backward cost."""
        from models.loading import load_pipeline

        caps = "a red circle\na blue square"
        table, fig, cost, heads, notes = app.match(self._img(), caps, str(tiny_pipe_dir),
                                                   "head_weighted",
                                                   "300")
        unet = load_pipeline(str(tiny_pipe_dir)).unet
        n_heads = sum(m.heads for name, m in unet.named_modules() if name.endswith("attn2"))
        assert len(heads) == 2 * n_heads and {r[0] for r in heads} == set(caps.splitlines())
        assert all(isinstance(r[3], float) and r[3] == r[3] for r in heads)
        assert "backward" in cost and len(table) == 2 and fig is None and notes == ""

    def test_match_with_a_saved_attention_prompt(self, tiny_pipe_dir, tmp_path):
        """A prompt file from train-prompt changes the LSE scores; after the call the model is restored."""
        import torch

        from models.loading import load_pipeline
        from interp.tasks.prompt_learning import save_prompt, train_prompt

        pipe = load_pipeline(str(tiny_pipe_dir))
        prompt, _ = train_prompt(pipe, "counting", MatchOptions(timesteps=(300,)), steps=2, lr=0.05)
        with torch.no_grad():  # make the prompt's effect visible on the random tiny model
            for t in prompt.parameters():
                t.add_(0.5)
        f = save_prompt(prompt, tmp_path / "p.safetensors")
        label = "lse"
        caps = "a red circle\na blue square"
        before, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300")
        with_p, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", str(f))
        after, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300")
        assert before == after and with_p != before
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a prompt")
        with pytest.raises(gr.Error, match="attention prompt"):
            app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", str(bad))

    def test_match_auto_says_where_it_routed(self, tiny_pipe_dir):
        """The auto scorer ranks every caption and names the scorer it routed to."""
        label = "auto"
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost, heads, notes = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300")
        assert sorted(r[1] for r in table) == sorted(caps.splitlines()) and "Routed to **structure**" in notes
        table, *_, notes = app.match(self._img(), "two red circles\nthree red circles", str(tiny_pipe_dir), label, "300")
        assert len(table) == 2 and "Routed to **denoise**" in notes

    @pytest.mark.parametrize("caps,ts,match", [("a red circle", "300", "at least 2"),
                                                ("a red circle\na blue square", "x", "whole number"),
                                                ("a red circle\na blue square", "1000", "0..999")])
    def test_match_bad_inputs(self, tiny_pipe_dir, caps, ts, match):
        """One caption, non-numeric or out-of-range timesteps: gr.Error."""
        with pytest.raises(gr.Error, match=match):
            app.match(self._img(), caps, str(tiny_pipe_dir), "lse", ts)

    def test_match_without_image(self, tiny_pipe_dir):
        """No image is a clear gr.Error."""
        with pytest.raises(gr.Error, match="image"):
            app.match(None, "a\nb", str(tiny_pipe_dir), "lse", "300")


@pytest.fixture(scope="module")
def other_pipe_dir(tmp_path_factory):
    """A second tiny model folder (other random init)."""
    from conftest import build_tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny_other_app")
    build_tiny_pipeline(folder, seed=1)
    return folder / "pipe"


class TestFaithfulnessTab:
    def test_endpoints_and_elem_ids(self):
        """The faithfulness and atlas handlers are API endpoints and every new widget has its elem_id."""
        names = [d.api_name for d in app.demo.fns.values()]
        assert "faithfulness" in names and "atlas" in names
        ids = {c.get("props", {}).get("elem_id") for c in app.demo.config["components"]}
        assert {"faith-seed", "faith-kind", "faith-model-a", "faith-model-b", "faith-timestep", "faith-go",
                "faith-image", "faith-maps-a", "faith-maps-b", "faith-table", "atlas-go", "atlas-metric",
                "atlas-plot", "prompt", "generate", "match", "match-breakdown", "match-ranking"} <= ids

    def test_two_models_side_by_side(self, tiny_pipe_dir, other_pipe_dir):
        """The render, one gallery per model (one overlay per word), a per-word table with means, a summary."""
        from interp.tasks.faithfulness import render_scene

        scene = render_scene(4, "relation")
        words = scene.caption.split()
        a, b = str(tiny_pipe_dir), str(other_pipe_dir)
        image, maps_a, maps_b, table, summary = app.faithfulness(4, "relation", a, b, 300)
        assert image.size == (256, 256)
        assert [c.split(":")[0] for _, c in maps_a] == words and len(maps_b) == len(words)
        assert table["headers"][3:] == [f"{a} pointing", f"{a} energy", f"{b} pointing", f"{b} energy"]
        rows = table["data"]
        assert [r[0] for r in rows[:-1]] == words and rows[-1][0].startswith("mean")
        masked = [r for r in rows[:-1] if r[2] != "-"]
        assert len(masked) == 4 and all(r[3] in (0, 1) and 0 <= r[4] <= 1 for r in masked)
        assert rows[-1][3] == pytest.approx(np.mean([r[3] for r in masked]), abs=1e-3)
        assert rows[-1][6] == pytest.approx(np.mean([r[6] for r in masked]), abs=1e-3)
        assert [r[4] for r in masked] != [r[6] for r in masked]
        assert scene.caption in summary

    def test_same_model_twice_gets_two_columns(self, tiny_pipe_dir):
        """Model A = model B: both columns are there (labelled A / B) and agree."""
        _, maps_a, maps_b, table, _ = app.faithfulness(1, "single", str(tiny_pipe_dir), str(tiny_pipe_dir), 300)
        assert table["headers"][3].startswith("A: ") and table["headers"][5].startswith("B: ")
        assert all(r[3:5] == r[5:7] for r in table["data"])
        assert [c for _, c in maps_a] == [c for _, c in maps_b]

    @pytest.mark.parametrize("seed,kind,t,match", [(-1, "single", 300, "seed"), (None, "single", 300, "seed"),
                                                   (0, "pairs", 300, "kind"), (0, "single", 1000, "timestep"),
                                                   (0, "single", 2.5, "timestep"), (0, "single", None, "timestep")])
    def test_bad_inputs_raise_gr_error(self, tiny_pipe_dir, seed, kind, t, match):
        """Bad seed, kind or timestep: gr.Error with a clear message."""
        with pytest.raises(gr.Error, match=match):
            app.faithfulness(seed, kind, str(tiny_pipe_dir), str(tiny_pipe_dir), t)

    def test_unknown_model_is_a_gr_error(self, tiny_pipe_dir):
        """A model B that cannot be loaded is a gr.Error."""
        with pytest.raises(gr.Error, match="cannot load model|not a diffusers pipeline"):
            app.faithfulness(0, "single", str(tiny_pipe_dir), "/nonexistent/model/folder", 300)

    def test_atlas_and_replot(self, tiny_pipe_dir):
        """The atlas button gives a plotly figure, the table it plots and a note; the metric re-plots it."""
        import plotly.graph_objects as go

        fig, table, note = app.atlas(str(tiny_pipe_dir), 300, 2, "energy")
        assert isinstance(fig, go.Figure) and "energy" in fig.layout.title.text
        assert len(table) == len(fig.data[0].y) * len(fig.data[0].x) and "2 held-out scenes" in note
        other = app.replot_atlas(table, "pointing")
        assert "pointing" in other.layout.title.text
        assert app.replot_atlas(None, "pointing") is None

    @pytest.mark.parametrize("t,n,metric,match", [(1000, 2, "energy", "timestep"), (300, 0, "energy", "scenes"),
                                                  (300, 2, "iou-ish", "metric"), (None, 2, "energy", "timestep")])
    def test_atlas_bad_inputs(self, tiny_pipe_dir, t, n, metric, match):
        """Bad timestep, scene count or metric: gr.Error."""
        with pytest.raises(gr.Error, match=match):
            app.atlas(str(tiny_pipe_dir), t, n, metric)
