"""The service under stress (issue 7, item 4): malformed bodies, wrong content types, oversized and
decompression-bomb images, non-images, and a bounded concurrent burst against a real uvicorn on 127.0.0.1.

Every request must be answered 2xx or a clear 4xx (JSON ``{"error", "detail"}``), and ``/healthz`` must stay OK.
"""

from __future__ import annotations

import io
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest_service import (  # noqa: F401
    encode,
    make_checkpoint,
    one_thread,
    pil_limit_restored,
    png_header_only,
    random_images,
    running_server,
)
from fakeprint.interfaces.serve import Limits, build_service, create_app

LIMITS = Limits(max_file_bytes=80_000, max_request_bytes=200_000, max_files=6, max_pixels=2_000_000)
BOUNDARY = "fakeprintBoundary7MA4YWxk"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    run = make_checkpoint(tmp_path_factory.mktemp("stress"))
    with running_server(create_app(build_service(run), LIMITS, workers=2)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def multipart(*parts: tuple[str, str | None, bytes], boundary: str = BOUNDARY) -> bytes:
    """Build a multipart body by hand: (field name, filename or None, content) per part."""
    out = b""
    for name, filename, content in parts:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        out += content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MP = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def assert_clear_4xx(r: httpx.Response, *statuses: int) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] and body["detail"], body
    return body


def healthy(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


GOOD = encode(random_images(1, seed=50)[0])

MALFORMED = {
    "garbage": b"\x00\xff" * 500,
    "no closing boundary": multipart(("files", "a.png", GOOD))[: -len(f"--{BOUNDARY}--\r\n")],
    "truncated inside a part": multipart(("files", "a.png", GOOD))[:200],
    "other boundary": multipart(("files", "a.png", GOOD), boundary="somethingElse"),
    "part without a name": f"--{BOUNDARY}\r\nContent-Disposition: form-data\r\n\r\nxyz\r\n--{BOUNDARY}--\r\n".encode(),
    "part without headers": f"--{BOUNDARY}\r\n\r\nxyz\r\n--{BOUNDARY}--\r\n".encode(),
    "header without end": f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a".encode(),
    "only the final boundary": f"--{BOUNDARY}--\r\n".encode(),
    "empty body": b"",
    "huge header line": f"--{BOUNDARY}\r\nX-Junk: {'a' * 100_000}\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
    "text field instead of a file": multipart(("files", None, b"not a file")),
    "many text fields": multipart(*[(f"f{i}", None, b"v") for i in range(50)]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_multipart_bodies(client, case):
    body = assert_clear_4xx(client.post("/v1/predict", content=MALFORMED[case], headers=MP), 400, 413)
    assert body["error"] in {"invalid_multipart", "missing_files", "invalid_files_field", "request_too_large"}


@pytest.mark.parametrize("content_type", [
    "application/json", "text/plain", "application/octet-stream", "image/png", "application/x-www-form-urlencoded",
    "multipart/mixed; boundary=x", "multipart/form-data", "multipart/form-data; boundary=", "nonsense", "",
])
def test_wrong_content_types(client, content_type):
    body = multipart(("files", "a.png", GOOD))
    r = client.post("/v1/predict", content=body, headers={"content-type": content_type} if content_type else {})
    assert assert_clear_4xx(r, 400, 415)["error"] in {"unsupported_media_type", "invalid_multipart"}


def _chunks(total: int, size: int = 16_384) -> Iterator[bytes]:
    head = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n".encode()
    yield head
    sent = len(head)
    while sent < total:
        yield b"\x00" * size
        sent += size


def test_oversized_bodies_with_and_without_content_length(client):
    big = multipart(("files", "big.png", b"\x00" * 300_000))
    assert assert_clear_4xx(client.post("/v1/predict", content=big, headers=MP), 413)["error"] == "request_too_large"
    # chunked transfer, no Content-Length: cut off once the limit is passed
    t0 = time.monotonic()
    r = client.post("/v1/predict", content=_chunks(600_000), headers=MP)
    assert assert_clear_4xx(r, 413)["error"] == "request_too_large"
    assert time.monotonic() - t0 < 30
    healthy(client)


def test_a_client_that_promises_more_than_it_sends(url, client):
    """A lying Content-Length, then the client goes away: the server must not be stuck."""
    host, port = urlparse(url).hostname, urlparse(url).port
    for length in (1_000, 10**12):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
                      f"boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n--{BOUNDARY}\r\n".encode())
            if length > LIMITS.max_request_bytes:
                s.settimeout(10)
                reply = s.recv(4096)
                assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    healthy(client)


def _bomb_png(width: int, height: int) -> bytes:
    """A real (fully decodable) PNG of zeros: tiny on disk, width x height x 3 bytes once decoded."""
    im = Image.new("RGB", (width, height))
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _gif_header(width: int, height: int) -> bytes:
    """A 1x1 GIF whose logical screen claims ``width x height``."""
    gif = encode(Image.new("P", (1, 1)), "GIF")
    return gif[:6] + width.to_bytes(2, "little") + height.to_bytes(2, "little") + gif[10:]


def _zlib_bomb_png(width: int, height: int) -> bytes:
    """A PNG whose IDAT inflates to width*height*3 bytes (a classic compression bomb)."""
    import struct

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * width * 3
    data = b"".join(raw.compress(row) for _ in range(height)) + raw.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, make", [
    ("header-20000x20000.png", lambda: png_header_only(20000, 20000)),
    ("header-65535x65535.gif", lambda: _gif_header(65535, 65535)),
    ("zeros-2000x1001.png", lambda: _bomb_png(2000, 1001)),
    ("zlib-bomb-4000x4000.png", lambda: _zlib_bomb_png(4000, 4000)),
])
def test_decompression_bombs(client, name, make):
    data = make()
    assert len(data) < LIMITS.max_file_bytes
    t0 = time.monotonic()
    body = assert_clear_4xx(client.post("/v1/predict", files=[("files", (name, data, "image/png"))]), 413)
    assert body["error"] == "image_too_large" and name in body["detail"]
    assert time.monotonic() - t0 < 20  # refused from the header, not after decoding


def test_oversized_files(client):
    noise = encode(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    assert len(noise) > LIMITS.max_file_bytes
    body = assert_clear_4xx(client.post("/v1/predict", files=[("files", ("noise.png", noise, "image/png"))]), 413)
    assert body["error"] in {"file_too_large", "request_too_large"}
    body = assert_clear_4xx(client.post("/v1/predict", files=[("files", (f"{i}.png", GOOD, "image/png"))
                                                               for i in range(LIMITS.max_files + 1)]), 413)
    assert body["error"] == "too_many_files"


NOT_IMAGES = {
    "text.png": b"just some text pretending to be a PNG",
    "random.jpg": np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(),
    "html.webp": b"<html><script>alert(1)</script></html>",
    "zip.gif": b"PK\x03\x04" + b"\x00" * 100,
    "psd.png": b"8BPS\x00\x01" + b"\x00" * 100,
    "empty.bmp": b"",
    "png-signature-only.png": b"\x89PNG\r\n\x1a\n",
    "svg.png": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
}


@pytest.mark.parametrize("name", list(NOT_IMAGES))
def test_non_image_files(client, name):
    r = client.post("/v1/predict", files=[("files", (name, NOT_IMAGES[name], "image/png"))])
    body = assert_clear_4xx(r, 415, 422)
    assert body["error"] in {"not_an_image", "corrupt_image"} and name in body["detail"]


def _request(kind: str, i: int) -> tuple[str, dict]:
    """(expected outcome, httpx.post keyword arguments) for the burst."""
    img = encode(random_images(1, seed=100 + i)[0])
    cases = {
        "one": ("ok", {"files": [("files", (f"r{i}.png", img, "image/png"))]}),
        "three+cam": ("ok", {"params": {"cam": 1}, "files": [("files", (f"r{i}-{j}.png", img, "image/png")) for j in range(3)]}),
        "text": ("4xx", {"files": [("files", ("t.txt", b"hello", "text/plain"))]}),
        "bomb": ("4xx", {"files": [("files", ("b.png", png_header_only(30000, 30000), "image/png"))]}),
        "garbage": ("4xx", {"content": b"\x00" * 1000, "headers": MP}),
        "json": ("4xx", {"json": {"files": ["x"]}}),
        "too many": ("4xx", {"files": [("files", (f"{j}.png", GOOD, "image/png")) for j in range(LIMITS.max_files + 2)]}),
        "truncated": ("4xx", {"content": multipart(("files", "a.png", img))[:300], "headers": MP}),
    }
    return cases[kind]


def test_a_concurrent_burst_is_answered_and_leaves_the_service_healthy(url, client):
    kinds = ["one", "three+cam", "text", "bomb", "garbage", "json", "too many", "truncated"]
    jobs = [(kinds[i % len(kinds)], i) for i in range(40)]
    health: list[int] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                health.append(c.get("/healthz").status_code)
                time.sleep(0.05)

    def send(job: tuple[str, int]) -> tuple[str, str, httpx.Response]:
        kind, i = job
        expected, kw = _request(kind, i)
        with httpx.Client(base_url=url, timeout=120) as c:
            return kind, expected, c.post("/v1/predict", **kw)

    poller = threading.Thread(target=poll_health, daemon=True)
    poller.start()
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(send, jobs))
    finally:
        stop.set()
        poller.join(timeout=60)
    elapsed = time.monotonic() - t0
    assert len(results) == 40
    for kind, expected, r in results:
        if expected == "ok":
            assert r.status_code == 200, (kind, r.text[:300])
            body = r.json()
            assert body["count"] == (3 if kind == "three+cam" else 1)
            for res in body["results"]:
                assert abs(sum(res["probabilities"].values()) - 1) < 1e-4
                assert ("cam" in res) == (kind == "three+cam")
        else:
            assert_clear_4xx(r)
    assert health and all(s == 200 for s in health), health
    assert elapsed < 120
    healthy(client)
    # and the service still classifies correctly afterwards
    r = client.post("/v1/predict", files=[("files", ("after.png", GOOD, "image/png"))])
    assert r.status_code == 200 and r.json()["count"] == 1
