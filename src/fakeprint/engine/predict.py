"""Prediction: the Python API (``fakeprint.load(path).predict(images)``) and Kaggle-style submissions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fakeprint.core.errors import FakeprintError
from fakeprint.core.metrics import softmax
from fakeprint.data.dataset import IMAGE_SIZE, decode_image, to_rgb_array
from fakeprint.engine.predictions import (
    FAR_FROM_TRAINING,
    FLAT_IMAGE,
    LOW_CONFIDENCE,
    Predictions,
    concat_predictions,
    reason_bits,
)
from fakeprint.engine.runtime import pick_device, predict_logits
from fakeprint.features.preprocess import tta_mode
from fakeprint.features.stat_ops import shared_statistics
from fakeprint.features.statistics import StatFeatures
from fakeprint.models.checkpoint import load_checkpoint, resolve_checkpoint, shipped_model_path
from fakeprint.models.ensemble_file import is_ensemble_path, read_ensemble_file, shipped_ensemble_path
from fakeprint.models.fuse import fuse_for_inference
from fakeprint.models.router import FileDetector, load_detector

DEFAULT_ENSEMBLE = "routed"  # what load() returns where it is shipped (docs/results.md: the rule that decided it)


def default_model_path() -> Path | None:
    """What ``fakeprint.load()`` with no name loads (and the commands without a model): the routed ensemble
    ``routed`` where it is shipped with its members (``default`` for files that look as their generator wrote
    them, ``robust`` for re-saved, resized or edited ones; docs/ROBUSTNESS.md), else the checkpoint ``default``;
    None when the package ships neither."""
    routed = shipped_ensemble_path(DEFAULT_ENSEMBLE)
    if routed is not None and all(shipped_model_path(m) is not None for m in ("default", "robust")):
        return routed
    return shipped_model_path()


FLAT_STD = 1.0  # pixel standard deviation (0-255) below which an input is one flat colour: no generator's output


def flat_images(images: np.ndarray) -> np.ndarray:
    """Which uint8 N x H x W x 3 inputs are (nearly) one flat colour, e.g. a blank image or a 1 x 1 one resized:
    nothing the models were trained on, so a calibrated model flags them ``uncertain`` whatever it answers."""
    a = np.asarray(images)
    if not len(a):
        return np.zeros(0, bool)
    # each channel's spread over the image; in torch (float32, every core): numpy's float64 std took 8% of a batch
    x = torch.from_numpy(np.ascontiguousarray(a)).reshape(len(a), -1, a.shape[-1]).float()
    return (x.var(1, correction=0).amax(1) < FLAT_STD ** 2).numpy()


def calibrated(logits: np.ndarray, meta: dict[str, Any], classes: list[str],
               flat: np.ndarray | None = None) -> Predictions:
    """Predictions from logits with the checkpoint's calibration (``meta['calibration']``), if it has one; ``flat``
    (from ``flat_images``) marks inputs that are flagged ``uncertain`` whatever their score."""
    cal = meta.get("calibration") or None
    z = np.asarray(logits, np.float64) / (float(cal["temperature"]) if cal else 1.0)
    probs = softmax(z) if len(z) else np.zeros((0, len(classes)))
    labels = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    if not cal:
        return Predictions(labels, probs.astype(np.float32), classes)
    top = probs.max(1) if len(probs) else np.zeros(0)
    reasons = reason_bits(top < float(cal["uncertain_below"]), LOW_CONFIDENCE)
    if flat is not None and len(flat) == len(reasons):
        reasons |= reason_bits(flat, FLAT_IMAGE)
    return Predictions(labels, probs.astype(np.float32), classes, reasons=reasons)


class Classifier:
    """A loaded model ready to classify images of any size and mode (converted to 100x100 RGB)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], device: torch.device, path: Path | None = None):
        self.model, self.meta, self.device, self.path = model.eval(), meta, device, path
        self._fast: torch.nn.Module | None = None
        self.micro_batch: int | None = None  # images per forward pass (None: inference.cpu_micro_batch on the CPU)
        self.classes: list[str] = list(meta.get("classes") or [str(i) for i in range(meta["num_classes"])])
        self.normalize = (meta.get("normalization") or {}).get("mode", "imagenet")
        self.tta = checkpoint_tta(meta)

    @property
    def name(self) -> str:
        return str(self.meta["model"])

    @property
    def inference_model(self) -> torch.nn.Module:
        """What ``predict`` runs: a copy of ``model`` with its BatchNorms folded and ReLUs moved after pooling
        (``models.fuse``; the same outputs, faster), in channels-last layout on the CPU. Built on first use, so
        change ``model`` before the first prediction, or set ``_fast`` back to None."""
        if self._fast is None:
            fast = fuse_for_inference(self.model)
            if self.device.type == "cpu":
                fast = fast.to(memory_format=torch.channels_last)
            self._fast = fast
        return self._fast

    def logits(self, images: np.ndarray, tta: str, batch_size: int = 256) -> torch.Tensor:
        """Uncalibrated logits of N x 100 x 100 x 3 uint8 images under ``tta``."""
        return predict_logits(self.inference_model, images, self.device, batch_size=batch_size, norm=self.normalize,
                              tta=tta, channels_last=self.device.type == "cpu", micro_batch=self.micro_batch)

    def __repr__(self) -> str:
        held = (self.meta.get("held_out") or {}).get("accuracy")
        figure = f", held-out accuracy {held:.2%}" if isinstance(held, (int, float)) else ""
        return (f"Classifier({self.name}, {len(self.classes)} classes, tta={self.tta}, "
                f"calibrated={bool(self.meta.get('calibration'))}{figure}, path={str(self.path)!r})")

    def __call__(self, images: Any, **kwargs: Any) -> Predictions:
        """``clf(images)`` is ``clf.predict(images)``."""
        return self.predict(images, **kwargs)

    def to_array(self, images: Any, offset: int = 0) -> np.ndarray:
        """Paths, PIL images, uint8 arrays (HxWx3, HxW or NxHxWx3) -> N x 100 x 100 x 3 uint8.
        ``offset`` numbers the images in error messages (for chunks of a longer list)."""
        items = _as_items(images)
        if isinstance(items, np.ndarray) and items.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3) and items.dtype == np.uint8:
            return items
        out = np.empty((len(items), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
        for i, item in enumerate(items, start=offset):
            if isinstance(item, (str, Path)):
                out[i - offset] = decode_image(Path(item))
            elif isinstance(item, Image.Image):
                out[i - offset] = to_rgb_array(item)
            elif isinstance(item, np.ndarray):
                out[i - offset] = _array_to_rgb(item, i)
            else:
                raise FakeprintError(f"image {i}: expected a path, a PIL image or a uint8 array, got {type(item).__name__}")
        return out

    def predict(self, images: Any, batch_size: int = 256, tta: bool | str | None = None) -> Predictions:
        """Classify images in batches of ``batch_size``, decoding each batch just before it is used. ``tta``:
        None (default) applies the test-time augmentation the checkpoint's figures used (``self.tta``);
        ``"none"``/False, ``"flip"``/True or ``"dihedral"`` choose one."""
        tta = self.tta if tta is None else tta_mode(tta)
        if batch_size < 1:
            raise FakeprintError(f"batch_size must be at least 1, got {batch_size}")
        items = _as_items(images)
        parts, flat = [np.zeros((0, len(self.classes)), np.float32)], [np.zeros(0, bool)]  # logits, flat inputs
        for start in range(0, len(items), batch_size):
            arr = self.to_array(items[start : start + batch_size], offset=start)
            parts.append(self.logits(arr, tta, batch_size).numpy())
            flat.append(flat_images(arr))
        return calibrated(np.concatenate(parts), self.meta, self.classes, np.concatenate(flat))


def checkpoint_tta(meta: dict[str, Any]) -> str:
    """The test-time augmentation a checkpoint's figures were measured with: its ``tta`` field, else its
    training config's ``tta`` (older checkpoints), else none."""
    value = meta.get("tta", (meta.get("config") or {}).get("tta", False))
    try:
        return tta_mode(value)
    except FakeprintError:
        return "none"


def _as_items(images: Any) -> list | np.ndarray:
    """One image or many -> something to slice: an N x H x W x C array stays an array, else a list."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    if isinstance(images, (str, Path, Image.Image, np.ndarray)):
        return [images]
    return list(images)


def _array_to_rgb(a: np.ndarray, i: int) -> np.ndarray:
    if a.dtype != np.uint8:
        raise FakeprintError(f"image {i}: arrays must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise FakeprintError(f"image {i}: expected an HxWx3 array, got shape {a.shape}")
    if a.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) and a.shape[2] == 3:
        return a
    return to_rgb_array(Image.fromarray(a))


class EnsembleClassifier:
    """Several classifiers of any registered models, combined by averaging their class probabilities. With a
    ``calibration`` (an ensemble file's, ``models.ensemble_file``) the average is temperature-scaled and flagged
    ``uncertain`` as one calibrated model's probabilities are; without, ``uncertain`` is None (unknown)."""

    def __init__(self, members: list[Classifier], calibration: dict[str, Any] | None = None,
                 path: Path | None = None):
        if not members:
            raise FakeprintError("an ensemble needs at least one checkpoint")
        classes = members[0].classes
        for m in members[1:]:
            if m.classes != classes:
                raise FakeprintError(f"{m.path}: classes {m.classes} differ from {members[0].path}: {classes}")
        self.members, self.classes = members, classes
        self.meta = {"model": "+".join(m.name for m in members), "num_classes": len(classes), "classes": classes}
        if calibration:
            self.meta["calibration"] = calibration
        self.path = path if path is not None else Path(str(members[0].path)) if len(members) == 1 else None
        modes = {m.tta for m in members}
        self.tta = modes.pop() if len(modes) == 1 else "mixed"
        norms = {m.normalize for m in members}
        self.normalize = norms.pop() if len(norms) == 1 else "per member"

    @property
    def name(self) -> str:
        return "ensemble(" + ", ".join(m.name for m in self.members) + ")"

    def __repr__(self) -> str:
        return f"EnsembleClassifier({', '.join(repr(m) for m in self.members)})"

    def __call__(self, images: Any, **kwargs: Any) -> Predictions:
        """``ens(images)`` is ``ens.predict(images)``, as for one ``Classifier``."""
        return self.predict(images, **kwargs)

    def predict(self, images: Any, batch_size: int = 256, tta: bool | str | None = None) -> Predictions:
        """Mean of the members' probabilities; ``tta`` None: each member's own test-time augmentation. The members
        see ``batch_size`` images at a time, the one with the most statistics first, so that the others take
        theirs from it (``features.stat_ops.shared_statistics``: ``default``'s are the start of ``accurate``'s)."""
        arr = self.members[0].to_array(images)
        order = sorted(range(len(self.members)), key=lambda i: -_statistics_dim(self.members[i]))
        parts = []
        for start in range(0, len(arr), max(1, batch_size)):
            chunk = arr[start:start + max(1, batch_size)]
            with shared_statistics():
                member_probs = {i: self.members[i].predict(chunk, batch_size, tta).probs for i in order}
            parts.append(np.mean([member_probs[i] for i in range(len(self.members))], axis=0))
        probs = np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)
        if self.meta.get("calibration"):  # the log of the average as its logits: softmax(log p / T) = p^(1/T), scaled
            return calibrated(np.log(np.clip(probs, 1e-12, 1.0)), self.meta, self.classes, flat_images(arr))
        # no calibration of the average itself: its uncertainty is unknown (None)
        return Predictions(probs.argmax(1) if len(arr) else np.zeros(0, np.int64), probs, self.classes)


def route_of(file_perturbed: np.ndarray, threshold: float) -> np.ndarray:
    """Which member of a routed model answers each image (0: the first, for pristine files; 1: the second), from the
    detector's P(perturbed): the one place the rule is written (both backends, Grad-CAM, route calibration)."""
    return (np.asarray(file_perturbed) >= float(threshold)).astype(np.int64)


def route_flags(own: np.ndarray, second: np.ndarray, top: np.ndarray, uncertain_below: float | None,
                far: np.ndarray | None = None) -> np.ndarray:
    """A routed model's ``uncertain`` flags (``route_reasons(...) != 0``) from its members' own flags."""
    return route_reasons(reason_bits(own, LOW_CONFIDENCE), second, top, uncertain_below, far) != 0


def route_reasons(own: np.ndarray, second: np.ndarray, top: np.ndarray, uncertain_below: float | None,
                  far: np.ndarray | None = None) -> np.ndarray:
    """Why a routed model flags each answer (bits of ``REASONS``): its member's own reasons; for an answer of the
    second route (a file the detector calls re-saved, resized, ...) also a top probability below ``uncertain_below``
    (None: no bar of the route's own); and any image the detector finds ``far`` from every training image (None:
    none). The one place the rule is written (prediction, both backends; its calibration)."""
    reasons = np.array(own, dtype=np.uint8)
    if uncertain_below is not None:
        low = np.asarray(second, bool) & (np.asarray(top) < uncertain_below)
        reasons |= reason_bits(low, LOW_CONFIDENCE)
    if far is not None:
        reasons |= reason_bits(far, FAR_FROM_TRAINING)
    return reasons


class RoutedClassifier(EnsembleClassifier):
    """Two classifiers and a file detector (``models.router``): an image whose file the detector calls pristine
    (P(perturbed) below ``threshold``) is classified by the first member, any other by the second; each answer
    (probabilities, ``uncertain``) is its member's, calibrated as that member is; ``uncertain_below`` (fitted by
    ``engine.routing.calibrate_route``) also flags a second-member answer whose top probability is below it. The
    statistics are computed once per image, by the detector, and hybrid members take theirs from there
    (``features.stat_ops.shared_statistics``): routing costs about what the first member alone costs."""

    def __init__(self, members: list[Classifier], detector: FileDetector, threshold: float,
                 path: Path | None = None, uncertain_below: float | None = None):
        if len(members) != 2:
            raise FakeprintError("a routed ensemble has two members: one for pristine files, one for perturbed ones")
        super().__init__(members, None, path)
        self.detector, self.threshold = detector, float(threshold)
        self.uncertain_below = uncertain_below  # the second route's own flag threshold (engine.routing)
        self.meta["model"] = "|".join(m.name for m in members)
        self.meta["route"] = {"threshold": self.threshold, "feature_set": detector.feature_set,
                              "uncertain_below": uncertain_below}

    @property
    def name(self) -> str:
        return f"routed({self.members[0].name} | {self.members[1].name})"

    def routes(self, file_perturbed: np.ndarray) -> np.ndarray:
        """Which member answers each image (``route_of`` at this model's threshold)."""
        return route_of(file_perturbed, self.threshold)

    def file_perturbed(self, arr: np.ndarray) -> np.ndarray:
        """P(perturbed) of each N x 100 x 100 x 3 uint8 image; call inside ``shared_statistics`` to share them."""
        return self.file_signals(arr)[0]

    def file_signals(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(perturbed) of each N x 100 x 100 x 3 uint8 image and whether it is far from every training image (the
        detector's typicality), from one computation of the statistics (inside ``shared_statistics``: shared)."""
        f = self.detector.image_statistics(arr)
        return self.detector.probability(f).numpy(), self.detector.far(f).numpy()

    def predict(self, images: Any, batch_size: int = 256, tta: bool | str | None = None) -> Predictions:
        arr = self.members[0].to_array(images)
        n, k = len(arr), len(self.classes)
        probs, labels = np.zeros((n, k), np.float32), np.zeros(n, np.int64)
        reasons: np.ndarray | None = np.zeros(n, np.uint8)
        p_all = np.zeros(n, np.float32)
        for start in range(0, n, max(1, batch_size)):
            chunk = arr[start:start + max(1, batch_size)]
            with shared_statistics():
                p, far = self.file_signals(chunk)
                route = self.routes(p)
                for which, member in enumerate(self.members):
                    idx = np.flatnonzero(route == which)
                    if not len(idx):
                        continue
                    got = member.predict(chunk[idx], batch_size, tta)
                    probs[start + idx], labels[start + idx] = got.probs, got.labels
                    if got.reasons is None:
                        reasons = None
                    elif reasons is not None:  # a re-saved file's answer: a higher bar of its own
                        reasons[start + idx] = route_reasons(got.reasons, np.full(len(idx), which == 1),
                                                             got.probs.max(1), self.uncertain_below, far[idx])
            p_all[start:start + len(chunk)] = p
        return Predictions(labels, probs, self.classes, file_perturbed=p_all, reasons=reasons)


def _statistics_dim(member: Any) -> int:
    """How many statistics a member's PyTorch model computes (0: none, or not a PyTorch model)."""
    model = getattr(member, "model", None)
    if not isinstance(model, torch.nn.Module):
        return 0
    return max((int(getattr(m, "dim", 0)) for m in model.modules() if isinstance(m, StatFeatures)), default=0)


def combine(members: list) -> Any:
    """One loaded classifier as it is, several as their ``EnsembleClassifier`` (none: an error)."""
    return members[0] if len(members) == 1 else EnsembleClassifier(members)


def predict_with_progress(clf: Any, images: Any, desc: str = "predicting", progress: bool | None = None,
                          chunk: int = 1024, **kwargs: Any) -> Predictions:
    """``clf.predict(images, **kwargs)`` (any backend) in chunks, with a progress bar on stderr that shows
    images/s. ``progress`` None: only when stderr is a terminal; True: always; False: never."""

    n = len(images)
    parts: list[Predictions] = []
    with tqdm(total=n, desc=desc, unit="img", disable=False if progress else None if progress is None else True,
              leave=False, dynamic_ncols=True) as bar:
        for start in range(0, max(n, 1), chunk):
            parts.append(clf.predict(images[start : start + chunk], **kwargs))
            bar.update(len(parts[-1]))
    return concat_predictions(parts)


def load_ensemble_file(path: str | Path, load_member: Any) -> EnsembleClassifier:
    """The ensemble an ensemble file describes, each member loaded by ``load_member(path_or_name)``: averaged and
    calibrated, or routed (``RoutedClassifier``)."""
    members, cal, route = read_ensemble_file(path)
    if route is None:
        return EnsembleClassifier([load_member(m) for m in members], cal, Path(path))
    return RoutedClassifier([load_member(m) for m in members], load_detector(route["detector"]), route["threshold"],
                            Path(path), route.get("uncertain_below"))


def shipped_default() -> Path:
    """``default_model_path()``, or the clear error that nothing is shipped."""
    path = default_model_path()
    if path is None:
        raise FakeprintError("no default model is shipped in this installation; pass a checkpoint path "
                             "(a run folder or a .safetensors file)")
    return path


def load(path: str | Path | list | tuple | None = None, device: str = "cpu") -> Classifier | EnsembleClassifier:
    """Load a checkpoint (a run folder, ``NAME.safetensors`` or its stem, a shipped model's name) or an ensemble
    file; no path: what ``default_model_path`` names (the routed ``routed``); a list of several: their ensemble
    (``EnsembleClassifier``, averaged probabilities)."""
    if isinstance(path, (list, tuple)):
        return combine([load(p, device) for p in path])
    if path is None:
        path = shipped_default()
    if is_ensemble_path(path):  # NAME.ensemble.json: its members and the calibration of their average, or a route
        return load_ensemble_file(path, lambda m: load(m, device))
    dev = pick_device(device)
    model, meta = load_checkpoint(path, map_location=dev)
    return Classifier(model, meta, dev, resolve_checkpoint(path))
