"""A short load test of the served app (the 16-user, 2-minute run is `python -m bench.load`)."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_four_users_for_twenty_seconds():
    """4 gradio_client users calling /generate and /match for 20 s: no errors, answers, same seed same image."""
    from bench.load import rss_mb, run, start_server

    proc, url = start_server(threads="1")
    try:
        before = rss_mb(proc.pid)
        res = run(url, users=4, seconds=20)
        after = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert res["errors"] == 0, res["error_samples"]
    assert res["answers"] >= 2 and res["/generate"]["n"] >= 1
    assert after < before + 1500  # bounded: the trace cache holds at most DISCOLENS_CACHE_MB
