"""The app served for real: start `python app.py`, call /generate with gradio_client, stop it."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
class TestServedApp:
    def test_generate_over_http(self, server, tiny_pipe_dir):
        """/generate returns an image file and one gallery entry per word."""
        from gradio_client import Client

        img, gallery, *_ = Client(server, verbose=False).predict(
            "a red circle", str(tiny_pipe_dir), 0, 2, 3.0, api_name="/generate")
        assert Path(img).exists() and len(gallery) == 3

    def test_bad_input_is_a_clean_error(self, server, tiny_pipe_dir):
        """An empty prompt comes back as an app error with the message, not a crash."""
        from gradio_client import Client

        with pytest.raises(Exception, match="empty"):
            Client(server, verbose=False).predict("", str(tiny_pipe_dir), 0, 2, 3.0, api_name="/generate")
