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
