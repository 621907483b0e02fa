"""The HTTP service: ``POST /v1/predict``, ``GET /v1/model``, ``GET /healthz``, the web page at ``/``.

``create_app(build_service(path, backend))`` returns a FastAPI app; ``fakeprint serve`` runs it with
uvicorn. Decoding runs in worker threads (at most ``workers`` uploads at a time, heavy ones on half of them at
most), and the decoded images of requests that arrive together share one model call (``serve.batcher``), so the
event loop, and with it ``/healthz``, stays responsive under load. ``GET /metrics``: the Prometheus text format
(``serve.metrics``). Every error is JSON ``{"error": code, "detail": text}``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
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
from fakeprint.engine.predict import (
    Classifier,
    EnsembleClassifier,
    RoutedClassifier,
    combine,
    load,
    shipped_default,
)
from fakeprint.interfaces.serve.batcher import Batcher, BatchPolicy, BatchResult, DeadlineExceeded
from fakeprint.interfaces.serve.guards import add_guards, error_response
from fakeprint.interfaces.serve.metrics import ServiceMetrics
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
from fakeprint.models.checkpoint import is_shipped, load_checkpoint, resolve_checkpoint
from fakeprint.models.ensemble_file import is_ensemble_path
from fakeprint.reports.gradcam import GradCAM, RoutedGradCAM, to_png_data_url

log = logging.getLogger("fakeprint.serve")
STATIC_DIR = Path(str(resources.files("fakeprint") / "static"))


@dataclass
class Service:
    """A loaded model behind the API: the classifier (either backend) and, when a PyTorch model is at hand,
    the Grad-CAM explainer."""

    classifier: Classifier | OnnxClassifier | EnsembleClassifier
    backend: str
    source: str
    cam: GradCAM | RoutedGradCAM | None = None
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
    if path is None:  # the shipped default: routed, where it is shipped
        path = shipped_default()
    if is_ensemble_path(path):  # NAME.ensemble.json: its members, the average calibrated (or routed)
        ens = load_backend(path, backend, device, threads)
        explainer, note = (_routed_cam(ens) if cam else (None, "disabled")) if isinstance(ens, RoutedClassifier) \
            else (None, f"an ensemble of {len(ens.members)} models has no single Grad-CAM map")
        return Service(ens, resolve_backend(None, backend), Path(str(path)).name, explainer, note)
    backend = resolve_backend(path, backend)  # the same choice as predict and evaluate
    torch_model, note = None, ""
    if is_onnx_path(path):
        clf: Classifier | OnnxClassifier = load_onnx(path, threads)
        if clf.route:  # a routed graph: each member's map from its source checkpoint
            explainer, note = _routed_cam(clf) if cam else (None, "disabled")
            return Service(clf, backend, _source_name(path, clf), explainer, note)
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


def _routed_cam(clf: RoutedClassifier | OnnxClassifier) -> tuple[RoutedGradCAM | None, str]:
    """Grad-CAM of each member of a routed model (a copy of each PyTorch model, or an ONNX member's or a routed
    graph's member's source checkpoint): each answer is one member's, so that member's map explains it."""
    cams, members = [], _route_members(clf)
    for name, source, norm in members:
        if isinstance(source, dict):  # ONNX metadata naming the source checkpoint
            model, note = _source_model(source)
        elif isinstance(source, Classifier):
            model, note = copy.deepcopy(source.model), ""
        else:
            model, note = None, f"member {name} is an ensemble: no single Grad-CAM map"
        if model is None:
            return None, note
        try:
            cams.append(GradCAM(model, norm=norm))
        except ValueError as e:  # a member without convolutions
            return None, str(e)
    return RoutedGradCAM(cams, [name for name, _, _ in members]), ""


def _route_members(clf: RoutedClassifier | OnnxClassifier) -> list[tuple[str, Any, str]]:
    """(name, what explains it, its normalisation) of each member of a routed model, in route order."""
    if isinstance(clf, OnnxClassifier):
        assert clf.route is not None
        return [(m["name"], m, m.get("normalization", "imagenet")) for m in clf.route["members"]]
    return [(_member_name(m), m.meta if isinstance(m, OnnxClassifier) else m, m.normalize) for m in clf.members]


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


def _member_name(clf: Classifier) -> str:
    """A member by the name a user gives it: a shipped model's (``robust``), else its run folder and file."""
    if clf.path is not None and is_shipped(clf.path):
        return Path(clf.path).stem
    return _source_name(clf.path, clf)


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


def create_app(service: Service, limits: Limits | None = None, workers: int = 2, token: str | None = None,
               allowed_hosts: list[str] | None = None, batching: BatchPolicy | None = None) -> FastAPI:
    """The FastAPI app for ``service``; ``workers`` bounds how many uploads decode at once (those over
    ``limits.heavy_pixels`` on half of them at most), and ``limits.queue`` how many more may be read or wait
    (then 503). ``batching``: how the decoded images of requests that arrive together share a model call.
    ``token``: when set, every request except ``/healthz``, the page and its static files must carry
    ``Authorization: Bearer <token>`` (401 otherwise). ``allowed_hosts``: Host header values accepted (``*``
    entries match anything; None: any)."""
    limits = limits or Limits()
    # PIL's own decompression-bomb guard, in step with ours (it warns above the limit, raises at twice it)
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    limiter = anyio.CapacityLimiter(max(1, workers))
    heavy = anyio.CapacityLimiter(max(1, workers // 2))  # a big-image client never holds every decoder
    capacity = max(1, workers) + max(0, int(limits.queue))  # uploads in progress: being read, waiting or running
    admitted = [0]
    clf = service.classifier
    metrics = ServiceMetrics()
    batcher = Batcher(clf.predict, batching or BatchPolicy(), metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await batcher.close()

    app = FastAPIOffline(  # FastAPI whose /docs and /redoc serve Swagger UI and ReDoc from the package, no CDN
        lifespan=lifespan,
        title="fakeprint",
        version=__version__,
        summary="Which of five image generators made a 100x100 image?",
        description="Upload images to `/v1/predict` (multipart field `files`); add `?cam=1` for Grad-CAM heat maps. "
                    "Errors are JSON `{\"error\": code, \"detail\": text}`.",
    )
    app.state.service, app.state.limits, app.state.metrics, app.state.batcher = service, limits, metrics, batcher
    add_error_handlers(app, capacity, metrics)
    add_guards(app, token, allowed_hosts, metrics, limits.refusal_delay)
    info = model_info_of(service, limits, batcher.policy)
    decode_all = decoder(limits)

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
        metrics.uploads_in_progress.set(admitted[0])
        try:
            form = await read_form(request, limits)
            try:
                files = uploaded_files(form, limits)
                blobs = [(display_name(f, i), await f.read()) for i, f in enumerate(files)]
            finally:
                await form.close()
            pixels = check_pixels(blobs, limits)  # headers only, before a decoder: over-budget requests leave now
            async with heavy if pixels > limits.heavy_pixels else contextlib.nullcontext():
                batch, sizes, decode_ms = await anyio.to_thread.run_sync(decode_all, blobs, limiter=limiter)
            res = await batcher.submit(batch)
            cams: list[dict[str, Any] | None] = [None] * len(batch)
            cam_ms = 0.0
            if cam and service.cam is not None:
                cams, cam_ms = await anyio.to_thread.run_sync(cam_maps, service, batch, res.predictions.labels,
                                                              res.predictions.file_perturbed, limiter=limiter)
        finally:
            admitted[0] -= 1
            metrics.uploads_in_progress.set(admitted[0])
        results = result_rows(clf.classes, blobs, sizes, decode_ms, res, cams, cam_ms)
        metrics.images.inc(len(results))
        seconds = time.perf_counter() - t0
        metrics.request_seconds.observe(seconds)
        return {"model": clf.name, "backend": service.backend, "count": len(results),
                "total_ms": round(seconds * 1e3, 3), "results": results}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    for path, endpoint in (("/healthz", healthz), ("/v1/model", model_info), ("/", index)):  # HEAD: GET's headers
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def add_error_handlers(app: FastAPI, capacity: int, metrics: ServiceMetrics) -> None:
    """Every error, ours or the framework's, as the documented JSON ``{"error": code, "detail": text}``."""

    @app.exception_handler(ApiError)
    async def _apierror_response(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        metrics.refused.labels("queue_full").inc()
        return error_response(503, "queue_full", f"{capacity} uploads are already being handled or waiting; retry shortly",
                      {"Retry-After": "1"})

    @app.exception_handler(DeadlineExceeded)
    async def _deadline(request: Request, exc: DeadlineExceeded) -> JSONResponse:
        return error_response(503, "deadline_exceeded", f"{exc}: the service is overloaded; retry shortly",
                      {"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            code = http.HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        except ValueError:
            code = "http_error"
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validationerror_response(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()]
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internalerror_response(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s unhandled error on %s", getattr(request.state, "request_id", "-"), request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__} while handling the request")

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.info("%s %s disconnected during its upload to %s (%s body bytes received)",
                 getattr(request.state, "request_id", "-"), client, request.url.path, f"{exc.received:,}")
        return error_response(400, "client_disconnected", "the connection closed before the request body was complete")


def model_info_of(service: Service, limits: Limits, batching: BatchPolicy | None = None) -> ModelInfo:
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
        limits=limits.as_dict(), batching=batching.as_dict() if batching else None, version=__version__,
    )
    if isinstance(clf, EnsembleClassifier):
        info.members = [{"name": m.name, "tta": m.tta, "held_out": m.meta.get("held_out") or None,
                         "calibrated": bool(m.meta.get("calibration"))} for m in clf.members]
    if isinstance(clf, RoutedClassifier) or (isinstance(clf, OnnxClassifier) and clf.route):
        pristine, perturbed = (name for name, _, _ in _route_members(clf))
        threshold = clf.threshold if isinstance(clf, RoutedClassifier) else float(clf.route["threshold"])
        info.route = {"threshold": threshold, "pristine": pristine, "perturbed": perturbed}
    return info


def decoder(limits: Limits):
    """Decoding one request's uploads, run in a worker thread: (N x 100 x 100 x 3 uint8, each upload's own size,
    each one's decoding time in ms), in upload order; a file that is not a usable image fails its request."""

    def decode_all(blobs: list[tuple[str, bytes]]) -> tuple[np.ndarray, list[tuple[int, int]], list[float]]:
        decode_ms, arrays, sizes = [], [], []
        for name, data in blobs:
            t = time.perf_counter()
            array, size = decode_upload(data, name, limits.max_pixels)
            arrays.append(array)
            sizes.append(size)
            decode_ms.append((time.perf_counter() - t) * 1e3)
        return np.stack(arrays), sizes, decode_ms

    return decode_all


def cam_maps(service: Service, batch: np.ndarray, labels: np.ndarray,
             file_perturbed: np.ndarray | None = None) -> tuple[list[dict[str, Any] | None], float]:
    """Grad-CAM maps of the predicted classes (run in a worker thread) and their time per image in ms."""
    assert service.cam is not None
    t = time.perf_counter()
    clf = service.classifier
    if isinstance(service.cam, RoutedGradCAM):  # each image's map from the member that answered it
        assert isinstance(clf, (RoutedClassifier, OnnxClassifier)) and file_perturbed is not None
        res = service.cam(batch, classes=labels, routes=clf.routes(file_perturbed))
    else:
        res = service.cam(batch, classes=labels)
    cams: list[dict[str, Any] | None] = []
    for i, (m, c) in enumerate(zip(res.maps, res.classes, strict=True)):
        row = {"png": to_png_data_url(m), "layer": res.layer, "target": clf.classes[int(c)],
               "grid": list(res.grids[i] if res.grids else res.grid), "empty": bool(m.max() <= 0)}
        if res.members is not None and isinstance(service.cam, RoutedGradCAM):
            row["member"] = service.cam.names[int(res.members[i])]
        cams.append(row)
    return cams, (time.perf_counter() - t) * 1e3 / len(batch)


def result_rows(classes: list[str], blobs: list[tuple[str, bytes]], sizes: list[tuple[int, int]],
                decode_ms: list[float], res: BatchResult, cams: list, cam_ms: float) -> list[dict[str, Any]]:
    """One result per upload, in upload order."""
    pred = res.predictions
    flags = [None] * len(blobs) if pred.uncertain is None else [bool(u) for u in pred.uncertain]
    share = res.model_ms_per_image + cam_ms
    out = []
    rows = zip(blobs, decode_ms, sizes, pred.labels, pred.probs, cams, flags, strict=True)
    for (name, _), dms, size, lab, pr, cm, unc in rows:
        out.append({"filename": name, "label": classes[int(lab)], "label_index": int(lab),
                    "confidence": float(pr[int(lab)]), "uncertain": unc,
                    "resized_from": list(size) if size != (IMAGE_SIZE, IMAGE_SIZE) else None,
                    "probabilities": {c: float(p) for c, p in zip(classes, pr, strict=True)},
                    "time_ms": round(dms + share, 3), "cam": cm})
    if pred.reasons is not None:  # why each flagged answer is flagged ([] when it is not)
        for i, row in enumerate(out):
            row["uncertain_reasons"] = pred.why(i)
    if pred.file_perturbed is not None:  # a routed ensemble's detector
        for row, p in zip(out, pred.file_perturbed, strict=True):
            row["file_perturbed"] = round(float(p), 4)
    return out
