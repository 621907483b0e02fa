"""Load benchmark for ``fakeprint serve``: a bounded number of concurrent ``POST /v1/predict`` requests on
loopback, summarised as one JSON object (throughput and latency percentiles).

    python benchmarks/serve_load.py --backend torch --requests 200 --concurrency 8 --images-per-request 4
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...     # target a service already running

Without ``--url`` it starts ``fakeprint serve`` itself on a free 127.0.0.1 port and stops it afterwards.
Without ``--checkpoint`` it creates a random-init ``fpnet_s`` checkpoint in a temporary folder (said so in the
output: speed does not depend on the weights). It sends at most ``--requests`` requests and stops after
``--max-seconds`` whatever happens; only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from _common import cpu_name, emit, environment, git_commit, load_average

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def versions() -> dict[str, str]:
    import fakeprint

    out = {"fakeprint": fakeprint.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "fastapi", "uvicorn"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "missing"
    return out


def make_random_checkpoint(folder: Path) -> Path:
    from fakeprint.models import create_model
    from fakeprint.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(folder / "best", create_model("fpnet_s"), {
        "model": "fpnet_s", "num_classes": 5, "classes": ["0", "1", "2", "3", "4"], "model_args": {},
        "normalization": {"mode": "imagenet"}, "metrics": {}, "note": "random init, for benchmarking only"})
    return folder


def payloads(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct 100x100 PNGs from the demo dataset's five generators."""
    from PIL import Image

    from fakeprint.data.demo import render

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(render(i % 5, rng)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path | list, backend: str, workers: int, threads: int | None, log: Path,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    models = [str(c) for c in checkpoint] if isinstance(checkpoint, list) else [str(checkpoint)]
    cmd = [sys.executable, "-m", "fakeprint", "serve", *models, "--host", "127.0.0.1", "--port", str(port),
           "--backend", backend, "--workers", str(workers), "--log-level", "warning", *(extra or [])]
    if threads:
        cmd += ["--threads", str(threads)]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become healthy within {timeout:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def run_load(url: str, blobs: list[bytes], requests: int, concurrency: int, per_request: int, cam: bool,
             max_seconds: float) -> dict:
    import httpx

    local = threading.local()
    deadline = time.monotonic() + max_seconds
    params = {"cam": 1} if cam else {}

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=max(10.0, max_seconds))
        return local.client

    def one(i: int) -> tuple[str, float, int]:
        if time.monotonic() > deadline:
            return "skipped", 0.0, 0
        files = [("files", (f"r{i}-{j}.png", blobs[(i * per_request + j) % len(blobs)], "image/png"))
                 for j in range(per_request)]
        t0 = time.perf_counter()
        try:
            r = client().post("/v1/predict", files=files, params=params)
            dt = (time.perf_counter() - t0) * 1e3
            if r.status_code == 200 and r.json().get("count") == per_request:
                return "ok", dt, per_request
            return f"http {r.status_code}", dt, 0
        except httpx.HTTPError as e:
            return type(e).__name__, (time.perf_counter() - t0) * 1e3, 0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - t0
    sent = [r for r in results if r[0] != "skipped"]
    ok = [r for r in sent if r[0] == "ok"]
    lat = np.array([r[1] for r in ok]) if ok else np.zeros(1)
    errors: dict[str, int] = {}
    for r in sent:
        if r[0] != "ok":
            errors[r[0]] = errors.get(r[0], 0) + 1
    images = sum(r[2] for r in ok)
    return {
        "requests": len(sent), "completed": len(ok), "errors": len(sent) - len(ok), "error_kinds": errors,
        "not_sent_time_limit": len(results) - len(sent), "images": images, "elapsed_s": round(elapsed, 3),
        "images_per_s": round(images / elapsed, 2), "requests_per_s": round(len(ok) / elapsed, 2),
        "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2), "p95": round(float(np.percentile(lat, 95)), 2),
                       "p99": round(float(np.percentile(lat, 99)), 2), "mean": round(float(lat.mean()), 2),
                       "max": round(float(lat.max()), 2)},
    }


def batch_stats(url: str) -> dict:
    """The server's model calls so far, from its /metrics: how many, and their mean images and requests."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("fakeprint_batch_images_count", "fakeprint_batch_images_sum", "fakeprint_batch_requests_sum",
                    "fakeprint_model_call_seconds_sum"):
            values[name] = float(value)
    calls = values.get("fakeprint_batch_images_count", 0.0)
    if not calls:
        return {"model_calls": 0}
    return {"model_calls": int(calls),
            "mean_images_per_call": round(values.get("fakeprint_batch_images_sum", 0.0) / calls, 2),
            "mean_requests_per_call": round(values.get("fakeprint_batch_requests_sum", 0.0) / calls, 2),
            "mean_call_ms": round(values.get("fakeprint_model_call_seconds_sum", 0.0) / calls * 1e3, 2),
            "note": "since the server started, warm-up included"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", help="run folder, .safetensors, .onnx or a shipped model's name; several: "
                   "their ensemble (default: a random-init fpnet_s)")
    p.add_argument("--backend", choices=("torch", "onnx", "auto"), default="torch")
    p.add_argument("--requests", type=int, default=100, help="requests to send (1..10000, default 100)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (1..64, default 8)")
    p.add_argument("--images-per-request", type=int, default=4, help="images per request (1..32, default 4)")
    p.add_argument("--cam", action="store_true", help="ask for Grad-CAM heat maps too")
    p.add_argument("--warmup", type=int, default=4, help="untimed requests first (default 4)")
    p.add_argument("--max-seconds", type=float, default=120, help="stop sending after this long (default 120, max 600)")
    p.add_argument("--url", help="a running service on loopback (default: start one)")
    p.add_argument("--workers", type=int, default=2, help="the started server's --workers (default 2)")
    p.add_argument("--threads", type=int, default=None, help="the started server's --threads")
    p.add_argument("--max-batch", type=int, default=None, help="the started server's --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=None, help="the started server's --max-wait-ms")
    p.add_argument("--model-calls", type=int, default=None, help="the started server's --model-calls")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    for name, lo, hi in (("requests", 1, 10000), ("concurrency", 1, 64), ("images_per_request", 1, 32),
                         ("warmup", 0, 100), ("max_seconds", 1, 600)):
        if not lo <= getattr(args, name) <= hi:
            p.error(f"--{name.replace('_', '-')} must be between {lo} and {hi}")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"--url must be on loopback (127.0.0.1, localhost or ::1), not {urlparse(args.url).hostname!r}")

    env = environment(torch.device("cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="fakeprint-bench-")
    proc = None
    try:
        if args.checkpoint:
            checkpoint, described = list(args.checkpoint), " + ".join(args.checkpoint)
        else:
            checkpoint = make_random_checkpoint(Path(tmp.name) / "fpnet_s")
            described = "random-init fpnet_s, created in a temporary folder (no --checkpoint given)"
            print(f"serve_load: no --checkpoint: using a {described}", file=sys.stderr)
        url = args.url
        if not url:
            log = Path(tmp.name) / "server.log"
            extra = [f for flag, v in (("--max-batch", args.max_batch), ("--max-wait-ms", args.max_wait_ms),
                                       ("--model-calls", args.model_calls))
                     if v is not None for f in (flag, str(v))]
            proc, url = start_server(checkpoint, args.backend, args.workers, args.threads, log, extra)
            try:
                wait_healthy(url, proc, timeout=180)
            except RuntimeError as e:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                print(f"serve_load: {e}\n{tail}", file=sys.stderr)
                return 1
        else:
            wait_healthy(url, None, timeout=30)
        import httpx

        info = httpx.get(url + "/v1/model", timeout=30).json()
        blobs = payloads(max(16, args.images_per_request * 2))
        if args.warmup:
            run_load(url, blobs, args.warmup, min(args.concurrency, args.warmup), args.images_per_request, args.cam, 60)
        stats = run_load(url, blobs, args.requests, args.concurrency, args.images_per_request, args.cam, args.max_seconds)
        health = httpx.get(url + "/healthz", timeout=30).status_code
        batches = batch_stats(url)
    finally:
        if proc is not None:
            stop_server(proc)
        tmp.cleanup()

    result = {
        "benchmark": "serve_load",
        "environment": env,
        "device": {"kind": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average(),
                   "note": "the server and this client share the cores (and, here, other people's work)"},
        "versions": versions(),
        "commit": git_commit(),
        "model": info.get("name"),
        "checkpoint": described,
        "backend": info.get("backend"),
        "cam": args.cam,
        "concurrency": args.concurrency,
        "images_per_request": args.images_per_request,
        "server": {"url": url, "started_by_benchmark": not args.url, "workers": args.workers if not args.url else None,
                   "batching": info.get("batching")},
        **stats,
        "batching": batches,
        "healthz_after": health,
    }
    emit(result, args.out)
    return 0 if stats["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
