"""The file detector of a routed ensemble: the probability that an image is not the file its generator wrote but a
re-encoded, resized, cropped, blurred or noisy copy of it, from the image statistics (``StatFeatures``) by a
logistic regression (standardised statistics, one weight each). ``engine.routing.fit_router`` fits it on the
training part of a dataset; ``engine.predict.RoutedClassifier`` sends the images it calls pristine to one model
(``default``: the best on lossless files) and the others to another (``robust``: trained on perturbed files).

It also scores how typical an image's statistics are of the images it was fitted on (``typicality``: the standardised
statistics projected on their principal components, a Mahalanobis distance there per component), so that inputs far
from anything the models were trained on (noise, drawings, gradients, other generators) are flagged ``uncertain``
(``far``: above ``far_above``). Detectors fitted before it existed have none, and flag nothing as far.

Stored as safetensors (``mean``, ``scale``, ``coef``, ``intercept``; with typicality ``typ_center``,
``typ_components``, ``typ_location``, ``typ_precision``, ``far_above``) with the feature set in its metadata, beside
the ensemble file that names it: never a pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from fakeprint.core.errors import CheckpointError
from fakeprint.data.loader import tensor_view
from fakeprint.features.preprocess import normalize, to_float
from fakeprint.features.statistics import FEATURE_SETS, StatFeatures

FORMAT = "fakeprint-router/1"
STATS_SLICE = 32  # images per statistics call: what models.hybrid uses on the CPU, so that its calls share them
WEIGHTS = ("mean", "scale", "coef", "intercept")
TYPICALITY = ("typ_center", "typ_components", "typ_location", "typ_precision", "far_above")


def beyond(typicality, far_above: float):
    """Which typicality scores (a tensor or an array) are far: above ``far_above``, or not finite (NaN compares false).
    The one place the rule is written (``FileDetector.far``, the routed ONNX graph's runtime)."""
    return ~(typicality <= float(far_above))


class FileDetector(nn.Module):
    """Statistics (``feature_set``, inputs normalised as ``input_norm``) -> P(the file was perturbed)."""

    def __init__(self, feature_set: str = "v4", input_norm: str = "imagenet"):
        super().__init__()
        self.stats = StatFeatures(feature_set, input_norm)
        self.feature_set = feature_set
        d = self.stats.dim
        for name, value in (("mean", torch.zeros(d)), ("scale", torch.ones(d)), ("coef", torch.zeros(d)),
                            ("intercept", torch.zeros(1))):
            self.register_buffer(name, value)
        for name in TYPICALITY:  # empty: no typicality (``set_typicality`` fills them)
            self.register_buffer(name, torch.zeros(0))

    @property
    def has_typicality(self) -> bool:
        return self.typ_components.numel() > 0

    @torch.no_grad()
    def statistics(self, x: torch.Tensor) -> torch.Tensor:
        """The statistics of normalised inputs ``x``, computed as flip TTA asks for them (``forward_and_mirror``,
        in slices of STATS_SLICE), so that a hybrid member given the same images takes them from here."""
        return torch.cat([self.stats.forward_and_mirror(c)[0] for c in x.split(STATS_SLICE)]) if len(x) else (
            torch.zeros(0, self.stats.dim))

    def image_statistics(self, images: np.ndarray) -> torch.Tensor:
        """``statistics`` of N x H x W x 3 uint8 images, normalised as the model that shares them sees them."""
        return self.statistics(normalize(to_float(tensor_view(images)), self.stats.input_norm))

    def probability(self, f: torch.Tensor) -> torch.Tensor:
        """P(perturbed) of statistics ``f`` (N x dim)."""
        z = ((f.double() - self.mean.double()) / self.scale.double()) @ self.coef.double() + self.intercept.double()
        return torch.sigmoid(z).float()

    def typicality(self, f: torch.Tensor) -> torch.Tensor:
        """How far statistics ``f`` (N x dim) lie from those the detector was fitted on: the squared Mahalanobis
        distance of their standardised principal components, per component (about 1 for a typical image; zeros
        when the detector has no typicality)."""
        if not self.has_typicality:
            return torch.zeros(f.shape[0])
        z = (f.double() - self.mean.double()) / self.scale.double()
        d = (z - self.typ_center.double()) @ self.typ_components.double().T - self.typ_location.double()
        return ((d @ self.typ_precision.double()) * d).sum(1).div(self.typ_components.shape[0]).float()

    def far(self, f: torch.Tensor) -> torch.Tensor:
        """Whether statistics ``f`` are far from the fitted images' (``typicality`` above ``far_above``; none is
        without typicality). Non-finite statistics are far."""
        if not self.has_typicality:
            return torch.zeros(f.shape[0], dtype=torch.bool)
        return beyond(self.typicality(f), float(self.far_above[0]))

    def set_typicality(self, center, components, location, precision, far_above: float) -> None:
        """Install a typicality model: ``components`` k x dim (orthonormal rows), ``center`` dim, ``location`` k and
        ``precision`` k x k in the components' space, all of standardised statistics; ``far_above`` its bar."""
        values = {"typ_center": center, "typ_components": components, "typ_location": location,
                  "typ_precision": precision, "far_above": [float(far_above)]}
        for name, value in values.items():
            setattr(self, name, torch.as_tensor(np.asarray(value), dtype=torch.float32).clone())

    def set_weights(self, mean, scale, coef, intercept: float) -> None:
        for name, value in (("mean", mean), ("scale", scale), ("coef", coef)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        self.intercept.fill_(float(intercept))


def save_detector(path: str | Path, detector: FileDetector) -> Path:
    path = Path(path)
    names = WEIGHTS + (TYPICALITY if detector.has_typicality else ())
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.named_buffers() if k in names}
    save_file(tensors, str(path), metadata={"format": FORMAT, "feature_set": detector.feature_set,
                                            "input_norm": detector.stats.input_norm})
    return path


def load_detector(path: str | Path) -> FileDetector:
    """A detector from its safetensors file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: the routed ensemble's detector file is missing")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("feature_set") not in FEATURE_SETS:
        raise CheckpointError(f"{path}: not a fakeprint detector (format {meta.get('format')!r}, expected {FORMAT})")
    det = FileDetector(meta["feature_set"], meta.get("input_norm", "imagenet"))
    want = {"mean": det.stats.dim, "scale": det.stats.dim, "coef": det.stats.dim, "intercept": 1}
    for k, n in want.items():
        if k not in tensors or tuple(tensors[k].shape) != (n,):
            raise CheckpointError(f"{path}: tensor {k!r} must have shape ({n},), got "
                                  f"{tuple(tensors[k].shape) if k in tensors else 'none'}")
    det.set_weights(tensors["mean"], tensors["scale"], tensors["coef"], float(tensors["intercept"][0]))
    if any(k in tensors for k in TYPICALITY):
        det.set_typicality(*_typicality_tensors(path, tensors, det.stats.dim))
    return det.eval()


def _typicality_tensors(path: Path, tensors: dict[str, torch.Tensor], dim: int) -> tuple:
    """The typicality tensors of a detector file, their shapes checked (a clear error naming the file)."""
    missing = [k for k in TYPICALITY if k not in tensors]
    if missing:
        raise CheckpointError(f"{path}: typicality tensors missing: {', '.join(missing)}")
    comp = tensors["typ_components"]
    k = int(comp.shape[0]) if comp.ndim == 2 else 0
    if k < 1:
        raise CheckpointError(f"{path}: tensor 'typ_components' must have shape (k, {dim}) with k >= 1, got "
                              f"{tuple(comp.shape)}")
    want = {"typ_center": (dim,), "typ_components": (k, dim), "typ_location": (k,), "typ_precision": (k, k),
            "far_above": (1,)}
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{path}: tensor {name!r} must have shape {shape}, got {tuple(tensors[name].shape)}")
    return (tensors["typ_center"], comp, tensors["typ_location"], tensors["typ_precision"],
            float(tensors["far_above"][0]))
