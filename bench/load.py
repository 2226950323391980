"""Load test: N concurrent gradio_client users calling /generate and /match on the served app.

    python -m bench.load --users 16 --seconds 120 --out docs/measurements/load_16users.json

Starts `python app.py` on a free port (or uses --url), measures the server's RSS before and after, runs the users
(each alternates /generate with a random seed and /match on a bundled benchmark image), then checks that the same
seed returns the same image as before the load. Prints answers per minute, p50 / p95 latency per endpoint, errors.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
IMAGE = ROOT / "assets" / "benchmarks" / "comvg" / "images" / "0000.png"
CAPTIONS = "a red square above a blue square\na yellow square above a blue square"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process (and its children) in MiB, from /proc."""
    total = 0
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def start_server(port: int | None = None, threads: str = "2", timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`python app.py` on a free port; (process, url) once GET / answers. The server's stderr goes to a temporary
    file (a pipe nobody reads could fill and stall it), whose tail the error shows if the app exits early."""
    port = port or free_port()
    env = dict(os.environ, **ENV, GRADIO_SERVER_PORT=str(port), OMP_NUM_THREADS=threads)
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err.seek(0)
            raise RuntimeError(f"app exited with {proc.returncode}: {err.read().decode(errors='replace')[-2000:]}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"app did not start within {timeout:g} s")


def _digest(path: str) -> str:
    from PIL import Image

    return hashlib.sha256(Image.open(path).convert("RGB").tobytes()).hexdigest()[:16]


def run(url: str, users: int, seconds: float, seed: int = 0) -> dict:
    """Run the users against `url`; returns latencies (s) per endpoint, answers, errors."""
    from gradio_client import Client, handle_file

    lat: dict[str, list[float]] = {"/generate": [], "/match": []}
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.time() + seconds

    def user(i: int) -> None:
        rng = random.Random(seed + i)
        try:
            c = Client(url, verbose=False)
        except Exception as e:  # noqa: BLE001 - a load test counts every failure
            with lock:
                errors.append(f"connect: {type(e).__name__}: {e}"[:200])
            return
        k = i
        while time.time() < stop:
            ep = "/generate" if k % 2 == 0 else "/match"
            k += 1
            t = time.perf_counter()
            try:
                if ep == "/generate":
                    c.predict(prompt="a red circle left of a blue square", seed=rng.randrange(10_000), steps=25,
                              api_name=ep)
                else:
                    c.predict(image=handle_file(str(IMAGE)), captions_text=CAPTIONS, compare_maps=False, api_name=ep)
                with lock:
                    lat[ep].append(time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(f"{ep}: {type(e).__name__}: {e}"[:200])

    ts = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.time() - t0
    out = {"users": users, "seconds": seconds, "wall_s": round(wall, 1), "errors": len(errors),
           "error_samples": errors[:5], "answers": sum(len(v) for v in lat.values())}
    out["answers_per_min"] = round(60 * out["answers"] / wall, 1)
    for ep, v in lat.items():
        if v:
            q = statistics.quantiles(v, n=20) if len(v) > 1 else [v[0]] * 19
            out[ep] = {"n": len(v), "p50_s": round(statistics.median(v), 2), "p95_s": round(q[18], 2)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--url", default=None, help="an app already serving (default: start one)")
    ap.add_argument("--threads", default="2", help="OMP_NUM_THREADS of the started server")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    from gradio_client import Client

    proc, url = (None, a.url) if a.url else start_server(threads=a.threads)
    try:
        probe = Client(url, verbose=False)
        img0 = probe.predict(prompt="a red circle left of a blue square", seed=123, steps=25, api_name="/generate")[0]
        rss0 = rss_mb(proc.pid) if proc else None
        res = run(url, a.users, a.seconds)
        img1 = probe.predict(prompt="a red circle left of a blue square", seed=123, steps=25, api_name="/generate")[0]
        res["same_seed_same_image"] = _digest(img0) == _digest(img1)
        if proc:
            res.update(rss_mb_before=round(rss0, 1), rss_mb_after=round(rss_mb(proc.pid), 1), server_threads=a.threads)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
