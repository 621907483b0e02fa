"""The service against hostile clients (issue: heavy uploads, slow clients, unbounded queue, noisy disconnects,
exposure beyond this machine), each against a real uvicorn on 127.0.0.1 where sockets matter."""

from __future__ import annotations

import io
import logging
import socket
import time
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFilter

from conftest_service import (  # noqa: F401
    encode,
    make_checkpoint,
    one_thread,
    pil_limit_restored,
    random_images,
    running_server,
)
from fakeprint.interfaces.serve import Limits, build_service, create_app
from fakeprint.interfaces.serve.server import GuardedH11Protocol, check_exposure, default_allowed_hosts
from fakeprint.interfaces.serve.uploads import ApiError, check_pixels

BOUNDARY = "fakeprintHardening42"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    return build_service(make_checkpoint(tmp_path_factory.mktemp("hardening")))


def protocol(header_timeout: float):
    return type("P", (GuardedH11Protocol,), {"header_timeout": header_timeout})


def multipart_head(length: int) -> bytes:
    return (f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n").encode()


def body_of(*images: bytes) -> bytes:
    out = b""
    for i, data in enumerate(images):
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{i}.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def connect(url: str) -> socket.socket:
    u = urlparse(url)
    return socket.create_connection((u.hostname, u.port), timeout=10)


def closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing the socket, or None if it was still open after ``seconds``."""
    s.settimeout(seconds)
    got = b""
    try:
        while chunk := s.recv(4096):
            got += chunk
        return got
    except TimeoutError:
        return None


# --------------------------------------------------------------------------------------- pixel limits

def test_per_image_and_per_request_pixel_limits_are_read_from_headers():
    limits = Limits(max_pixels=300 * 300, max_request_pixels=2 * 300 * 300)
    small = encode(random_images(1, size=300)[0])
    check_pixels([("a", small), ("b", small)], limits)  # exactly at the budget
    with pytest.raises(ApiError) as e:
        check_pixels([("a", small), ("b", small), ("c", small)], limits)
    assert e.value.status == 413 and e.value.code == "request_too_many_pixels" and "'c'" in e.value.detail
    big = encode(np.zeros((301, 300, 3), np.uint8))
    with pytest.raises(ApiError) as e:
        check_pixels([("big", big)], limits)
    assert e.value.status == 413 and e.value.code == "image_too_large" and "301" in e.value.detail
    check_pixels([("junk", b"not an image")], limits)  # left for the decoder to name


def test_defaults_suit_a_100x100_model():
    limits = Limits()
    assert limits.max_pixels == 2048 * 2048 and limits.max_request_pixels == 4 * limits.max_pixels
    assert 0 < limits.refusal_delay <= 1


def test_a_16_bit_4096_png_is_refused_before_decoding(service):
    big = Image.new("I;16", (4096, 4096))
    buf = io.BytesIO()
    big.save(buf, format="PNG", compress_level=9)
    client = TestClient(create_app(service), base_url="http://127.0.0.1")
    t = time.perf_counter()
    r = client.post("/v1/predict", files={"files": ("big.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "image_too_large", r.text
    assert time.perf_counter() - t < 5.0  # header only: decoding it took 1.4 s of CPU and 385 MB



def test_a_client_repeating_refused_uploads_gets_few_answers_and_leaves_the_cores_to_others(service):
    """Refusals for what a request sent wait ``refusal_delay`` without CPU (issue 40: a big-image client posting
    what is refused as fast as it can got 9,459 answers in 17 s and held normal requests' p95 at 1 s); answers to
    good requests do not wait, and they are served while refusals wait."""
    big = encode(Image.new("I;16", (4096, 4096)), compress_level=9)
    good = encode(random_images(1, seed=4)[0])
    delay = 0.6
    with running_server(create_app(service, Limits(refusal_delay=delay))) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        t = time.perf_counter()
        r = c.post("/v1/predict", files={"files": ("big.png", big, "image/png")})
        refused_s = time.perf_counter() - t
        assert r.status_code == 413 and r.json()["error"] == "image_too_large"
        assert refused_s >= delay * 0.95
        r = c.post("/v1/predict", files={"files": ("x.png", b"not an image", "image/png")})
        assert r.status_code in (415, 422)
        t = time.perf_counter()
        assert c.post("/v1/predict", files={"files": ("a.png", good, "image/png")}).status_code == 200
        assert time.perf_counter() - t < delay  # a good request is answered at once
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool, httpx.Client(base_url=url, timeout=30) as other:
            refusals = [pool.submit(c.post, "/v1/predict", files={"files": ("big.png", big, "image/png")})
                        for _ in range(3)]
            time.sleep(0.05)
            t = time.perf_counter()
            assert other.post("/v1/predict", files={"files": ("a.png", good, "image/png")}).status_code == 200
            assert time.perf_counter() - t < delay  # served while the refusals wait
            assert [f.result().status_code for f in refusals] == [413] * 3
    with running_server(create_app(service, Limits(refusal_delay=0))) as url, httpx.Client(base_url=url) as c:
        t = time.perf_counter()
        assert c.post("/v1/predict", files={"files": ("big.png", big, "image/png")}).status_code == 413
        assert time.perf_counter() - t < delay  # 0: answered at once

def test_large_jpegs_decode_at_reduced_scale_and_agree_with_a_full_decode():
    from fakeprint.data.dataset import decode_reduced, to_rgb_array

    yy, xx = np.mgrid[0:1600, 0:1600]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    arr = np.asarray(Image.fromarray(arr).filter(ImageFilter.BLUR))
    jpeg = encode(arr, "JPEG", quality=95)
    with Image.open(io.BytesIO(jpeg)) as im:
        decode_reduced(im)
        assert im.size == (200, 200)  # 1/8 scale, still at least twice 100 on each side
        reduced = to_rgb_array(im)
    with Image.open(io.BytesIO(jpeg)) as im:
        full = to_rgb_array(im)
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < 6.0
    with Image.open(io.BytesIO(encode(arr[:150, :150], "JPEG"))) as im:  # small: left alone
        decode_reduced(im)
        assert im.size == (150, 150)


# --------------------------------------------------------------------------------------- slow clients

def test_partial_headers_are_dropped_and_healthz_is_never_locked_out(service):
    app = create_app(service, Limits(header_timeout=1.0))
    with running_server(app, http=protocol(1.0), limit_concurrency=3) as url:
        slow = [connect(url) for _ in range(4)]
        for s in slow:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # never finished
        # with the connection limit reached by slow sockets, the liveness probe still answers
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        t = time.monotonic()
        for s in slow:
            assert closed_within(s, 5.0) is not None, "a connection with unfinished headers was kept open"
            s.close()
        assert time.monotonic() - t < 4.0
        assert httpx.get(url + "/v1/model", timeout=5).status_code == 200
        # a kept-alive connection whose next request stalls is closed too
        with connect(url) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /heal")
            got = closed_within(s, 5.0)
            assert got is not None and got.startswith(b"HTTP/1.1 200") and got.count(b"HTTP/1.1") == 1


def test_a_body_that_stalls_gets_408(service):
    limits = Limits(body_idle_timeout=0.5, body_timeout=30.0)
    with running_server(create_app(service, limits), http=protocol(5.0)) as url, connect(url) as s:
        s.sendall(multipart_head(5000) + f"--{BOUNDARY}\r\n".encode())
        got = closed_within(s, 4.0)  # answered, and closed (the unread body leaves nothing to keep alive)
        assert got is not None and got.startswith(b"HTTP/1.1 408"), got
        assert b"request_timeout" in got and b"connection: close" in got.lower()
    limits = Limits(body_idle_timeout=5.0, body_timeout=1.0)  # trickling: each pause short, the whole too long
    with running_server(create_app(service, limits), http=protocol(5.0)) as url, connect(url) as s:
        s.sendall(multipart_head(5000) + body_of(b"")[: -len(f"\r\n--{BOUNDARY}--\r\n")])  # inside a file part
        t, got = time.monotonic(), None
        while time.monotonic() - t < 6.0:
            try:
                s.sendall(b"x")
            except OSError:
                break
            s.settimeout(0.3)
            try:
                got = s.recv(4096)
                break
            except TimeoutError:
                continue
        assert got is not None and got.startswith(b"HTTP/1.1 408"), got


def test_the_upload_queue_is_bounded_and_says_when_to_retry(service):
    limits = Limits(queue=1, body_idle_timeout=20.0, body_timeout=30.0)
    with running_server(create_app(service, limits, workers=1), http=protocol(20.0)) as url:
        holders = [connect(url) for _ in range(2)]  # one for the worker, one for the queue
        for s in holders:
            s.sendall(multipart_head(5000) + f"--{BOUNDARY}\r\n".encode())
        time.sleep(0.5)
        r = httpx.post(url + "/v1/predict", files={"files": ("a.png", encode(random_images(1)[0]), "image/png")},
                       timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "queue_full" and r.headers["retry-after"] == "1"
        assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        for s in holders:
            s.close()
        time.sleep(0.5)
        r = httpx.post(url + "/v1/predict", files={"files": ("a.png", encode(random_images(1)[0]), "image/png")},
                       timeout=30)
        assert r.status_code == 200, r.text


def test_a_client_that_disconnects_mid_upload_leaves_one_log_line(service, caplog):
    with running_server(create_app(service), http=protocol(5.0)) as url:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            with connect(url) as s:
                s.sendall(multipart_head(10_000) + body_of(b"\x89PNG" + b"0" * 40)[:90])
                time.sleep(0.3)
            time.sleep(1.0)
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
    lines = [r for r in caplog.records if r.name.startswith(("fakeprint", "uvicorn"))]
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in lines), caplog.text
    gone = [r for r in lines if "disconnected" in r.getMessage()]
    assert len(gone) == 1 and "body bytes received" in gone[0].getMessage()


# ------------------------------------------------------------------------------ beyond this machine

def test_head_on_get_routes(service):
    client = TestClient(create_app(service), base_url="http://127.0.0.1")
    for path in ("/healthz", "/v1/model", "/"):
        r = client.head(path)
        assert r.status_code == 200, (path, r.status_code)
    assert client.head("/static/app.js").status_code == 200


def test_host_header_is_checked(service):
    app = create_app(service, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
    assert client.get("/healthz", headers={"Host": "[::1]:8000"}).status_code == 200
    r = client.get("/v1/model", headers={"Host": "rebound.example.com"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_host"
    assert default_allowed_hosts("0.0.0.0") is None


def test_api_token_is_required_beyond_loopback(service, monkeypatch):
    from fakeprint.core.errors import FakeprintError

    with pytest.raises(FakeprintError, match="FAKEPRINT_API_TOKEN"):
        check_exposure("0.0.0.0", None)
    check_exposure("0.0.0.0", "kX3v9QpL2mZ7rT8wY4nB6cD1fG5hJ0sA")  # 32 characters of many kinds
    check_exposure("127.0.0.1", None)
    with pytest.raises(FakeprintError, match="too weak"):
        check_exposure("0.0.0.0", "s3cret")
    app = create_app(service, token="s3cret")
    client = TestClient(app, base_url="http://127.0.0.1")
    r = client.get("/v1/model")
    assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/model", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    png = encode(random_images(1)[0])
    assert client.post("/v1/predict", files={"files": ("a.png", png, "image/png")}).status_code == 401
    ok = client.post("/v1/predict", files={"files": ("a.png", png, "image/png")},
                     headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    for public in ("/healthz", "/", "/static/app.js"):
        assert client.get(public).status_code == 200, public


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(cli, monkeypatch):
    monkeypatch.delenv("FAKEPRINT_API_TOKEN", raising=False)
    r = cli("serve", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2 and "FAKEPRINT_API_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_resized_uploads_say_so(service):
    client = TestClient(create_app(service), base_url="http://127.0.0.1")
    files = [("files", ("small.png", encode(random_images(1)[0]), "image/png")),
             ("files", ("big.png", encode(random_images(1, size=300)[0][:, :200]), "image/png"))]
    r = client.post("/v1/predict", files=files)
    assert r.status_code == 200, r.text
    small, big = r.json()["results"]
    assert "resized_from" not in small and big["resized_from"] == [200, 300]
