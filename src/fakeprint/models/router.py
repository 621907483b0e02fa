"""The file detector of a routed ensemble: the probability that an image is not the file its generator wrote but a
re-encoded, resized, cropped, blurred or noisy copy of it, from the image statistics (``StatFeatures``) by a
logistic regression (standardised statistics, one weight each). ``engine.routing.fit_router`` fits it on the
training part of a dataset; ``engine.predict.RoutedClassifier`` sends the images it calls pristine to one model
(``default``: the best on lossless files) and the others to another (``robust``: trained on perturbed files).

Stored as safetensors (``mean``, ``scale``, ``coef``, ``intercept``) with the feature set in its metadata, beside
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

    def set_weights(self, mean, scale, coef, intercept: float) -> None:
        for name, value in (("mean", mean), ("scale", scale), ("coef", coef)):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))
        self.intercept.fill_(float(intercept))


def save_detector(path: str | Path, detector: FileDetector) -> Path:
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.named_buffers() if k in
               ("mean", "scale", "coef", "intercept")}
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
    return det.eval()
