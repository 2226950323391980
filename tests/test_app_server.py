"""The app served for real: start `python app.py`, call /generate with gradio_client, stop it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = dict(os.environ, DISCOLENS_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        raise RuntimeError("app did not start within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


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
