"""The onnxruntime backend: ``OnnxClassifier`` has the ``Classifier`` interface (``predict(images)``).

It reads a model written by ``fakeprint export`` (``MODEL.onnx`` + ``MODEL.onnx.json``), whose graph takes
uint8 N x 100 x 100 x 3 images and does the normalisation itself. ``load_backend(path, backend)`` picks a
backend for the CLI and the service: ``auto`` is ``onnx`` for ``.onnx`` files and ``torch`` otherwise;
``onnx`` with a PyTorch checkpoint exports it in memory first (with the same parity check as
``fakeprint export``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import read_json_metadata
from .errors import CheckpointError, FakeprintError
from .export import FORMAT, INPUT_NAME, check_parity, export_bytes, metadata_path, onnx_session, parity_images
from .predict import Classifier, Predictions, calibrated, checkpoint_tta
from .preprocess import tta_mode

BACKENDS = ("auto", "torch", "onnx")


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``MODEL.onnx.json`` written beside ``MODEL.onnx``, validated."""
    p = metadata_path(path)
    meta = read_json_metadata(p, FORMAT, "fakeprint export writes MODEL.onnx + MODEL.onnx.json", "fakeprint ONNX metadata")
    classes = meta.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise CheckpointError(f"{p}: 'classes' must list at least two class names")
    return meta


class OnnxClassifier:
    """An exported model run by onnxruntime on the CPU; ``predict`` as in ``fakeprint.predict.Classifier``."""

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
        if not {"logits", "probs"} <= outputs:
            raise CheckpointError(f"{path}: expected outputs 'logits' and 'probs', found {sorted(outputs)}")

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
        if not len(arr):
            return Predictions(np.zeros(0, np.int64), np.zeros((0, len(self.classes)), np.float32), self.classes)
        views = [arr] if tta == "none" else [arr, arr[:, :, ::-1]] if tta == "flip" else \
            [v for k in range(4) for v in (np.rot90(arr, k, (1, 2)), np.rot90(arr, k, (1, 2))[:, :, ::-1])]
        logits = sum(self.logits(np.ascontiguousarray(v), batch_size) for v in views) / len(views)
        return calibrated(logits, self.meta, self.classes)


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
    from .predict import load

    kind = resolve_backend(path, backend)
    if is_onnx_path(path):
        return load_onnx(path, threads)
    clf = load(path, device)
    return onnx_from_classifier(clf, threads) if kind == "onnx" else clf
