"""Shared helpers for the API, export and service tests: test checkpoints, encoded images, a live server.

(Plain functions, imported by the test modules; not a pytest plugin.)
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["0", "1", "2", "3", "4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run it with one PyTorch thread: on two cores shared with other jobs, one
    intra-op thread is many times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def pil_limit_restored():
    """Import into a test module that creates apps: ``create_app`` sets PIL's process-wide pixel limit to the
    service's; put it back for the other tests in the session."""
    before = Image.MAX_IMAGE_PIXELS
    yield
    Image.MAX_IMAGE_PIXELS = before


def make_checkpoint(root: Path, model: str = "fpnet_tiny", seed: int = 0, sharpen: float = 1.0,
                    metrics: dict | None = None, norm: str = "imagenet", held_out: dict | None = None,
                    tta: str | None = None, extra_meta: dict | None = None) -> Path:
    """A random-weight checkpoint ``root/m/best`` (returns the run folder ``root/m``). ``sharpen`` scales the
    last linear layer so that the random model gives confident, varied predictions."""
    from fakeprint.models import create_model
    from fakeprint.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = create_model(model)
    if sharpen != 1.0:
        last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.mul_(sharpen)
            last.bias.mul_(sharpen)
    # non-trivial BatchNorm statistics, so that the tests exercise them
    g = torch.Generator().manual_seed(seed + 1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    run = root / "m"
    save_checkpoint(run / "best", net, {
        "model": model, "num_classes": 5, "classes": list(CLASSES), "model_args": {},
        "normalization": {"mode": norm}, "metrics": metrics if metrics is not None else {"val_acc": 0.5},
    } | ({"held_out": held_out} if held_out else {}) | ({"tta": tta} if tta else {}) | (extra_meta or {}))
    return run


def make_routed(base: Path):
    """Two demo hybrids (seeds 1 and 2, the last 40 of 200 training images held out) and a routed ensemble file of
    them: (data folder, [run folders], the ensemble file, its route, the decoded training split)."""
    from fakeprint.data.cache import load_split
    from fakeprint.data.demo import make_demo_dataset
    from fakeprint.data.splits import write_split_csv
    from fakeprint.engine.routing import fit_router

    data = make_demo_dataset(base / "data", n_train=200, n_val=20, n_test=1, seed=5)
    full = load_split(data, "train", progress=False)
    idx = np.arange(len(full.ids))
    runs = []
    for seed in (1, 2):
        run = make_checkpoint(base / f"r{seed}", model="hybrid", seed=seed, sharpen=4.0, tta="flip")
        write_split_csv(run / "split.csv", full.ids, full.labels, idx[:160], idx[160:])  # the last 40 held out
        runs.append(run)
    out = base / "pair.ensemble.json"
    route = fit_router(str(runs[0]), str(runs[1]), data, out, images=120, seed=0)
    return data, runs, out, route, full


def random_images(n: int, seed: int = 0, size: int = 100) -> np.ndarray:
    """N x size x size x 3 uint8: smooth colour fields plus noise, different per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a = rng.uniform(0, 255, (3, 3))
        base = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] * (1 - xx) for c in range(3)], -1) / 2
        out[i] = np.clip(base + rng.normal(0, rng.uniform(5, 60), (size, size, 3)), 0, 255).astype(np.uint8)
    return out


def encode(arr: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    im = arr if isinstance(arr, Image.Image) else Image.fromarray(arr)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG that declares ``width x height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@contextmanager
def running_server(app, timeout: float = 30.0, **config) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yields the base URL. ``config``: more
    ``uvicorn.Config`` arguments (``http=``, ``limit_concurrency=``)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=5,
                                                **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
