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
        table, fig, cost, about, notes, win, run, key = app.match(self._img(), caps, str(tiny_pipe_dir), "lse", "300 600")
        assert [r[0] for r in table] == [1, 2] and {r[1] for r in table} == set(caps.splitlines())
        assert table[0][2] >= table[1][2] and fig is not None and "4 UNet evaluations" in cost
        assert "layer x timestep" in about and notes == ""
        # the captions use the same words: every word's map is shown for the winner and the runner-up
        assert [w for _, w in win] == table[0][1].split() and [w for _, w in run] == table[1][1].split()

    def test_match_maps_show_the_differing_words(self, tiny_pipe_dir):
        """Captions that differ in one word: the top two's galleries show only that word."""
        table, *_, win, run, _ = app.match(self._img(), "a red circle\na blue circle", str(tiny_pipe_dir), "lse", "300")
        assert {w for _, w in win} | {w for _, w in run} == {"red", "blue"} and len(win) == len(run) == 1

    def test_default_scorer_is_the_best_measured(self):
        """The Match tab opens on the registry's default (auto), described beside the dropdown."""
        from interp.scorers import DEFAULT_SCORER

        [dd] = [c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") == "match-scorer"]
        assert dd["props"]["value"] == DEFAULT_SCORER == "auto"
        assert "Structure-aware" in app.scorer_description("auto")

    def test_denoise_says_why_there_is_no_breakdown(self, tiny_pipe_dir):
        """A scorer without a layer x timestep breakdown returns no figure and says why."""
        _, fig, _, about, *_ = app.match(self._img(), "a red circle\na blue square", str(tiny_pipe_dir), "denoise",
                                         "300", None, False)
        assert fig is None and "No layer x timestep breakdown" in about and "denoise" in about

    def test_dpt_fused_shows_its_two_readings(self):
        """dpt_fused on the bundled model: one UNet call, a figure of the adapter score and the denoising term per
        caption whose sum is the ranked score, and the validation weight named; dpt says it has no breakdown."""
        caps = "a red circle left of a blue square\na blue circle left of a red square"
        table, fig, cost, about, *_ = app.match(self._img(), caps, "shapes-v1", "dpt_fused", "300", None, False)
        assert table[0][1] == caps.splitlines()[0] and "in 1 batched calls" in cost
        assert [t.name for t in fig.data] == ["adapter match score", "- w x relative denoising error",
                                              "fused score (sum)"]
        sums = dict(zip(fig.data[2].x, fig.data[2].y))
        assert all(abs(sums[c] - v) < 1e-4 for _, c, v in table) and "minus 0.5 x" in about
        _, fig, _, about, *_ = app.match(self._img(), caps, "shapes-v1", "dpt", "300", None, False)
        assert fig is None and "DPT adapter's match score" in about

    def test_scorer_dropdown_is_the_registry(self):
        """The dropdown offers every registered scorer (by name), labelled by the scorer."""
        from interp.scorers import scorer_names

        [dd] = [c for c in app.demo.config["components"] if c.get("props", {}).get("elem_id") == "match-scorer"]
        assert [v for _, v in dd["props"]["choices"]] == list(scorer_names())

    def test_structure_scorer_notes_bound_words(self, tiny_pipe_dir):
        """The structure scorer ranks the captions and says which words it bound, and the relation term."""
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost, about, notes, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), "structure", "300",
                                                       None, False)
        assert {r[1] for r in table} == set(caps.splitlines()) and "structure" in about
        assert [b.name for b in fig.data] == ["binding", "relation direction"]
        lines = notes.splitlines()
        assert len(lines) == 2 and all("bound words red, circle, blue, square" in l or
                                       "bound words blue, square, red, circle" in l for l in lines)
        assert all("relation 'left of'" in l for l in lines)

    def test_structure_scorer_notes_the_lse_fallback(self, tiny_pipe_dir):
        """Captions with nothing to bind fall back to LSE, and the notes say so."""
        _, fig, _, about, notes, *_ = app.match(self._img(), "red\nblue", str(tiny_pipe_dir), "structure", "300",
                                                None, False)
        assert fig is not None and "layer x timestep" in about  # both fell back to LSE: its breakdown
        assert notes.count("LSE fallback") == 2

    def test_head_weighted_scorer_shows_head_attributions(self, tiny_pipe_dir):
        """The gradient-weighted scorer shows a layers x heads heat map per caption, and its backward cost."""
        from models.loading import load_pipeline

        caps = "a red circle\na blue square"
        table, fig, cost, about, notes, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), "head_weighted", "300",
                                                       None, False)
        unet = load_pipeline(str(tiny_pipe_dir)).unet
        layers = [m for name, m in unet.named_modules() if name.endswith("attn2")]
        assert len(fig.data) == 2 and all(np.asarray(d.z).shape == (len(layers), max(m.heads for m in layers))
                                          for d in fig.data)
        assert "Head attributions" in about and "backward" in cost and len(table) == 2 and notes == ""

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
        before, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", None, False)
        with_p, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", str(f), False)
        after, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", None, False)
        assert before == after and with_p != before
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(b"not a prompt")
        with pytest.raises(gr.Error, match="attention prompt"):
            app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", str(bad))

    def test_match_auto_says_where_it_routed(self, tiny_pipe_dir):
        """The auto scorer ranks every caption and names the scorer it routed to."""
        label = "auto"
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost, about, notes, *_ = app.match(self._img(), caps, str(tiny_pipe_dir), label, "300", None, False)
        assert sorted(r[1] for r in table) == sorted(caps.splitlines()) and "Routed to **structure**" in notes
        table, fig, cost, about, notes, *_ = app.match(self._img(), "two red circles\nthree red circles",
                                                       str(tiny_pipe_dir), label, "300", None, False)
        assert len(table) == 2 and "Routed to **denoise**" in notes and fig is None and "denoise" in about

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
        assert [c.split()[0] for _, c in maps_a] == words and len(maps_b) == len(words)
        assert sum(("✓" in c or "✗" in c) for _, c in maps_a) == 4  # the masked words: two colours, two shapes
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


class TestWorkbenchViews:
    """The Generate & look tab beyond the word maps: slices after Generate, player, model view, any word, edit, export."""

    @pytest.fixture(scope="class")
    def out(self, tiny_pipe_dir):
        return app.generate("a red circle left of a blue square", str(tiny_pipe_dir), 0, 3, 3.0)

    def test_generate_fills_every_view(self, out):
        """The slice panel, the player and the model view are filled by Generate itself (no dropdown change)."""
        img, maps, key, layer, head, step, slices, word, slider, prev, heat, caption, grid, ed_word = out
        assert [w for _, w in slices] == [w for _, w in maps] == "a red circle left of a blue square".split()
        assert word.value == 1 and slider.maximum == 2 and slider.value == 2 and "step 3 of 3" in caption
        assert prev.size == heat.size == (256, 256)
        assert isinstance(grid, gr.Gallery) and grid.columns == 4  # one column per head of the tiny model

    def test_player_and_model_view_reslice(self, out):
        """A step and a word give their frame; the model view has one cell per layer x head."""
        key = out[2]
        prev, heat, caption = app.player_frame(key, 2, 0)
        assert "step 1 of 3" in caption and "circle" in caption
        one, avg = app.model_grid(key, 2, 1, False), app.model_grid(key, 2, 1, True)
        assert one.columns == avg.columns == 4 and one.height == avg.height
        assert isinstance(app.model_grid_at_step(key, 2, 1, False), gr.Gallery)

    def test_player_tick_stops_at_the_end(self, out):
        """Play starts at 0 when at the end; ticks advance; the last tick stops the timer."""
        key = out[2]
        slider, timer = app.play(key, 2)
        assert slider.value == 0 and timer.active
        slider, timer = app.player_tick(key, 1)
        assert slider.value == 2 and not timer.active

    def test_any_word_and_edit(self, out, tiny_pipe_dir):
        """Any word's map says how it is computed; the edit returns before / after and the edited maps."""
        key = out[2]
        m, note = app.any_word(key, str(tiny_pipe_dir), "green")
        assert m.size == (256, 256) and "no new UNet call" in note
        before, after, maps, note = app.intervene(key, str(tiny_pipe_dir), 2, 0.0, "")
        assert before.tobytes() != after.tobytes() and len(maps) == 8 and "x0" in note and "everywhere" in note

    @pytest.mark.parametrize("word,scale,box,match", [(2, -1, "", "scale"), (2, 11, "", "scale"), (9, 0, "", "word"),
                                                     (2, 0, "0 0 2 1", "box")])
    def test_edit_bad_inputs(self, out, tiny_pipe_dir, word, scale, box, match):
        """Bad word index, scale or box: gr.Error."""
        with pytest.raises(gr.Error, match=match):
            app.intervene(out[2], str(tiny_pipe_dir), word, scale, box)

    def test_any_word_out_of_vocabulary(self, out, tiny_pipe_dir):
        """A word the closed vocabulary does not know is refused with the known words."""
        with pytest.raises(gr.Error, match="vocabulary: zebra"):
            app.any_word(out[2], str(tiny_pipe_dir), "zebra")

    def test_export_generation_loads_back(self, out):
        """Export gives the image, the word-map sheet, the trace and its manifest."""
        from interp.tasks.export import load_trace_export

        files = app.export_generation(out[2])
        tr, manifest = load_trace_export(files[-1])
        assert manifest["words"] == "a red circle left of a blue square".split() and tr.n_steps == 3

    def test_expired_key_is_a_clear_error(self):
        """A key the cache no longer holds asks to generate again."""
        with pytest.raises(gr.Error, match="generate an image first"):
            app.player_frame("gone", 0, 0)


class TestOtherDirections:
    def _png(self, tmp_path, caption, seed=0):
        from models.shapes import world

        p = tmp_path / f"{seed}.png"
        world.render(world.scene_from_caption(caption, np.random.default_rng(seed))).save(p)
        return str(p)

    def test_rank_images(self, tiny_pipe_dir, tmp_path):
        """One caption against three images: a ranked gallery and a table, scores sorted."""
        files = [self._png(tmp_path, c, i) for i, c in enumerate(["a red circle", "a blue square", "a green triangle"])]
        gallery, table = app.rank_images(files, "a red circle", str(tiny_pipe_dir), "denoise_norm", "300")
        assert len(gallery) == len(table) == 3 and [r[0] for r in table] == [1, 2, 3]
        assert table[0][2] >= table[1][2] >= table[2][2]
        with pytest.raises(gr.Error, match="at least 2 images"):
            app.rank_images(files[:1], "a red circle", str(tiny_pipe_dir), "denoise_norm", "300")

    def test_classify(self, tiny_pipe_dir, tmp_path):
        """Labels in a template: one row per label, the answer names the top one."""
        img = self._png(tmp_path, "a red circle")
        table, answer = app.classify(img, "a {} circle", "red, green, blue", str(tiny_pipe_dir), "lse", "300")
        assert sorted(r[1] for r in table) == ["blue", "green", "red"] and table[0][1] in answer
        with pytest.raises(gr.Error, match="exactly one"):
            app.classify(img, "a circle", "red, blue", str(tiny_pipe_dir), "lse", "300")
        with pytest.raises(gr.Error, match="at least 2 labels"):
            app.classify(img, "a {} circle", "red", str(tiny_pipe_dir), "lse", "300")

    def test_export_match(self, tiny_pipe_dir, tmp_path):
        """The ranking exports as JSON and CSV with the scores."""
        import json

        *_, key = app.match(self._png(tmp_path, "a red circle"), "a red circle\na blue square", str(tiny_pipe_dir),
                            "lse", "300", None, False)
        j, c, scores = app.export_match(key)
        assert [r["rank"] for r in json.loads(open(j).read())] == [1, 2] and "breakdown" in json.loads(open(scores).read())


class TestFailuresTab:
    def test_matching_failures_and_open(self, tiny_pipe_dir):
        """Failures table rows, a summary, and opening one shows both captions' maps."""
        rows, summary, key = app.matching_failures(str(tiny_pipe_dir), "comvg", "test", "lse", 6, "300")
        assert "failures" in summary and all(r[5] <= r[6] for r in rows)
        if rows:
            img, true, wrong, text = app.open_failure(key, 0, str(tiny_pipe_dir))
            assert len(true) == len(rows[0][3].split()) and len(wrong) == len(rows[0][4].split()) and rows[0][1] in text

    def test_generation_failures(self, tiny_pipe_dir):
        """Rejected generations with the checker's reason; opening one shows its word maps."""
        gallery, rows, summary, key = app.generation_failures(str(tiny_pipe_dir), 1, "test")
        assert len(gallery) == len(rows) >= 1 and "rejected" in summary
        maps, text = app.open_generation_failure(key, 0, str(tiny_pipe_dir))
        assert [w for _, w in maps] == rows[0][2].split()


class TestHostedAndServing:
    def test_hosted_policy(self, monkeypatch):
        """--hosted / DISCOLENS_HOSTED: bundled models only (hub ids on GPU), local paths refused, sizes capped."""
        from interp.tasks import inputs

        monkeypatch.delenv("DISCOLENS_HOSTED", raising=False)
        assert inputs.hosted_policy([], cuda=False) is None
        p = inputs.hosted_policy(["--hosted"], cuda=False)
        assert p.model("shapes-v1") == "shapes-v1" and p.model("") is None
        for bad in ("/tmp/x", "./m", "runwayml/stable-diffusion-v1-5"):
            with pytest.raises(ValueError, match="not allowed"):
                p.model(bad)
        assert inputs.hosted_policy(["--hosted"], cuda=True).model("runwayml/stable-diffusion-v1-5")
        with pytest.raises(ValueError, match="limited to 50"):
            p.cap(100, p.max_steps, "steps")
        monkeypatch.setenv("DISCOLENS_HOSTED", "1")
        assert inputs.hosted_policy([], cuda=False) is not None

    def test_hosted_app_refuses_paths(self, monkeypatch, tiny_pipe_dir):
        """In hosted mode the app refuses a local model folder and too many steps."""
        from interp.tasks import inputs

        monkeypatch.setattr(app, "HOSTED", inputs.hosted_policy(["--hosted"], cuda=False))
        with pytest.raises(gr.Error, match="not allowed"):
            app.generate("a red circle", str(tiny_pipe_dir), 0, 2, 3.0)
        with pytest.raises(gr.Error, match="limited to 50"):
            app.generate("a red circle", "shapes-v1", 0, 80, 3.0)

    def test_unknown_hub_id_offline_is_one_short_line(self, monkeypatch):
        """Offline, an unknown model name says so in one line, without the hub client's advice."""
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(gr.Error) as e:
            app.generate("a red circle", "someone/no-such-model", 0, 2, 3.0)
        assert "offline" in e.value.message and "local_files_only" not in e.value.message

    def test_every_action_is_a_named_endpoint(self):
        """gradio_client can call every action by name."""
        names = {d.api_name for d in app.demo.fns.values()}
        assert {"generate", "explore", "player_frame", "model_view", "any_word", "intervene", "export_generation",
                "match", "export_match", "rank_images", "classify", "failures", "open_failure",
                "generation_failures", "faithfulness", "atlas"} <= names

    def test_model_runs_share_one_concurrency_slot(self):
        """Every event that runs a model is in the 'model' concurrency group with limit 1."""
        runs = [d for d in app.demo.fns.values() if d.api_name in ("generate", "match", "any_word", "intervene",
                                                                     "faithfulness", "atlas", "failures")]
        assert runs and all(d.concurrency_id == app.MODEL for d in runs)
        assert {d.concurrency_limit for d in runs if d.api_name == "generate"} == {1}

    def test_gradio_server_variables_win(self, monkeypatch):
        """GRADIO_SERVER_NAME / PORT (a Space's) are honoured over DISCOLENS_HOST / PORT."""
        seen = {}
        monkeypatch.setattr(app.demo, "launch", lambda **kw: seen.update(kw))
        monkeypatch.setenv("DISCOLENS_PORT", "1234")
        monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
        monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
        app.main()
        assert seen["server_name"] == "0.0.0.0" and seen["server_port"] == 7861
        monkeypatch.delenv("GRADIO_SERVER_PORT")
        app.main()
        assert seen["server_port"] == 1234

    def test_tabs(self):
        """The page is organised in tabs a newcomer can follow."""
        labels = [c["props"].get("label") for c in app.demo.config["components"] if c.get("type") == "tabitem"]
        assert labels[:5] == ["Generate & look", "Match & rank", "Failures", "Faithfulness", "Learn"] or \
            {"Generate & look", "Match & rank", "Failures", "Faithfulness", "Learn"} <= set(labels)


class TestTableExports:
    def test_faithfulness_failures_and_atlas_export(self, tiny_pipe_dir):
        """The faithfulness table, the failures and the atlas table export and load back."""
        import json

        import pandas as pd

        *_, table, _ = app.faithfulness(1, "single", str(tiny_pipe_dir), str(tiny_pipe_dir), 300)
        j, c = app.export_dataframe(table, "faithfulness")
        assert [r["word"] for r in json.loads(open(j).read())] == [r[0] for r in table["data"]]
        j, c = app.export_dataframe(pd.DataFrame(table["data"], columns=table["headers"]), "faithfulness")
        assert open(c).readline().startswith("word,class")
        with pytest.raises(gr.Error, match="nothing to export"):
            app.export_dataframe(None)
        rows, _, key = app.matching_failures(str(tiny_pipe_dir), "comvg", "test", "lse", 4, "300")
        fj, fc, summary = app.export_failures(key)
        assert len(json.loads(open(fj).read())) == len(rows) and json.loads(open(summary).read())["n_items"] == 4
        _, atlas_table, _ = app.atlas(str(tiny_pipe_dir), 300, 1, "energy")
        [aj] = app.export_atlas(atlas_table)
        assert len(json.loads(open(aj).read())) == len(atlas_table)

    def test_too_many_images_or_labels(self):
        """Caps on images per caption and labels per classification, before any model loads."""
        from PIL import Image

        from interp.tasks import inputs

        imgs = [Image.new("RGB", (8, 8))] * (inputs.MAX_IMAGES + 1)
        with pytest.raises(ValueError, match=f"at most {inputs.MAX_IMAGES} images"):
            inputs.rank_images("/nonexistent", imgs, "a red circle")
        with pytest.raises(ValueError, match=f"at most {inputs.MAX_LABELS} labels"):
            inputs.classify("/nonexistent", imgs[0], "a {} circle", ",".join(f"l{i}" for i in range(20)))


class TestSelfCorrectionTab:
    def test_self_correction_returns_both_images_figure_strip_and_table(self):
        """The bundled model: corrected and plain images at 256 px, boxes, the trajectory figure, the strip, ITM."""
        img, plain, boxed, fig, strip, table, note = app.self_correction(
            "a red circle left of a blue square", "shapes-v1", 0, 3, 3.0, 100.0, "noise_only")
        assert img.size == plain.size == boxed.size == (256, 256)
        assert len(fig.data) == 4 and len(fig.data[0].x) == 3
        assert len(strip) == 6 and all(im.size == (96, 96) for im, _ in strip)
        rows = table["data"]
        assert rows[0][0].startswith("ITM") and sum(r[0].startswith("box: the") for r in rows) == 2
        assert "η = 100" in note

    def test_tuned_model_box(self):
        """"DPT-tuned model" (the shipped stage-2 LoRA and adapter): both images from the tuned copy (the plain one
        differs from the base model's at the same seed), ITM from dpt_lora; the base pipeline keeps no LoRA."""
        from interp.tasks import inputs
        from models.adapters.dpt import has_lora

        args = ("a red circle left of a blue square", "shapes-v1", 0, 3, 3.0, 100.0, "noise_only")
        img, plain, boxed, fig, strip, table, note = app.self_correction(*args, True)
        base = app.self_correction(*args, False)
        assert img.size == plain.size == (256, 256) and "DPT-tuned" in note and "DPT-tuned" not in base[-1]
        assert np.asarray(plain).tolist() != np.asarray(base[1]).tolist()
        assert table["data"][0][0].startswith("ITM") and table["data"][0][2] != base[5]["data"][0][2]
        assert not has_lora(inputs.load_model(None).unet)

    def test_contrast_objective(self):
        """Objective "contrast": the note names the negatives, the figure's first panel the log-probability."""
        img, plain, boxed, fig, strip, table, note = app.self_correction(
            "two red circles", "shapes-v1", 0, 2, 3.0, 100.0, "noise_only", False, "contrast")
        assert "objective contrast against 3 negatives: three red circles" in note
        assert fig.layout.annotations[0].text.startswith("log p(y | z_t)") and img.size == (256, 256)

    def test_x0_read_and_step_range(self):
        """Adapter reads x0 on steps 0:2 of 3: the note says so, the figure's score curve has a gap at step 2."""
        img, plain, boxed, fig, strip, table, note = app.self_correction(
            "two red circles", "shapes-v1", 0, 3, 3.0, 3.0, "noise_only", False, "contrast", "x0", "0:2")
        assert "read at x0" in note and "corrected steps 0..2" in note
        assert fig.layout.annotations[0].text.startswith("log p(y | x0(z_t))")
        assert [v is None for v in fig.data[0].y] == [False, False, True]

    def test_best_of_shows_every_sample_and_keeps_the_best(self):
        """Best of N: N samples labelled with their DPT score, the highest one marked kept, the first at the seed;
        a bad N is a gr.Error."""
        gallery, note = app.best_of("two red circles", "shapes-v1", 7, 3, 3.0, 3, False)
        scores = [float(label.split("s = ")[1].split()[0]) for _, label in gallery]
        assert len(gallery) == 3 and gallery[0][1].startswith("seed 7:") and gallery[0][0].size == (192, 192)
        assert [("(kept)" in label) for _, label in gallery] == [i == int(np.argmax(scores)) for i in range(3)]
        assert "Best of 3" in note and "12 UNet calls" in note  # 3 samples x 3 steps + 3 adapter readings
        with pytest.raises(gr.Error, match="best of N must be a whole number in 2..8"):
            app.best_of("two red circles", "shapes-v1", 7, 3, 3.0, 20, False)

    def test_bad_step_range_is_a_gr_error(self):
        with pytest.raises(gr.Error, match="the corrected steps 2:1 are empty"):
            app.self_correction("a red circle", "shapes-v1", 0, 3, 3.0, 1.0, "noise_only", False, "score", "z_t",
                                "2:1")

    @pytest.mark.parametrize("eta", [-1.0, float("nan")])
    def test_bad_eta_is_a_gr_error(self, eta):
        """A negative or NaN η is refused with the limits' message, before any sampling."""
        with pytest.raises(gr.Error, match="eta"):
            app.self_correction("a red circle", "shapes-v1", 0, 3, 3.0, eta, "noise_only")


class TestImageToTextTab:
    def test_heldout_scene_renders(self):
        """A held-out validation scene is rendered with its caption."""
        img, note = app.heldout_scene(3)
        assert img.size == (64, 64) and "Held-out scene 3" in note

    def test_caption_gives_timeline_candidates_and_attention(self):
        """Captioning a held-out scene: the caption, timeline and candidate figures, a 256 px attention overlay."""
        img, _ = app.heldout_scene(0)
        text, timeline, pos, cands, step, att, state = app.image_to_text(img, "caption", "", "shapes-v1", 0)
        assert text.startswith("### Caption:") and timeline is not None and cands is not None
        assert att.size == (256, 256)
        cands2, att2 = app.text_frame(state, 0, 1)
        assert cands2 is not None and att2.size == (256, 256)

    def test_question_is_answered(self):
        """A question gives an answer after the arrow."""
        img, _ = app.heldout_scene(0)
        text, *_ = app.image_to_text(img, "question", "how many circles ?", "shapes-v1", 0)
        assert "→ **" in text

    def test_empty_question_is_a_gr_error(self):
        """An empty question is refused with a clear message."""
        img, _ = app.heldout_scene(0)
        with pytest.raises(gr.Error, match="question is empty"):
            app.image_to_text(img, "question", "   ", "shapes-v1", 0)

    def test_frame_before_run_is_a_gr_error(self):
        """Moving a slider before any run is a gr.Error."""
        with pytest.raises(gr.Error, match="first"):
            app.text_frame(None, 0, 0)
