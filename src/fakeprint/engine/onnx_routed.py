"""A routed model (``engine.predict.RoutedClassifier``) as one ONNX graph: ``fakeprint export routed --onnx R.onnx``.

The graph takes uint8 N x 100 x 100 x 3 images, as every fakeprint export does, and returns

- ``file_perturbed``: the file detector's P(the file was re-encoded, resized, cropped, blurred, ...);
- ``logits``: the answering member's logits under its test-time augmentation, divided by its temperature (its
  calibration): the first member's where ``file_perturbed`` is below the route's threshold, else the second's;
- ``probs``: their softmax, the routed model's probabilities;
- ``typicality``: the detector's typicality score (``models.router``; zeros for a detector without one); an image
  above ``route.far_above`` is far from every training image and flagged ``uncertain``.

ONNX cannot skip work row by row, so both members run on every image and ``Where`` picks: the graph costs about what
the two members cost together. The statistics are computed once, by the detector, when a member reads the same
feature set (the shipped ``routed``: v4), as in PyTorch. The test-time augmentation is inside the graph (the detector
reads the image, not its mirror, as ``RoutedClassifier`` does), so ``OnnxClassifier`` runs the graph once per image.
The ``uncertain`` flags come from ``MODEL.onnx.json``'s ``route`` (each member's calibration and the route's own bar,
``engine.predict.route_flags``). Parity with PyTorch is checked on images that take both routes before anything is
written.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fakeprint.core.errors import FakeprintError
from fakeprint.data.dataset import IMAGE_SIZE
from fakeprint.engine.onnx import (
    DEFAULT_OPSET,
    DEFAULT_TOLERANCE,
    FORMAT,
    INPUT_NAME,
    ExportResult,
    _exportable,
    onnx_session,
    parity_images,
)
from fakeprint.engine.onnx_files import checked_export_args, export_versions, sha256_of, write_export
from fakeprint.engine.predict import Classifier, RoutedClassifier, load
from fakeprint.features.perturb import perturbed_images
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD
from fakeprint.models.checkpoint import is_shipped, resolve_checkpoint
from fakeprint.models.ensemble_file import is_ensemble_path
from fakeprint.models.hybrid import Hybrid

ROUTED_OUTPUTS = ("logits", "probs", "file_perturbed", "typicality")


class RoutedGraph(nn.Module):
    """uint8 N x H x W x 3 -> (calibrated logits, probabilities, P(perturbed), typicality) of a routed model; see the
    module."""

    def __init__(self, clf: RoutedClassifier):
        super().__init__()
        for m in clf.members:
            if not isinstance(m, Classifier):
                raise FakeprintError(f"member {m.name}: only PyTorch checkpoints can be exported into one graph")
            if m.tta not in ("none", "flip"):
                raise FakeprintError(f"member {m.name}: test-time augmentation {m.tta!r} cannot be exported "
                                     "(none or flip)")
        self.detector = clf.detector
        self.members = nn.ModuleList([_exportable(m.model) for m in clf.members])
        self.norms = [m.normalize for m in clf.members]
        self.flips = [m.tta == "flip" for m in clf.members]
        self.temperatures = [float((m.meta.get("calibration") or {}).get("temperature", 1.0)) for m in clf.members]
        self.threshold = float(clf.threshold)
        stats = self.detector.stats
        # a hybrid member that reads the detector's statistics takes them from it (computed once)
        self.shares = [isinstance(m, Hybrid) and m.head.stats.groups == stats.groups
                       and m.head.stats.input_norm == stats.input_norm for m in self.members]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _normalised(self, x01: torch.Tensor, norm: str) -> torch.Tensor:
        return (x01 - self.mean) / self.std if norm == "imagenet" else x01

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x01 = images.permute(0, 3, 1, 2).float() / 255
        stats = self.detector.stats
        f, f_m = stats.forward_and_mirror(self._normalised(x01, stats.input_norm))
        p = self.detector.probability(f)
        typ = self.detector.typicality(f) if self.detector.has_typicality else p * 0
        zs = []
        for i, member in enumerate(self.members):
            x = self._normalised(x01, self.norms[i])
            zs.append(self._logits(member, x, (f, f_m) if self.shares[i] else None, self.flips[i])
                      / self.temperatures[i])
        z = torch.where((p >= self.threshold).unsqueeze(1), zs[1], zs[0])
        return z, z.softmax(1), p, typ

    @staticmethod
    def _logits(member: nn.Module, x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None,
                flip: bool) -> torch.Tensor:
        """A member's logits under its TTA, as ``Hybrid.forward_flip_tta`` sums them when it shares the statistics."""
        if stats is None:
            return (member(x) + member(x.flip(3))) / 2 if flip else member(x)
        assert isinstance(member, Hybrid)
        if not flip:
            return member.cnn(x) + member.head.classify(stats[0])
        n = x.shape[0]
        a = member.cnn(torch.cat([x, x.flip(3)]))
        b = member.head.classify(torch.cat([stats[0], stats[1]]))
        return ((a[:n] + b[:n]) + (a[n:] + b[n:])) / 2


def _member_name(clf: Classifier) -> str:
    """A shipped member by its name (``robust``), any other by its checkpoint path."""
    return Path(clf.path).stem if clf.path is not None and is_shipped(clf.path) else str(clf.path)


def _parity_batch(n: int) -> np.ndarray:
    """The seeded parity images and JPEG-60 copies of them: files the detector calls pristine and files it calls
    re-saved, so that both members' branches are checked."""
    base = parity_images(n)
    return np.concatenate([base, perturbed_images(base, "jpeg:q=60")])


def export_routed_onnx(path: str | Path, out: str | Path, opset: int = DEFAULT_OPSET,
                       tolerance: float = DEFAULT_TOLERANCE, n_images: int = 16) -> ExportResult:
    """Export the routed ensemble file ``path`` to ``out`` (.onnx) and ``out.json`` after a parity check against
    PyTorch (probabilities and ``file_perturbed`` within ``tolerance``); write nothing when it fails."""
    t0 = time.perf_counter()
    out = checked_export_args(out, n_images)
    clf = load(path) if is_ensemble_path(path) else None
    if not isinstance(clf, RoutedClassifier):
        raise FakeprintError(f"{path}: an averaged ensemble is not exported as one graph; export each member "
                             "(fakeprint export MEMBER --onnx M.onnx) and serve them together")
    graph = RoutedGraph(clf).eval()
    buf = io.BytesIO()
    dummy = torch.zeros(2, IMAGE_SIZE, IMAGE_SIZE, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        try:
            torch.onnx.export(graph, (dummy,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                              output_names=list(ROUTED_OUTPUTS), do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in ROUTED_OUTPUTS}})
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported as one clear message
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FakeprintError(f"ONNX export of {clf.name} failed: {first[:300]}") from None
    data = buf.getvalue()
    session = onnx_session(data)
    images = _parity_batch(n_images)
    ref = clf.predict(images)
    ref_typ = clf.detector.typicality(clf.detector.image_statistics(images)).double().numpy()
    diff = 0.0
    for bs in (len(images), 3):  # one batch, and batches of 3 (the dynamic batch axis)
        for s in range(0, len(images), bs):
            try:
                probs, p, typ = session.run(["probs", "file_perturbed", "typicality"], {INPUT_NAME: images[s:s + bs]})
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise FakeprintError(f"ONNX export of {clf.name}: onnxruntime cannot run the graph ({first}); "
                                     f"nothing written to {out}") from None
            diff = max(diff, float(np.abs(probs.astype(np.float64) - ref.probs[s:s + bs]).max()),
                       float(np.abs(p.astype(np.float64) - ref.file_perturbed[s:s + bs]).max()),
                       float((np.abs(typ.astype(np.float64) - ref_typ[s:s + bs]) / (1 + np.abs(ref_typ[s:s + bs]))).max()))
    routes = set(clf.routes(ref.file_perturbed).tolist())
    if not diff < tolerance:
        raise FakeprintError(f"ONNX parity check failed for {path}: outputs differ from PyTorch by up to {diff:.3g} "
                             f"(tolerance {tolerance:g}); nothing written to {out}")
    members = []
    for m in clf.members:
        weights = resolve_checkpoint(m.path)
        members.append({"name": _member_name(m), "model": m.name, "tta": m.tta, "normalization": m.normalize,
                        "calibration": m.meta.get("calibration"),
                        "held_out": m.meta.get("held_out"),
                        "source_checkpoint": {"path": str(weights.resolve()), "sha256": sha256_of(weights)}})
    ttas = {m.tta for m in clf.members}
    info: dict[str, Any] = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": clf.name,
        "num_classes": len(clf.classes), "classes": list(clf.classes),
        "normalization": {"mode": clf.members[0].normalize, "in_graph": True,
                          "formula": "each member's own normalisation, inside the graph"},
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                  "shape": ["batch", IMAGE_SIZE, IMAGE_SIZE, 3]},
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(clf.classes)],
                     "note": "the answering member's logits under its TTA, divided by its temperature"},
                    {"name": "probs", "dtype": "float32", "shape": ["batch", len(clf.classes)],
                     "note": "softmax of logits"},
                    {"name": "file_perturbed", "dtype": "float32", "shape": ["batch"],
                     "note": "the detector's P(the file was re-encoded, resized, ...); the second member answers "
                             "from route.threshold"},
                    {"name": "typicality", "dtype": "float32", "shape": ["batch"],
                     "note": "the detector's typicality score; above route.far_above an image is far from every "
                             "training image and flagged uncertain (zeros: no typicality)"}],
        "opset": opset,
        "source_checkpoint": None,
        "tta": ttas.pop() if len(ttas) == 1 else "none",
        "calibration": None,
        "route": {"threshold": clf.threshold, "uncertain_below": clf.uncertain_below, "tta_in_graph": True,
                  "far_above": float(clf.detector.far_above[0]) if clf.detector.has_typicality else None,
                  "feature_set": clf.detector.feature_set, "source": str(Path(str(clf.path)).resolve()),
                  "members": members},
        "parity": {"max_abs_diff": diff, "tolerance": tolerance, "images": len(images), "batch_sizes": [len(images), 3],
                   "routes_checked": sorted(routes)},
        "versions": export_versions(),
    }
    return ExportResult(out, write_export(out, data, info), diff, len(images), time.perf_counter() - t0)
