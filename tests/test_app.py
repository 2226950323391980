"""The Gradio app: builds without starting a server, generates with traced word maps, validates inputs."""
from __future__ import annotations

import gradio as gr
import pytest

import app


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

    def test_unknown_model_is_a_gr_error(self):
        """A model that cannot be loaded is reported, not raised as a traceback."""
        with pytest.raises(gr.Error, match="cannot load model|not a diffusers pipeline"):
            app.generate("a red circle", "/nonexistent/model/folder", 0, 2, 3.0)


class TestMatchTab:
    def _img(self):
        import numpy as np

        from models import world

        return world.render(world.scene_from_caption("a red circle left of a blue square", np.random.default_rng(0)))

    def test_match_ranks_all_captions(self, tiny_pipe_dir):
        """All captions come back ranked 1..K with a breakdown figure and the UNet cost."""
        caps = "a red circle left of a blue square\na blue square left of a red circle"
        table, fig, cost = app.match(self._img(), caps, str(tiny_pipe_dir), list(app.SCORERS)[0], "300 600")
        assert [r[0] for r in table] == [1, 2] and {r[1] for r in table} == set(caps.splitlines())
        assert table[0][2] >= table[1][2] and fig is not None and "4 UNet evaluations" in cost

    @pytest.mark.parametrize("caps,ts,match", [("a red circle", "300", "at least 2"),
                                                ("a red circle\na blue square", "x", "whole numbers"),
                                                ("a red circle\na blue square", "1000", "0..999")])
    def test_match_bad_inputs(self, tiny_pipe_dir, caps, ts, match):
        """One caption, non-numeric or out-of-range timesteps: gr.Error."""
        with pytest.raises(gr.Error, match=match):
            app.match(self._img(), caps, str(tiny_pipe_dir), list(app.SCORERS)[0], ts)

    def test_match_without_image(self, tiny_pipe_dir):
        """No image is a clear gr.Error."""
        with pytest.raises(gr.Error, match="image"):
            app.match(None, "a\nb", str(tiny_pipe_dir), list(app.SCORERS)[0], "300")
