"""Export a checkpoint to ONNX, checked against PyTorch before anything is written.

The exported graph takes what an application has at hand and returns what it wants:

- input ``images``: uint8, N x 100 x 100 x 3 (NHWC, RGB), N dynamic; the scaling to [0, 1] and the
  checkpoint's normalisation (ImageNet mean/std, or none) happen inside the graph;
- outputs ``logits`` (float32, N x classes) and ``probs`` (their softmax).

Beside ``MODEL.onnx`` goes ``MODEL.onnx.json`` (format ``fakeprint-onnx/1``): classes, normalisation, input
and output specification, the source checkpoint (path, SHA-256, metadata, metrics) and the parity check's
result. (``.onnx.json`` rather than ``.json`` so that exporting into a run folder never clobbers a
checkpoint's own ``best.json``.)

``nn.AdaptiveAvgPool2d`` with an output size that does not divide its input (ThreeCNN's 11 -> 4, SkipConCNN's
25 -> 6) has no ONNX counterpart in the TorchScript exporter; since the input size is fixed, each such layer
is replaced, for the export only, by the same averaging written as two constant matrix products.

Parity: a seeded batch of images (random noise, smooth gradients, flat colours) goes through PyTorch and
through onnxruntime at two batch sizes; the export is refused (nothing written, the previous file left as it
was) when any class probability differs by ``tolerance`` (default 1e-4) or more.

The runtime side: ``OnnxClassifier`` (the ``Classifier`` interface) reads ``MODEL.onnx`` + ``MODEL.onnx.json``
(a routed graph too, ``engine.onnx_routes``). ``load_backend(path, backend)`` picks the backend for the CLI and the
service: ``auto`` is ``onnx`` for ``.onnx`` files, else ``torch``; ``onnx`` with a PyTorch checkpoint exports it in
memory first (with the same parity check as ``fakeprint export``).
"""

from __future__ import annotations

import copy
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.data.dataset import IMAGE_SIZE
from fakeprint.engine.onnx_files import (
    INPUT_NAME,
    checked_export_args,
    export_versions,
    metadata_path,
    sha256_of,
    write_export,
)
from fakeprint.engine.onnx_routes import check_route, routed_predictions
from fakeprint.engine.predict import (
    Classifier,
    Predictions,
    calibrated,
    checkpoint_tta,
    flat_images,
    load,
    load_ensemble_file,
    route_of,
    shipped_default,
)
from fakeprint.engine.runtime import predict_logits
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, tta_mode, tta_views
from fakeprint.models.checkpoint import load_checkpoint, read_json_metadata, resolve_checkpoint
from fakeprint.models.ensemble_file import is_ensemble_path
from fakeprint.models.metadata import check_metadata_fields

FORMAT = "fakeprint-onnx/1"
OUTPUT_NAMES = ("logits", "probs")
DEFAULT_OPSET = 17
DEFAULT_TOLERANCE = 1e-4


class _MatrixAdaptiveAvgPool2d(nn.Module):
    """``AdaptiveAvgPool2d(out)`` for a fixed ``H x W`` input, as ``P_h @ x @ P_w^T`` (exportable)."""

    def __init__(self, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        self.register_buffer("ph", _pool_matrix(in_hw[0], out_hw[0]))
        self.register_buffer("pwt", _pool_matrix(in_hw[1], out_hw[1]).t().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.ph, x), self.pwt)


def _pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Row i averages input cells ``floor(i n_in / n_out) .. ceil((i + 1) n_in / n_out) - 1`` (PyTorch's bins)."""
    m = torch.zeros(n_out, n_in)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -(-((i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _exportable(model: nn.Module, size: int = IMAGE_SIZE) -> nn.Module:
    """A copy of ``model`` with each adaptive average pool that ONNX cannot express replaced by matrices."""
    model = copy.deepcopy(model).eval()
    shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            def hook(m, args, out, name=name):
                shapes[name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    for name, (in_hw, out_hw) in shapes.items():
        if in_hw[0] % out_hw[0] or in_hw[1] % out_hw[1]:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, _MatrixAdaptiveAvgPool2d(in_hw, out_hw).to(_device(model)))
    return model


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class UInt8Classifier(nn.Module):
    """uint8 N x H x W x 3 -> (logits, probabilities): the preprocessing of ``fakeprint.engine.runtime`` in-graph."""

    def __init__(self, model: nn.Module, norm: str = "imagenet"):
        super().__init__()
        if norm not in ("imagenet", "none"):
            raise FakeprintError(f"unknown normalization mode {norm!r} (imagenet or none)")
        self.model = model
        mean = torch.tensor(IMAGENET_MEAN if norm == "imagenet" else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD if norm == "imagenet" else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        # (x / 255 - mean) / std  ==  x * scale + shift, folded into one multiply-add
        self.register_buffer("scale", 1.0 / (255.0 * std))
        self.register_buffer("shift", -mean / std)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float() * self.scale + self.shift
        logits = self.model(x).float()
        return logits, logits.softmax(dim=1)


def parity_images(n: int = 16, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
    """A seeded, varied uint8 batch: noise, smooth gradients, flat colours and noisy gradients."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out[i] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == 1:
            a, b = rng.uniform(-1, 1, 2)
            base = np.stack([xx * a + yy * b, yy, xx], -1)
            out[i] = np.clip((base - base.min()) / max(np.ptp(base), 1e-9) * 255, 0, 255).astype(np.uint8)
        elif kind == 2:
            out[i] = rng.integers(0, 256, 3, dtype=np.uint8)
        else:
            base = np.stack([xx, yy, 1 - xx], -1) * 200 + rng.normal(0, 20, (size, size, 3))
            out[i] = np.clip(base, 0, 255).astype(np.uint8)
    return out


@dataclass
class ExportResult:
    onnx_path: Path
    metadata_path: Path
    max_abs_diff: float
    parity_images: int
    seconds: float


def export_bytes(model: nn.Module, norm: str = "imagenet", opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX model (uint8 NHWC in, logits and probabilities out, dynamic batch) as bytes."""
    wrapper = UInt8Classifier(_exportable(model), norm).eval()
    dummy = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8, device=_device(model))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        try:
            torch.onnx.export(
                wrapper, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUT_NAMES}},
            )
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one clear message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FakeprintError(f"ONNX export of {type(model).__name__} failed: {first[:300]}") from None
    return buf.getvalue()


def onnx_session(model_bytes: bytes | str | Path, threads: int | None = None):
    """An onnxruntime CPU session for a model file or its bytes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FakeprintError("the ONNX backend needs onnxruntime: pip install 'fakeprint[onnx]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # no busy-waiting between operators: on shared or oversubscribed cores spinning threads steal the CPU
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    src = str(model_bytes) if isinstance(model_bytes, Path) else model_bytes
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_probs(session, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities from an exported model's session for N x H x W x 3 uint8 images."""
    out = [session.run(["probs"], {INPUT_NAME: np.ascontiguousarray(images[s : s + batch_size])})[0]
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def check_parity(model: nn.Module, session, norm: str, images: np.ndarray) -> float:
    """Largest absolute difference between PyTorch's and onnxruntime's probabilities on ``images``, computed
    in one batch and in batches of 3 (exercising the dynamic batch axis)."""
    ref = predict_logits(model, images, _device(model), norm=norm).softmax(1).numpy()
    diff = 0.0
    for bs in (len(images), 3):
        got = onnx_probs(session, images, batch_size=bs)
        if got.shape != ref.shape:
            raise FakeprintError(f"ONNX model returned probabilities of shape {got.shape}, expected {ref.shape}")
        diff = max(diff, float(np.abs(got.astype(np.float64) - ref).max()))
    return diff


def export_onnx(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
                tolerance: float = DEFAULT_TOLERANCE, n_images: int = 16) -> ExportResult:
    """Export ``checkpoint`` to ``out`` (.onnx) and ``out.json`` after the parity check; raise
    ``FakeprintError`` and write nothing when the check fails."""
    t0 = time.perf_counter()
    out = checked_export_args(out, n_images)
    weights = resolve_checkpoint(checkpoint)
    model, meta = load_checkpoint(weights, map_location="cpu")
    norm = (meta.get("normalization") or {}).get("mode", "imagenet")
    data = export_bytes(model, norm, opset)
    session = onnx_session(data)
    images = parity_images(n_images)
    diff = check_parity(model, session, norm, images)
    if not diff < tolerance:
        raise FakeprintError(
            f"ONNX parity check failed for {weights}: probabilities differ from PyTorch by up to {diff:.3g} "
            f"(tolerance {tolerance:g}); nothing written to {out}"
        )
    classes = list(meta.get("classes") or [str(i) for i in range(meta["num_classes"])])
    info: dict[str, Any] = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": meta["model"],
        "num_classes": meta["num_classes"],
        "classes": classes,
        "normalization": {
            "mode": norm,
            "mean": list(IMAGENET_MEAN) if norm == "imagenet" else [0.0, 0.0, 0.0],
            "std": list(IMAGENET_STD) if norm == "imagenet" else [1.0, 1.0, 1.0],
            "in_graph": True,
            "formula": "(images / 255 - mean) / std, per RGB channel",
        },
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "shape": ["batch", IMAGE_SIZE, IMAGE_SIZE, 3]},
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)]},
                    {"name": "probs", "dtype": "float32", "shape": ["batch", len(classes)],
                     "note": "softmax of logits"}],
        "opset": opset,
        "source_checkpoint": {"path": str(weights.resolve()), "sha256": sha256_of(weights),
                              "created": meta.get("created"), "model_args": meta.get("model_args") or {}},
        "metrics": meta.get("metrics") or {},
        "tta": checkpoint_tta(meta),
        "held_out": meta.get("held_out"),
        "calibration": meta.get("calibration"),
        "parity": {"max_abs_prob_diff": diff, "tolerance": tolerance, "images": int(n_images),
                   "batch_sizes": [int(n_images), 3]},
        "versions": export_versions(),
    }
    return ExportResult(out, write_export(out, data, info), diff, int(n_images), time.perf_counter() - t0)


BACKENDS = ("auto", "torch", "onnx")


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``MODEL.onnx.json`` written beside ``MODEL.onnx``, validated."""
    p = metadata_path(path)
    meta = read_json_metadata(p, FORMAT, "fakeprint export writes MODEL.onnx + MODEL.onnx.json", "fakeprint ONNX metadata")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise CheckpointError(f"{p}: 'classes' must list at least two class names")
    check_metadata_fields(meta, p)
    if meta.get("route") is not None:
        check_route(meta["route"], p)
    return meta


class OnnxClassifier:
    """An exported model run by onnxruntime on the CPU; ``predict`` as in ``fakeprint.engine.predict.Classifier``."""

    backend = "onnx"
    to_array = Classifier.to_array  # paths, PIL images, uint8 arrays -> N x 100 x 100 x 3 uint8

    def __init__(self, session: Any, meta: dict[str, Any], path: Path | None = None):
        self.session, self.meta, self.path = session, meta, path
        self.classes: list[str] = list(meta["classes"])
        self.normalize = (meta.get("normalization") or {}).get("mode", "imagenet")
        self.tta = checkpoint_tta(meta)
        inputs = {i.name: i for i in session.get_inputs()}
        if INPUT_NAME not in inputs or inputs[INPUT_NAME].type != "tensor(uint8)":
            raise CheckpointError(f"{path}: expected a uint8 input named {INPUT_NAME!r} (a model from fakeprint export)")
        outputs = {o.name for o in session.get_outputs()}
        self.route: dict[str, Any] | None = meta.get("route")  # a routed graph (engine.onnx_routed)
        want = {"logits", "probs"} | ({"file_perturbed"} if self.route else set()) | (
            {"typicality"} if self.route and self.route.get("far_above") is not None else set())
        if not want <= outputs:
            raise CheckpointError(f"{path}: expected outputs {sorted(want)}, found {sorted(outputs)}")

    @property
    def name(self) -> str:
        return str(self.meta["model"])

    def logits(self, arr: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits (float32) for N x 100 x 100 x 3 uint8 images, in batches of ``batch_size``."""
        out = [self.session.run(["logits"], {INPUT_NAME: np.ascontiguousarray(arr[s : s + batch_size])})[0]
               for s in range(0, len(arr), batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Any, batch_size: int = 256, tta: bool | str | None = None) -> Predictions:
        """Class probabilities for paths, PIL images or uint8 arrays; ``tta`` as in ``Classifier.predict``
        (None: the model's own; the same views as the PyTorch backend, taken on the uint8 images)."""
        tta = self.tta if tta is None else tta_mode(tta)
        if batch_size < 1:
            raise FakeprintError(f"batch_size must be at least 1, got {batch_size}")
        arr = self.to_array(images)
        if self.route:  # a routed graph (engine.onnx_routes): its members' TTA is inside it
            if tta != self.tta:
                raise FakeprintError(f"{self.path}: a routed ONNX model's test-time augmentation ({self.tta}) is "
                                     f"inside its graph; it cannot be changed to {tta}")
            return routed_predictions(self.session, self.route, self.classes, arr, batch_size)
        if not len(arr):
            return Predictions(np.zeros(0, np.int64), np.zeros((0, len(self.classes)), np.float32), self.classes)
        # the one set of test-time views (features.preprocess.tta_views), taken on the uint8 images laid out NCHW
        views = tta_views(torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2), tta)
        logits = sum(self.logits(v.permute(0, 2, 3, 1).contiguous().numpy(), batch_size) for v in views) / len(views)
        return calibrated(logits, self.meta, self.classes, flat_images(arr))

    def routes(self, file_perturbed: np.ndarray) -> np.ndarray:
        """A routed graph's: which member answered each image (``route_of`` at its threshold), as its graph chose."""
        assert self.route is not None
        return route_of(file_perturbed, self.route["threshold"])


def load_onnx(path: str | Path, threads: int | None = None) -> OnnxClassifier:
    """Load ``MODEL.onnx`` (and ``MODEL.onnx.json``) written by ``fakeprint export``."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: ONNX model not found")
    meta = read_onnx_metadata(p)
    try:
        session = onnx_session(p, threads)
    except FakeprintError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise CheckpointError(f"{p}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:200]})") from None
    return OnnxClassifier(session, meta, p)


def onnx_from_classifier(clf: Classifier, threads: int | None = None, tolerance: float = 1e-4) -> OnnxClassifier:
    """Export a loaded PyTorch classifier in memory (parity-checked) and wrap it in an ``OnnxClassifier``."""
    model = copy.deepcopy(clf.model).cpu() if clf.device.type != "cpu" else clf.model
    data = export_bytes(model, clf.normalize)
    session = onnx_session(data, threads)
    diff = check_parity(model, session, clf.normalize, parity_images(8))
    if not diff < tolerance:
        raise FakeprintError(f"{clf.path}: ONNX export differs from PyTorch by {diff:.3g} (tolerance {tolerance:g})")
    meta = {"format": FORMAT, "model": clf.name, "num_classes": len(clf.classes), "classes": clf.classes,
            "normalization": {"mode": clf.normalize}, "metrics": clf.meta.get("metrics") or {}, "tta": clf.tta,
            "calibration": clf.meta.get("calibration"), "held_out": clf.meta.get("held_out"),
            "source_checkpoint": {"path": str(clf.path)}, "parity": {"max_abs_prob_diff": diff}}
    return OnnxClassifier(session, meta, clf.path)


def is_onnx_path(path: str | Path | None) -> bool:
    return path is not None and str(path).endswith(".onnx")


def resolve_backend(path: str | Path | None, backend: str = "auto") -> str:
    """The backend that serves ``path``: ``onnx`` for an .onnx file (``torch`` is then an error), else
    ``backend`` with ``auto`` read as ``torch``. The one place where the choice is made (predict, evaluate,
    serve)."""
    if backend not in BACKENDS:
        raise FakeprintError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if is_onnx_path(path):
        if backend == "torch":
            raise FakeprintError(f"{path} is an ONNX model: use --backend onnx (or auto), or give a PyTorch checkpoint")
        return "onnx"
    return "torch" if backend == "auto" else backend


def load_backend(path: str | Path | None, backend: str = "auto", device: str = "cpu",
                 threads: int | None = None) -> Classifier | OnnxClassifier:
    """A classifier for ``path`` (None: the shipped default model) on ``backend`` (auto, torch or onnx)."""

    if path is None:
        path = shipped_default()
    if is_ensemble_path(path):  # NAME.ensemble.json: each member on this backend, the average calibrated (or routed)
        return load_ensemble_file(path, lambda m: load_backend(m, backend, device, threads))
    kind = resolve_backend(path, backend)
    if is_onnx_path(path):
        return load_onnx(path, threads)
    clf = load(path, device)
    return onnx_from_classifier(clf, threads) if kind == "onnx" else clf
