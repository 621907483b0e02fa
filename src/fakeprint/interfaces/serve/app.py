"""The HTTP service: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``, the web page at ``/``.

``create_app(build_service(path, backend))`` returns a FastAPI app; ``fakeprint serve`` runs it with
uvicorn. Decoding and inference run in worker threads (at most ``workers`` at a time), so the event loop,
and with it ``/healthz``, stays responsive under load. Every error is JSON ``{"error": code, "detail": text}``.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import http
import logging
import re
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from fakeprint.core.errors import FakeprintError
from fakeprint.core.versions import __version__
from fakeprint.data.dataset import IMAGE_SIZE
from fakeprint.engine.onnx import (
    OnnxClassifier,
    is_onnx_path,
    load_backend,
    load_onnx,
    onnx_from_classifier,
    resolve_backend,
)
from fakeprint.engine.predict import Classifier, EnsembleClassifier, combine, load
from fakeprint.interfaces.serve.schemas import (
    ERROR_RESPONSES,
    PREDICT_BODY,
    ModelInfo,
    PredictResponse,
)
from fakeprint.interfaces.serve.uploads import (
    ApiError,
    ClientGone,
    Limits,
    check_content_type,
    check_pixels,
    decode_upload,
    display_name,
    read_form,
    uploaded_files,
)
from fakeprint.models.checkpoint import load_checkpoint, resolve_checkpoint
from fakeprint.reports.gradcam import GradCAM, to_png_data_url

log = logging.getLogger("fakeprint.serve")
STATIC_DIR = Path(str(resources.files("fakeprint") / "static"))
# The page loads nothing from elsewhere; the policy makes sure of it.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Swagger UI and ReDoc (served from the package by fastapi-offline) start from an inline script and ReDoc runs a
# worker from a blob: still nothing from elsewhere, and no page may frame them
DOCS_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
API_CSP = "default-src 'none'; frame-ancestors 'none'"
HOST_RE = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9._-]+)(?::[0-9]{1,5})?")


@dataclass
class Service:
    """A loaded model behind the API: the classifier (either backend) and, when a PyTorch model is at hand,
    the Grad-CAM explainer."""

    classifier: Classifier | OnnxClassifier | EnsembleClassifier
    backend: str
    source: str
    cam: GradCAM | None = None
    cam_note: str = ""


def build_service(path: str | Path | list | tuple | None, backend: str = "auto", device: str = "cpu",
                  threads: int | None = None, cam: bool = True) -> Service:
    """Load ``path`` (None: the shipped default model) for the service on ``backend`` (auto, torch or onnx).
    A list of several models serves their ensemble (averaged probabilities, as ``fakeprint predict A B C``).

    Grad-CAM needs the PyTorch model: with an ``.onnx`` file it comes from the source checkpoint named in the
    ONNX metadata, used only if it is still there with the same SHA-256. An ensemble has none: its members'
    maps explain different networks, and no one of them explains the averaged prediction.
    """

    if isinstance(path, (list, tuple)):
        if len(path) > 1:
            return _ensemble_service(list(path), backend, device, threads)
        path = path[0] if path else None
    backend = resolve_backend(path, backend)  # the same choice as predict and evaluate
    torch_model, note = None, ""
    if is_onnx_path(path):
        clf: Classifier | OnnxClassifier = load_onnx(path, threads)
        torch_model, note = _source_model(clf.meta) if cam else (None, "disabled")
    else:
        tclf = load(path, device)
        torch_model = copy.deepcopy(tclf.model) if cam else None  # its own copy: CAM hooks stay out of predict
        note = "" if cam else "disabled"
        clf = onnx_from_classifier(tclf, threads) if backend == "onnx" else tclf
    norm = clf.normalize
    explainer = None
    if torch_model is not None:
        try:
            explainer = GradCAM(torch_model, norm=norm)
        except ValueError as e:  # a model without convolutions (statmlp): no map to show, said so on the page
            note = str(e)
    return Service(clf, backend, _source_name(path, clf), explainer, note)


def _ensemble_service(paths: list, backend: str, device: str, threads: int | None) -> Service:
    members = [load_backend(p, backend, device, threads) for p in paths]
    backends = sorted({resolve_backend(p, backend) for p in paths})
    source = " + ".join(_source_name(p, m) for p, m in zip(paths, members, strict=True))
    return Service(combine(members), "+".join(backends), source, None,
                   f"an ensemble of {len(members)} models has no single Grad-CAM map")


def _source_name(path: str | Path | None, clf: Classifier | OnnxClassifier) -> str:
    """``run/best.safetensors`` or ``model.onnx``: enough to tell models apart, no full server path."""

    if clf.path is None:
        return "default"
    p = Path(str(clf.path)) if is_onnx_path(clf.path) else resolve_checkpoint(clf.path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _source_model(meta: dict[str, Any]):
    src = meta.get("source_checkpoint") or {}
    p = Path(str(src.get("path", "")))
    if not src.get("path") or not p.is_file():
        return None, "the ONNX model's source checkpoint is not available, so Grad-CAM is off"
    h = hashlib.sha256(p.read_bytes()).hexdigest()
    if src.get("sha256") and h != src["sha256"]:
        return None, f"{p.name} has changed since the export, so Grad-CAM is off"
    try:
        model, _ = load_checkpoint(p)
    except FakeprintError as e:
        return None, f"source checkpoint unusable ({e}), so Grad-CAM is off"
    return model, ""


# --- response schemas (for the OpenAPI docs) ---------------------------------------------------------------


class QueueFull(Exception):
    """Every worker is busy and the upload queue is full."""


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def create_app(service: Service, limits: Limits | None = None, workers: int = 2, token: str | None = None,
               allowed_hosts: list[str] | None = None) -> FastAPI:
    """The FastAPI app for ``service``; ``workers`` bounds how many requests decode and infer at once, and
    ``limits.queue`` how many more may wait (then 503). ``token``: when set, every request except
    ``/healthz``, the page and its static files must carry ``Authorization: Bearer <token>`` (401 otherwise).
    ``allowed_hosts``: Host header values accepted (``*`` entries match anything; None: any)."""
    limits = limits or Limits()
    # PIL's own decompression-bomb guard, in step with ours (it warns above the limit, raises at twice it)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    limiter = anyio.CapacityLimiter(max(1, workers))
    capacity = max(1, workers) + max(0, int(limits.queue))  # uploads in progress: being read, waiting or running
    admitted = [0]
    clf = service.classifier
    app = FastAPIOffline(  # FastAPI whose /docs and /redoc serve Swagger UI and ReDoc from the package, no CDN
        title="fakeprint",
        version=__version__,
        summary="Which of five image generators made a 100x100 image?",
        description="Upload images to `/v1/predict` (multipart field `files`); add `?cam=1` for Grad-CAM heat maps. "
                    "Errors are JSON `{\"error\": code, \"detail\": text}`.",
    )
    app.state.service, app.state.limits = service, limits
    add_error_handlers(app, capacity)
    add_guards(app, token, allowed_hosts)
    info = model_info_of(service, limits)
    run_batch = batch_runner(service, limits)

    @app.get("/healthz", summary="liveness: the process answers (never queued)")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/model", response_model=ModelInfo, summary="the model behind the service")
    async def model_info() -> ModelInfo:
        return info

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              summary="classify one or more images", responses=ERROR_RESPONSES, openapi_extra=PREDICT_BODY)
    async def predict(request: Request,
                      cam: bool = Query(False, description="add a Grad-CAM heat map per image")) -> dict[str, Any]:
        t0 = time.perf_counter()
        check_content_type(request)
        if cam and service.cam is None:
            raise ApiError(400, "cam_unavailable", f"Grad-CAM is not available for this model: {service.cam_note}")
        if admitted[0] >= capacity:  # before the body is read: a waiting request holds no memory
            raise QueueFull
        admitted[0] += 1
        try:
            form = await read_form(request, limits)
            try:
                files = uploaded_files(form, limits)
                blobs = [(display_name(f, i), await f.read()) for i, f in enumerate(files)]
            finally:
                await form.close()
            check_pixels(blobs, limits)  # headers only, before waiting for a worker: over-budget requests leave now
            results = await anyio.to_thread.run_sync(run_batch, blobs, cam, limiter=limiter)
        finally:
            admitted[0] -= 1
        return {"model": clf.name, "backend": service.backend, "count": len(results),
                "total_ms": round((time.perf_counter() - t0) * 1e3, 3), "results": results}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    for path, endpoint in (("/healthz", healthz), ("/v1/model", model_info), ("/", index)):  # HEAD: GET's headers
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def add_error_handlers(app: FastAPI, capacity: int) -> None:
    """Every error, ours or the framework's, as the documented JSON ``{"error": code, "detail": text}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return _error(503, "queue_full", f"{capacity} uploads are already being handled or waiting; retry shortly",
                      {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            code = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = "http_error"
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s unhandled error on %s", getattr(request.state, "request_id", "-"), request.url.path)
        return _error(500, "internal_error", f"{type(exc).__name__} while handling the request")

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s %s disconnected during its upload to %s (%s body bytes received)",
                 getattr(request.state, "request_id", "-"), client, request.url.path, f"{exc.received:,}")
        return _error(400, "client_disconnected", "the connection closed before the request body was complete")


def add_guards(app: FastAPI, token: str | None, allowed_hosts: list[str] | None) -> None:
    """The Host check and the API token (before anything else runs), and the security headers of every answer."""
    hosts = [h.lower() for h in allowed_hosts] if allowed_hosts else None
    public = ("/healthz", "/", "/favicon.ico")

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if hosts is not None and "*" not in hosts:
            host = request.headers.get("host", "").lower()
            m = HOST_RE.fullmatch(host)  # a name and an optional port, nothing else (no user part, no path)
            if m is None or m["name"].strip("[]") not in {h.strip("[]") for h in hosts}:
                return _error(400, "invalid_host", f"Host {host!r} is not served here (--allowed-hosts)")
        path = request.url.path
        if token is not None and path not in public and not path.startswith("/static/"):
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                return _error(401, "unauthorized", "this service needs an API token: send the header "
                              "'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers["X-Frame-Options"] = "DENY"
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = PAGE_CSP
            response.headers["Referrer-Policy"] = "no-referrer"
        elif path.startswith(("/docs", "/redoc")):
            response.headers["Content-Security-Policy"] = DOCS_CSP
            response.headers["Referrer-Policy"] = "no-referrer"
        else:
            response.headers.setdefault("Content-Security-Policy", API_CSP)
        return response

    @app.middleware("http")
    async def _request_log(request: Request, call_next):
        """Outermost: every request gets an id (``X-Request-ID``) and one log line, whatever answered it."""
        request.state.request_id = rid = uuid.uuid4().hex[:12]
        t0 = time.perf_counter()
        client = f"{request.client.host}:{request.client.port}" if request.client else "-"
        try:
            response = await call_next(request)
        except Exception:
            log.info("%s %s %s %s 500 %.1f ms", rid, client, request.method, request.url.path,
                     (time.perf_counter() - t0) * 1e3)
            raise
        response.headers["X-Request-ID"] = rid
        log.info("%s %s %s %s %d %.1f ms", rid, client, request.method, request.url.path, response.status_code,
                 (time.perf_counter() - t0) * 1e3)
        return response


def model_info_of(service: Service, limits: Limits) -> ModelInfo:
    """What ``GET /v1/model`` answers."""
    clf = service.classifier
    info = ModelInfo(
        name=clf.name, backend=service.backend, source=service.source, classes=list(clf.classes),
        num_classes=len(clf.classes), metrics=dict(clf.meta.get("metrics") or {}),
        held_out=clf.meta.get("held_out") or None, tta=getattr(clf, "tta", "none"),
        calibration=clf.meta.get("calibration") or None,
        input_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE, "channels": 3}, normalization=clf.normalize,
        gradcam={"available": service.cam is not None, "layer": service.cam.layer if service.cam else None,
                 "note": service.cam_note},
        limits=limits.as_dict(), version=__version__,
    )
    if isinstance(clf, EnsembleClassifier):
        info.members = [{"name": m.name, "tta": m.tta, "held_out": m.meta.get("held_out") or None,
                         "calibrated": bool(m.meta.get("calibration"))} for m in clf.members]
    return info


def batch_runner(service: Service, limits: Limits):
    """The work of one request, run in a worker thread: decode every upload, one model call for all of them,
    Grad-CAM where asked; one result per upload, in upload order."""
    clf = service.classifier

    def run_batch(blobs: list[tuple[str, bytes]], cam: bool) -> list[dict[str, Any]]:
        decode_ms, arrays, sizes = [], [], []
        for name, data in blobs:
            t = time.perf_counter()
            array, size = decode_upload(data, name, limits.max_pixels)
            arrays.append(array)
            sizes.append(size)
            decode_ms.append((time.perf_counter() - t) * 1e3)
        batch = np.stack(arrays)
        t = time.perf_counter()
        pred = clf.predict(batch)
        share = (time.perf_counter() - t) * 1e3 / len(batch)
        cams: list[dict[str, Any] | None] = [None] * len(batch)
        if cam and service.cam is not None:
            t = time.perf_counter()
            res = service.cam(batch, classes=pred.labels)
            cams = [{"png": to_png_data_url(m), "layer": res.layer, "target": clf.classes[int(c)],
                     "grid": list(res.grid), "empty": bool(m.max() <= 0)}
                    for m, c in zip(res.maps, res.classes, strict=True)]
            share += (time.perf_counter() - t) * 1e3 / len(batch)
        out = []
        flags = [None] * len(blobs) if pred.uncertain is None else [bool(u) for u in pred.uncertain]
        rows = zip(blobs, decode_ms, sizes, pred.labels, pred.probs, cams, flags, strict=True)
        for (name, _), dms, size, lab, pr, cm, unc in rows:
            out.append({"filename": name, "label": clf.classes[int(lab)], "label_index": int(lab),
                        "confidence": float(pr[int(lab)]), "uncertain": unc,
                        "resized_from": list(size) if size != (IMAGE_SIZE, IMAGE_SIZE) else None,
                        "probabilities": {c: float(p) for c, p in zip(clf.classes, pr, strict=True)},
                        "time_ms": round(dms + share, 3), "cam": cm})
        return out

    return run_batch
