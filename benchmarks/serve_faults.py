"""Fault benchmark for ``fakeprint serve``: normal traffic while hostile clients are at work, as one JSON object.

    python benchmarks/serve_faults.py                       # the shipped model, the service's default limits
    python benchmarks/serve_faults.py --checkpoint runs/x --requests 200 --out benchmarks/results/serve_faults.json

It starts ``fakeprint serve`` on a free 127.0.0.1 port (``--max-connections`` 32) and, all at once:
- **normal traffic**: ``--requests`` requests of ``--images-per-request`` 100x100 PNGs, ``--concurrency`` in flight;
- **slow sockets** (``--slow``): half send part of a request's headers and stall, half send headers and part
  of a body and stall, each reopened when the server drops it, for the whole run;
- **big images** (``--big``): clients that keep posting a 4096x4096 16-bit PNG (42 KB on the wire).

It reports the normal requests' p50/p95 latency and errors, what the hostile clients got back, and the
server's peak memory (its resident set, read from /proc) against the bound its limits imply:
``(workers + queue) * max_request_bytes`` above its idle size. Goal (issue 12): p95 under 1 s on 2 cores,
no errors, memory within that bound.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from _common import cpu_name, emit, environment, git_commit, load_average
from serve_load import free_port, payloads, run_load, stop_server, versions, wait_healthy


def big_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("I;16", (4096, 4096)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    """Resident set of ``pid`` and its children (the server is one process; uvicorn forks none here)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Hostiles:
    """Slow sockets and big-image posters, run in threads until ``stop``."""

    def __init__(self, url: str, slow: int, big: int, payload: bytes):
        from urllib.parse import urlparse

        u = urlparse(url)
        self.addr, self.url, self.payload = (u.hostname, u.port), url, payload
        self.stop = threading.Event()
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.slow_socket, args=(i,), daemon=True) for i in range(slow)]
        self.threads += [threading.Thread(target=self.big_poster, daemon=True) for _ in range(big)]

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def slow_socket(self, i: int) -> None:
        boundary = "faultsBoundary"
        head = (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: 100000\r\n\r\n").encode()
        partial = head[:40] if i % 2 == 0 else head + f"--{boundary}\r\n".encode()
        kind = "slow_headers" if i % 2 == 0 else "slow_body"
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.addr, timeout=2) as s:
                    s.sendall(partial)
                    self.count(f"{kind}_opened")
                    s.settimeout(0.5)
                    while not self.stop.is_set():
                        try:
                            got = s.recv(4096)
                        except TimeoutError:
                            continue
                        self.count(f"{kind}_{'answered ' + got.split(b' ')[1].decode() if got else 'closed'}")
                        break
            except OSError:
                self.count(f"{kind}_connect_error")
                time.sleep(0.2)

    def big_poster(self) -> None:
        import httpx

        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self.stop.is_set():
                try:
                    r = c.post("/v1/predict", files={"files": ("big.png", self.payload, "image/png")})
                    self.count(f"big_image_http_{r.status_code}")
                except httpx.HTTPError as e:
                    self.count(f"big_image_{type(e).__name__}")

    def __enter__(self) -> Hostiles:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="run folder, .safetensors or .onnx (default: the shipped model)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--images-per-request", type=int, default=1)
    p.add_argument("--slow", type=int, default=4, help="slow sockets (default 4)")
    p.add_argument("--big", type=int, default=2, help="clients posting 4096x4096 16-bit PNGs (default 2)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="the server's --threads")
    p.add_argument("--refusal-delay", type=float, default=None,
                   help="the server's --refusal-delay (default: the server's own, 0.25 s)")
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    env = environment(torch.device("cpu"))
    tmp = tempfile.TemporaryDirectory(prefix="fakeprint-faults-")
    port = free_port()
    cmd = [sys.executable, "-m", "fakeprint", "serve", *([args.checkpoint] if args.checkpoint else []),
           "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers), "--max-connections", "32",
           "--log-level", "warning"] + (["--threads", str(args.threads)] if args.threads else []) \
        + (["--refusal-delay", str(args.refusal_delay)] if args.refusal_delay is not None else [])
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tmp.name) / "server.log"
    import subprocess

    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    peak = {"rss_mb": 0.0}
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak["rss_mb"] = max(peak["rss_mb"], rss_mb(proc.pid))
            time.sleep(0.05)

    try:
        wait_healthy(url, proc, timeout=180)
        import httpx

        info = httpx.get(url + "/v1/model", timeout=30).json()
        blobs = payloads(16)
        run_load(url, blobs, 8, 4, args.images_per_request, False, 60)  # warm-up
        idle_mb = rss_mb(proc.pid)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        baseline = run_load(url, blobs, max(20, args.requests // 4), args.concurrency, args.images_per_request, False,
                            args.max_seconds)
        with Hostiles(url, args.slow, args.big, big_png()) as hostiles:
            time.sleep(1.0)  # let the hostile clients get going
            faults = run_load(url, blobs, args.requests, args.concurrency, args.images_per_request, False,
                              args.max_seconds)
            health_ms = []
            for _ in range(5):
                t = time.perf_counter()
                ok = httpx.get(url + "/healthz", timeout=10).status_code == 200
                health_ms.append((time.perf_counter() - t) * 1e3 if ok else float("inf"))
        sampling.set()
        sampler.join(timeout=2)
    finally:
        stop_server(proc)
        server_log = log_path.read_text(errors="replace") if log_path.exists() else ""
        tmp.cleanup()

    limits = info.get("limits", {})
    bound_mb = (args.workers + int(limits.get("queue", 0))) * int(limits.get("max_request_bytes", 0)) / 2**20
    result = {
        "benchmark": "serve_faults",
        "environment": env,
        "device": {"kind": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(), "load_average": load_average(),
                   "note": "the server, the normal clients and the hostile ones share the cores"},
        "versions": versions(), "commit": git_commit(),
        "model": info.get("name"), "checkpoint": args.checkpoint or "the shipped default model",
        "server": {"workers": args.workers, "max_connections": 32, "limits": limits},
        "hostile": {"slow_sockets": args.slow, "big_image_clients": args.big, "outcomes": hostiles.counts},
        "normal_without_faults": baseline, "normal_with_faults": faults,
        "healthz_during_faults_ms": [round(h, 2) for h in health_ms],
        "memory_mb": {"idle": round(idle_mb, 1), "peak": round(peak["rss_mb"], 1),
                      "bound_above_idle": round(bound_mb, 1),
                      "within_bound": peak["rss_mb"] - idle_mb <= bound_mb},
        "server_log_tracebacks": server_log.count("Traceback"),
        "goal": {"p95_ms_under": 1000, "met": faults["latency_ms"]["p95"] < 1000 and faults["errors"] == 0
                 and peak["rss_mb"] - idle_mb <= bound_mb},
    }
    emit(result, args.out)
    return 0 if result["goal"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
