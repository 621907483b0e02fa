"""The HTTP service, its limits, the web page's files, and Grad-CAM (issue 6, items 3 and 4).

Each server is the real thing: uvicorn on a free 127.0.0.1 port, in a thread.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import fakeprint
from conftest_service import (  # noqa: F401
    CLASSES,
    encode,
    make_checkpoint,
    one_thread,
    pil_limit_restored,
    png_header_only,
    random_images,
    running_server,
)
from fakeprint.core.errors import FakeprintError
from fakeprint.engine import predict as predict_mod
from fakeprint.interfaces.cli import build_parser, main
from fakeprint.interfaces.serve import Limits, build_service, create_app
from fakeprint.models import create_model, list_models
from fakeprint.reports.gradcam import GradCAM, conv_execution_order, find_target_layer

LIMITS = Limits(max_file_bytes=60_000, max_request_bytes=150_000, max_files=4, max_pixels=1_000_000)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve"), sharpen=8.0, metrics={"val_acc": 0.9125, "epoch": 7})


@pytest.fixture(scope="module")
def url(run):
    with running_server(create_app(build_service(run), LIMITS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def onnx_file(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serve-onnx") / "model.onnx"
    assert main(["export", str(run), "--onnx", str(out)]) == 0
    return out


def files(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


def assert_error(r: httpx.Response, status: int, code: str, *fragments: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code, body
    for f in fragments:
        assert f in body["detail"], body


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_model_info(client, run):
    info = client.get("/v1/model").json()
    assert info["name"] == "fpnet_tiny" and info["backend"] == "torch"
    assert info["source"] == "m/best.safetensors"
    assert info["classes"] == CLASSES and info["num_classes"] == 5
    assert info["metrics"] == {"val_acc": 0.9125, "epoch": 7}
    assert info["input_size"] == {"height": 100, "width": 100, "channels": 3}
    assert info["gradcam"]["available"] is True
    assert info["gradcam"]["layer"] == find_target_layer(create_model("fpnet_tiny"))
    assert info["limits"]["max_files"] == 4 and info["limits"]["max_pixels"] == 1_000_000


def test_predict_matches_the_python_api(client, run):
    images = random_images(3, seed=30)
    blobs = [encode(images[0]), encode(images[1], "JPEG", quality=90), encode(images[2], "WEBP", lossless=True)]
    r = client.post("/v1/predict", files=files(("a.png", blobs[0]), ("b.jpg", blobs[1]), ("c.webp", blobs[2])))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "fpnet_tiny" and body["backend"] == "torch" and body["count"] == 3
    ref = fakeprint.load(run).predict([Image.open(io.BytesIO(b)) for b in blobs])
    for res, name, lab, pr in zip(body["results"], ["a.png", "b.jpg", "c.webp"], ref.labels, ref.probs, strict=True):
        assert res["filename"] == name
        assert res["label"] == CLASSES[lab] and res["label_index"] == lab
        np.testing.assert_allclose([res["probabilities"][c] for c in CLASSES], pr, atol=1e-6)
        assert res["confidence"] == pytest.approx(max(res["probabilities"].values()))
        assert res["time_ms"] > 0 and "cam" not in res
    assert body["total_ms"] >= max(x["time_ms"] for x in body["results"])


def test_images_of_any_size_and_mode_are_accepted(client):
    rng = np.random.default_rng(1)
    gray = Image.fromarray(rng.integers(0, 256, (300, 41), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (64, 64, 4), dtype=np.uint8), "RGBA")
    r = client.post("/v1/predict", files=files(("g.bmp", encode(gray, "BMP")), ("t.gif", encode(rgba.convert("P"), "GIF")),
                                               ("r.tiff", encode(rgba, "TIFF"))))
    assert r.status_code == 200, r.text
    assert [x["filename"] for x in r.json()["results"]] == ["g.bmp", "t.gif", "r.tiff"]


def _png_size(data_url: str) -> tuple[int, int]:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).size


def test_cam_gives_a_heat_map_per_image(client):
    images = random_images(2, seed=31)
    r = client.post("/v1/predict", params={"cam": 1}, files=files(("a.png", encode(images[0])), ("b.png", encode(images[1]))))
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        cam = res["cam"]
        assert _png_size(cam["png"]) == (100, 100)
        assert cam["target"] == res["label"]
        assert cam["layer"] == find_target_layer(create_model("fpnet_tiny"))
        assert cam["grid"] == [13, 13]
    assert r.json()["results"][0]["cam"]["png"] != r.json()["results"][1]["cam"]["png"]


def test_onnx_backend_service_agrees_with_torch(client, onnx_file):
    images = random_images(2, seed=32)
    payload = files(("a.png", encode(images[0])), ("b.png", encode(images[1])))
    ref = client.post("/v1/predict", files=payload).json()["results"]
    with running_server(create_app(build_service(onnx_file), LIMITS)) as base, httpx.Client(base_url=base) as c:
        info = c.get("/v1/model").json()
        assert info["backend"] == "onnx" and info["source"].endswith("model.onnx")
        assert info["metrics"]["val_acc"] == 0.9125
        assert info["gradcam"]["available"] is True  # from the source checkpoint, whose hash still matches
        got = c.post("/v1/predict", params={"cam": "true"}, files=payload).json()
    assert got["backend"] == "onnx"
    for a, b in zip(ref, got["results"], strict=True):
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in CLASSES) < 1e-4
        assert _png_size(b["cam"]["png"]) == (100, 100)


def test_onnx_backend_without_its_source_checkpoint_has_no_cam(run, onnx_file, tmp_path):
    alone = tmp_path / "alone.onnx"
    shutil.copy(onnx_file, alone)
    meta = Path(str(onnx_file) + ".json").read_text()
    Path(str(alone) + ".json").write_text(meta.replace(str((run / "best.safetensors").resolve()), str(tmp_path / "gone")))
    with running_server(create_app(build_service(alone), LIMITS)) as base, httpx.Client(base_url=base) as c:
        info = c.get("/v1/model").json()
        assert info["gradcam"]["available"] is False and "not available" in info["gradcam"]["note"]
        png = encode(random_images(1)[0])
        assert_error(c.post("/v1/predict", params={"cam": 1}, files=files(("a.png", png))), 400, "cam_unavailable")
        assert c.post("/v1/predict", files=files(("a.png", png))).status_code == 200


def test_the_onnx_backend_can_export_a_checkpoint_in_memory(run):
    service = build_service(run, backend="onnx")
    assert service.backend == "onnx" and service.cam is not None


# --- limits and errors: one clear JSON 4xx each ------------------------------------------------------------

def test_file_too_large(client):
    big = encode(np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8))
    assert len(big) > LIMITS.max_file_bytes
    assert_error(client.post("/v1/predict", files=files(("big.png", big))), 413, "file_too_large", "big.png", "60,000")


def test_request_too_large(client):
    blob = encode(np.random.default_rng(1).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    assert len(blob) < LIMITS.max_file_bytes and 4 * len(blob) > LIMITS.max_request_bytes
    r = client.post("/v1/predict", files=files(*[(f"{i}.png", blob) for i in range(4)]))
    assert_error(r, 413, "request_too_large", "150,000")


def test_too_many_files(client):
    tiny = encode(np.zeros((8, 8, 3), np.uint8))
    assert_error(client.post("/v1/predict", files=files(*[(f"{i}.png", tiny) for i in range(5)])), 413,
                 "too_many_files", "at most 4")
    assert client.post("/v1/predict", files=files(*[(f"{i}.png", tiny) for i in range(4)])).status_code == 200


def test_decompression_bomb_is_refused_from_its_header(client):
    bomb = png_header_only(20000, 20000)
    assert len(bomb) < 200
    # far over the limit: PIL's guard (set to the service's limit) refuses it as it reads the header
    assert_error(client.post("/v1/predict", files=files(("bomb.png", bomb))), 413, "image_too_large",
                 "bomb.png", "limit of 1,000,000", "400000000 pixels")
    # just over the limit, with real (highly compressible) pixel data: the service's own header check
    real = encode(np.zeros((1001, 1000, 3), np.uint8))
    assert len(real) < 10_000
    assert_error(client.post("/v1/predict", files=files(("tall.png", real))), 413, "image_too_large",
                 "tall.png", "1000x1001 = 1,001,000 pixels", "limit is 1,000,000")
    # at the limit: accepted
    ok = encode(np.zeros((1000, 1000, 3), np.uint8))
    assert client.post("/v1/predict", files=files(("max.png", ok))).status_code == 200


@pytest.mark.parametrize("name, data", [
    ("notes.txt", b"hello, this is text"),
    ("empty.png", b""),
    ("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n"),
    ("page.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\n"),  # a format PIL knows, refused
])
def test_files_that_are_not_images(client, name, data):
    assert_error(client.post("/v1/predict", files=files(("ok.png", encode(random_images(1)[0])), (name, data))),
                 415, "not_an_image", name)


def test_a_truncated_image_is_unprocessable(client):
    png = encode(random_images(1)[0])
    assert_error(client.post("/v1/predict", files=files(("cut.png", png[: len(png) // 2]))), 422, "corrupt_image",
                 "cut.png")


def test_missing_files_field(client):
    assert_error(client.post("/v1/predict", files=[("image", ("a.png", b"x", "image/png"))]), 400, "missing_files",
                 "'files'")
    assert_error(client.post("/v1/predict", files={"files": (None, "just text")}), 400, "invalid_files_field")


@pytest.mark.parametrize("content_type, body, status, code", [
    ("application/json", b'{"files": []}', 415, "unsupported_media_type"),
    ("image/png", b"\x89PNG", 415, "unsupported_media_type"),
    ("application/x-www-form-urlencoded", b"files=a.png", 415, "unsupported_media_type"),
    (None, b"", 415, "unsupported_media_type"),
    ("multipart/form-data", b"--x\r\n", 400, "invalid_multipart"),
])
def test_wrong_content_types(client, content_type, body, status, code):
    headers = {"content-type": content_type} if content_type else {}
    assert_error(client.post("/v1/predict", content=body, headers=headers), status, code)


def test_bad_query_and_unknown_routes(client):
    png = encode(random_images(1)[0])
    assert_error(client.post("/v1/predict", params={"cam": "maybe"}, files=files(("a.png", png))), 422, "invalid_request",
                 "cam")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


# --- the page, the docs ------------------------------------------------------------------------------------

def test_the_page_and_its_files_are_served_without_external_resources(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    assert 'id="file-input"' in html and 'type="file"' in html and "multiple" in html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/static/app.js" in refs and "/static/style.css" in refs
    for ref in refs:
        assert ref.startswith(("/", "#", "data:")), ref
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", r.text), f"{name} loads something from elsewhere"
        assert "@import" not in r.text and "@font-face" not in r.text
    js = client.get("/static/app.js").text
    assert "/v1/predict" in js and "cam=1" in js and "/v1/model" in js


def test_openapi_docs(client):
    docs = client.get("/docs")
    assert docs.status_code == 200
    scripts = re.findall(r'src="([^"]+)"', docs.text) + re.findall(r'href="([^"]+\.css)"', docs.text)
    assert scripts and not [u for u in scripts if u.startswith(("http:", "https:", "//"))], scripts  # no CDN
    assert all(client.get(u).status_code == 200 for u in scripts)
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["files"]["items"]["format"] == "binary"
    assert {"413", "415"} <= set(spec["paths"]["/v1/predict"]["post"]["responses"])


# --- the command ---------------------------------------------------------------------------------------------

def test_serve_binds_to_loopback_by_default():
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.backend == "auto" and args.checkpoint == []
    assert build_parser().parse_args(["serve", "a", "b"]).checkpoint == ["a", "b"]


def test_an_ensemble_is_served_as_fakeprint_predict_scores_it(run, onnx_file, tmp_path):
    """Several models: the members' mean probabilities (the Python API's ensemble), no Grad-CAM (400 when
    asked), no ``uncertain`` flag, and ``/v1/model`` names each member with its own held-out figure, not
    as the ensemble's. An ONNX member mixes with a PyTorch one as in ``fakeprint predict``."""
    other = make_checkpoint(tmp_path, seed=3, sharpen=8.0, held_out={"accuracy": 0.8, "split": "internal split"})
    service = build_service([str(run), str(other), str(onnx_file)])
    assert service.cam is None and "ensemble of 3" in service.cam_note and service.backend == "onnx+torch"
    assert service.source == f"m/best.safetensors + m/best.safetensors + {onnx_file.parent.name}/model.onnx"
    images = random_images(3, seed=31)
    with running_server(create_app(service, LIMITS)) as base, httpx.Client(base_url=base, timeout=30) as c:
        info = c.get("/v1/model").json()
        assert info["name"] == "ensemble(fpnet_tiny, fpnet_tiny, fpnet_tiny)" and info["held_out"] is None
        assert info["calibration"] is None and info["metrics"] == {} and info["gradcam"]["available"] is False
        assert [m["held_out"] for m in info["members"]] == [None, {"accuracy": 0.8, "split": "internal split"}, None]
        r = c.post("/v1/predict", files=files(*[(f"{i}.png", encode(a)) for i, a in enumerate(images)]))
        assert r.status_code == 200, r.text
        got = np.array([[res["probabilities"][k] for k in CLASSES] for res in r.json()["results"]])
        # the ONNX member is `run` exported, so the three members' mean is (2 x run + other) / 3
        np.testing.assert_allclose(got, (2 * fakeprint.load(run).predict(images).probs + fakeprint.load(other)
                                         .predict(images).probs) / 3, atol=1e-5)
        assert all("uncertain" not in res for res in r.json()["results"])
        assert_error(c.post("/v1/predict?cam=1", files=files(("a.png", encode(images[0])))), 400,
                     "cam_unavailable", "ensemble of 3")


def test_the_serve_command_serves_on_loopback(run):
    """``fakeprint serve`` for real: a subprocess on a free 127.0.0.1 port, asked for its health, then stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fakeprint", "serve", str(run), "--port", str(port),
                             "--log-level", "warning", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=10).json()["name"] == "fpnet_tiny"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"at http://127.0.0.1:{port}/" in out and "Grad-CAM on" in out


def test_serve_without_a_model_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(predict_mod, "default_model_path", lambda: None)
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no default model" in err and "Traceback" not in err
    with pytest.raises(FakeprintError, match="no default model"):
        build_service(None)


def test_serve_option_mistakes(run, onnx_file, capsys):
    assert main(["serve", str(onnx_file), "--backend", "torch"]) == 2
    assert "is an ONNX model" in capsys.readouterr().err
    assert main(["serve", str(run), "--max-files", "0"]) == 2
    assert "--max-files must be positive" in capsys.readouterr().err
    assert main(["serve", str(run), "--refusal-delay", "-1"]) == 2
    assert "--refusal-delay must be between 0 and 10" in capsys.readouterr().err


# --- Grad-CAM -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list_models())
def test_gradcam_works_for_every_registered_model(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    if not conv_execution_order(model):  # statmlp: no convolution, a clear error instead of a map
        with pytest.raises(ValueError, match="no nn.Conv2d layer"):
            GradCAM(model)
        return
    cam = GradCAM(model)
    modules = dict(model.named_modules())
    assert isinstance(modules[cam.layer], nn.Conv2d)
    order = conv_execution_order(model)
    spatial = [n for n in order if modules[n].kernel_size != (1, 1)]
    assert cam.layer == (spatial or order)[-1]
    images = random_images(1, seed=40)
    res = cam(images)
    assert res.maps.shape == (1, 100, 100) and res.maps.dtype == np.float32
    assert res.maps.min() >= 0 and res.maps.max() <= 1
    with torch.no_grad():
        from fakeprint.engine.runtime import predict_logits

        assert res.classes[0] == predict_logits(model, images, torch.device("cpu")).argmax(1)[0]
    assert not any(p.grad is not None for p in model.parameters())  # nothing left behind
    assert not model.training


def test_gradcam_of_a_residual_model_skips_the_projection_shortcut():
    model = create_model("fpnet_tiny")
    layer = find_target_layer(model)
    assert conv_execution_order(model)[-1].endswith("shortcut.0")  # the 1x1 shortcut runs last ...
    assert layer.endswith("body.3")                               # ... but the 3x3 convolution is explained


class BrightnessNet(nn.Module):
    """Class 1's score is the amount of bright pixels (a 3x3 mean filter), class 0's its opposite."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 27)
            self.conv.bias.fill_(0)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
            self.head.bias.fill_(0)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def test_gradcam_points_at_the_evidence():
    img = np.zeros((1, 100, 100, 3), np.uint8)
    img[0, 60:90, 10:40] = 255  # a bright square, lower left
    res = GradCAM(BrightnessNet(), norm="none")(img, classes=[1])
    heat = res.maps[0]
    inside, outside = heat[60:90, 10:40].mean(), np.delete(heat.reshape(-1), np.ravel_multi_index(
        np.mgrid[55:95, 5:45].reshape(2, -1), (100, 100))).mean()
    assert inside > 0.9 and outside < 0.05
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 60 <= y < 90 and 10 <= x < 40


def test_gradcam_with_no_convolution_is_a_clear_error():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        GradCAM(nn.Sequential(nn.Flatten(), nn.Linear(30000, 5)))
