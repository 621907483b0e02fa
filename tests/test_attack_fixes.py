"""What an independent attack found (issue 42), each refused now: formula ids in CSV files, unchecked checkpoint
calibration, a FIFO given directly, service events missing from its log, a request framed two ways, a weak API
token, EXIF orientation, framework errors in plain text, /docs without a CSP, a Host with a user part, folder links
that lead out of the folder."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import rename_test_ids
from conftest_service import encode, make_checkpoint, random_images
from fakeprint.core.csvio import csv_bytes, write_csv
from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.data.dataset import decode_image
from fakeprint.data.demo import make_demo_dataset
from fakeprint.interfaces.serve import build_service, create_app
from fakeprint.interfaces.serve.uploads import decode_upload
from fakeprint.models.checkpoint import read_metadata

FORMULAS = ["=cmd|' -C calc'!A0", "+SUM(1;2)", "-2+3", "@SUM(A1)", '=HYPERLINK("evil.com","x")']


def run(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "fakeprint", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------- 1. CSV formula injection

def test_formula_ids_are_refused_naming_the_row_everywhere(tmp_path):
    root = make_demo_dataset(tmp_path / "d", n_train=30, n_val=0, n_test=6, seed=3)
    rename_test_ids(root, ["plain", *FORMULAS])
    proc = run("data", "check", str(root))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    for row, value in enumerate(FORMULAS, start=3):  # the header is row 1, "plain" row 2
        assert f"test.csv, row {row}: image_id {value!r} starts with {value[0]!r}" in proc.stderr
    assert "plain quoted text" not in proc.stderr + proc.stdout
    proc = run("predict", "fast", "--data", str(root), "--out", str(tmp_path / "sub.csv"),
               "--probs", str(tmp_path / "p.csv"))
    assert proc.returncode == 2 and "row 3" in proc.stderr and "formula" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sub.csv").exists() and not (tmp_path / "p.csv").exists()  # nothing half-written


def test_the_csv_writers_refuse_or_neutralise_formulas(tmp_path):
    with pytest.raises(FakeprintError, match=r"row 3, column image_id: '=1\+1' starts with '='"):
        csv_bytes(["image_id", "label"], [["a", 1], ["=1+1", 2]])
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with pytest.raises(FakeprintError, match="out.csv: row 2"):
        write_csv(target, ["image_id"], [["@x"]])
    assert target.read_text() == "old\n"  # refused before anything was replaced
    text = csv_bytes(["image", "p"], [[v, -0.5] for v in FORMULAS], formulas="neutralise").decode()
    rows = list(csv.reader(io.StringIO(text)))[1:]
    assert [r[0] for r in rows] == ["'" + v for v in FORMULAS] and all(r[1] == "-0.5" for r in rows)


def test_probabilities_of_image_files_named_like_formulas_are_neutralised(tmp_path):
    Image.fromarray(random_images(1)[0]).save(tmp_path / "=cmd.png")
    proc = run("predict", "fast", "=cmd.png", "--probs", "p.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "p.csv", newline="") as f:
        assert [r["image"] for r in csv.DictReader(f)] == ["'=cmd.png"]


# ------------------------------------------------------------------------------ 2. checkpoint metadata checked

BAD_CALIBRATION = [
    ({"temperature": 0, "uncertain_below": 0.5}, "calibration.temperature"),
    ({"temperature": -1, "uncertain_below": 0.5}, "calibration.temperature"),
    ({"temperature": math.nan, "uncertain_below": 0.5}, "calibration.temperature"),
    ({"temperature": 1.0, "uncertain_below": "x"}, "calibration.uncertain_below"),
    ({"temperature": 1.0, "uncertain_below": 1.5}, "calibration.uncertain_below"),
    ({"temperature": True, "uncertain_below": 0.5}, "calibration.temperature"),
    ("yes", "'calibration'"),
]


def _tampered(tmp_path: Path, field: str, value) -> Path:
    ckpt = make_checkpoint(tmp_path / "ck") / "best.safetensors"
    meta_path = ckpt.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta[field] = value
    meta_path.write_text(json.dumps(meta))  # NaN is written as NaN, which Python's json reads back
    return ckpt


@pytest.mark.parametrize(("calibration", "field"), BAD_CALIBRATION)
def test_bad_calibration_is_refused_at_load_naming_the_field(tmp_path, calibration, field):
    ckpt = _tampered(tmp_path, "calibration", calibration)
    with pytest.raises(CheckpointError, match=re.escape(field)):
        read_metadata(ckpt)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("tta", "sideways", "'tta'"), ("normalization", {"mode": "imagenet", "std": [0.2, 0, 0.2]}, "normalization.std"),
    ("held_out", {"accuracy": 7}, "held_out.accuracy"), ("image_size", -3, "'image_size'"), ("config", [], "'config'"),
])
def test_other_fields_consumers_act_on_are_checked_too(tmp_path, field, value, named):
    with pytest.raises(CheckpointError, match=re.escape(named)):
        read_metadata(_tampered(tmp_path, field, value))


def test_the_cli_and_the_service_refuse_a_checkpoint_with_bad_calibration(tmp_path):
    ckpt = _tampered(tmp_path, "calibration", {"temperature": 1.0, "uncertain_below": "x"})
    image = tmp_path / "a.png"
    Image.fromarray(random_images(1)[0]).save(image)
    proc = run("predict", str(ckpt), str(image))
    assert proc.returncode == 2 and "calibration.uncertain_below" in proc.stderr and "Traceback" not in proc.stderr
    port = free_port()
    proc = run("serve", str(ckpt), "--port", str(port), timeout=60)  # refuses to start: it returns at once
    assert proc.returncode == 2 and "calibration.uncertain_below" in proc.stderr and "Traceback" not in proc.stderr
    assert "serving" not in proc.stderr


# ------------------------------------------------------------------------------------------------ 3. a FIFO

def test_a_fifo_given_directly_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "f.png")
    proc = run("predict", "fast", str(tmp_path / "f.png"), timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    import fakeprint

    with pytest.raises(FakeprintError, match="not a regular file"):
        fakeprint.load("fast").predict([tmp_path / "f.png"])


def test_folder_mode_refuses_links_out_of_the_folder_as_dataset_mode_does(tmp_path):
    outside = tmp_path / "elsewhere.png"
    Image.fromarray(random_images(1)[0]).save(outside)
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(random_images(1, seed=1)[0]).save(folder / "own.png")
    (folder / "link.png").symlink_to(outside)
    proc = run("predict", "fast", str(folder))
    assert proc.returncode == 2 and "link.png: a symbolic link to" in proc.stderr and "outside" in proc.stderr
    proc = run("--follow-external-links", "predict", "fast", str(folder))
    assert proc.returncode == 0 and proc.stdout.count("\t") >= 2, proc.stderr
    (folder / "inside.png").symlink_to(folder / "own.png")  # a link within the folder is fine
    (folder / "link.png").unlink()
    assert run("predict", "fast", str(folder)).returncode == 0


# ---------------------------------------------------------------------- 4-6. the real service, as a client sees it

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``fakeprint serve fast`` as a real process with a one-second header and body-idle timeout."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fakeprint", "serve", "fast", "--port", str(port),
                                 "--threads", "1", "--header-timeout", "1", "--body-idle-timeout", "1", "--no-cam"],
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        yield base, port, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except TimeoutError:
            pass
        return got


def test_the_service_logs_one_line_per_event_with_ids_and_no_bodies(server):
    base, port, log = server
    r = httpx.get(f"{base}/healthz", timeout=10)
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{12}", rid)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # headers never finished
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0")
        time.sleep(2.0)
    secret = b"SECRET-BODY-BYTES"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # an upload abandoned half way
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                  b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; "
                  b'name="files"; filename="a.png"\r\n\r\n' + secret)
        time.sleep(0.5)
    time.sleep(1.5)
    text = log.read_text()
    lines = text.splitlines()
    assert any(rid in ln and "GET /healthz 200" in ln for ln in lines), text
    assert any("sent no complete request headers within 1 s" in ln and re.search(r" c\d+ ", ln) for ln in lines), text
    assert any(("disconnected during its upload" in ln or "POST /v1/predict 400" in ln) for ln in lines), text
    assert "SECRET-BODY" not in text


def test_a_request_with_content_length_and_transfer_encoding_is_refused_and_closed(server):
    _, port, _ = server
    smuggled = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 4\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    got = _raw(port, smuggled)
    assert got.startswith(b"HTTP/1.1 400") and got.count(b"HTTP/1.1") == 1  # the smuggled GET is never answered
    head, _, body = got.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower() and b"connection: close" in head.lower()
    assert "Transfer-Encoding" in json.loads(body)["detail"]


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: nope\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.com\r\n\r\n",
], ids=["bad-content-length", "duplicate-host"])
def test_errors_below_the_app_are_the_documented_json(server, request_bytes):
    _, port, _ = server
    head, _, body = _raw(port, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower()
    answer = json.loads(body)
    assert answer["error"] == "bad_request" and answer["detail"]


def test_a_weak_api_token_is_refused():
    proc = run("serve", "fast", "--port", str(free_port()), env={"FAKEPRINT_API_TOKEN": "x"}, timeout=60)
    assert proc.returncode == 2 and "too weak" in proc.stderr and "secrets.token_urlsafe" in proc.stderr
    proc = run("serve", "fast", "--host", "0.0.0.0", "--port", str(free_port()),
               env={"FAKEPRINT_API_TOKEN": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}, timeout=60)
    assert proc.returncode == 2 and "too weak" in proc.stderr  # long but one character over and over


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(build_service(make_checkpoint(tmp_path_factory.mktemp("attack"))),
                     allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


@pytest.mark.parametrize("host", ["127.0.0.1:8000@evil.com", "127.0.0.1@evil.com", "evil.com", "127.0.0.1:x",
                                  "127.0.0.1/a"])
def test_a_host_header_must_be_a_served_name_and_a_port_only(client, host):
    r = client.get("/v1/model", headers={"host": host})
    assert r.status_code == 400 and r.json()["error"] == "invalid_host"


def test_the_served_host_with_a_port_passes(client):
    assert client.get("/v1/model", headers={"host": "127.0.0.1:8000"}).status_code == 200


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_api_docs_pages_cannot_be_framed_and_load_nothing_from_elsewhere(client, path):
    r = client.get(path)
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp and "http" not in csp
    assert r.headers["x-frame-options"] == "DENY"


def test_exif_orientation_is_applied_where_images_are_read(tmp_path):
    stored = np.zeros((100, 60, 3), np.uint8)
    stored[:10] = 255  # a white band along the top of the stored pixels
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif, quality=95)
    shown = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270).resize((100, 100),
                                                                                             Image.Resampling.BICUBIC))
    for got in (decode_image(path), decode_upload(path.read_bytes(), "phone.jpg", 10**7)[0]):
        assert np.abs(got.astype(int) - shown.astype(int)).mean() < 12  # the band is on the right, as shown
        assert got[:, -5:].mean() > 150 and got[:5].mean() < 100
    plain = encode(random_images(1)[0])
    assert decode_upload(plain, "p.png", 10**7)[0].shape == (100, 100, 3)


# ------------------------------------------------------------------- property-based: metadata and multipart bodies

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True)
                           | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = ["calibration", "tta", "normalization", "held_out", "image_size", "epoch", "metrics", "config", "classes",
          "num_classes", "model_args"]


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("prop")) / "best.safetensors"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=json_values | st.fixed_dictionaries(
    {"temperature": json_values, "uncertain_below": json_values}))
def test_any_metadata_value_is_used_safely_or_refused_naming_the_field(tmp_path, clean_checkpoint, field, value):
    """Whatever a metadata field holds: loading refuses it with a CheckpointError that names the field, or the
    model loads and gives finite probabilities that sum to 1 and a label in range."""
    import shutil

    import fakeprint

    ckpt = tmp_path / "c.safetensors"
    shutil.copy(clean_checkpoint, ckpt)
    meta = json.loads(clean_checkpoint.with_suffix(".json").read_text())
    meta[field] = value
    ckpt.with_suffix(".json").write_text(json.dumps(meta))
    try:
        clf = fakeprint.load(ckpt)
    except CheckpointError as e:
        assert field in str(e)
        return
    pred = clf.predict(random_images(2))
    assert np.isfinite(pred.probs).all() and np.allclose(pred.probs.sum(1), 1, atol=1e-4)
    assert ((pred.labels >= 0) & (pred.labels < len(clf.classes))).all()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(st.sampled_from(["files", "file", "x", ""]), st.text(max_size=12),
                                st.sampled_from([b"png", b"junk", b"", b"\x89PNG\r\n\x1a\n"])), max_size=4),
       boundary=st.sampled_from(["b", "fakeprint", "a" * 70]), close=st.booleans(), garbage=st.binary(max_size=40))
def test_any_multipart_body_gets_a_json_answer_never_a_500(client, parts, boundary, close, garbage):
    image = encode(random_images(1)[0])
    body = garbage
    for name, filename, kind in parts:
        data = image if kind == b"png" else kind
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode("utf-8", "surrogatepass") + data + b"\r\n"
    if close:
        body += f"--{boundary}--\r\n".encode()
    r = client.post("/v1/predict", content=body,
                    headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code < 500 and r.headers["content-type"].startswith("application/json")
    answer = r.json()
    if r.status_code == 200:
        assert answer["count"] == len(answer["results"]) >= 1
    else:
        assert answer["error"] and answer["detail"]


def test_a_refused_request_quotes_none_of_its_bytes_in_the_answer_or_the_log(server):
    _, port, log = server
    leaky = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"\xff\xd8\xffSECRET-CHUNK-BYTES\r\n")
    head, _, body = _raw(port, leaky).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"SECRET" not in body
    bad_header = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization Bearer SECRET-TOKEN-VALUE\r\n\r\n"
    head, _, body = _raw(port, bad_header).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"SECRET" not in body
    time.sleep(0.3)
    assert "SECRET" not in log.read_text()


def test_an_allowed_host_name_with_an_underscore_is_served(tmp_path):
    app = create_app(build_service(make_checkpoint(tmp_path / "ck")), allowed_hosts=["fakeprint_api"])
    with TestClient(app, base_url="http://fakeprint_api") as c:
        assert c.get("/v1/model", headers={"host": "fakeprint_api:8000"}).status_code == 200
        assert c.get("/v1/model", headers={"host": "fakeprint_api.evil.com"}).status_code == 400
