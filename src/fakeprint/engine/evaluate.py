"""Evaluate a checkpoint on a labelled split: accuracy, confusion matrix, classification report, files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fakeprint.core.errors import FakeprintError
from fakeprint.core.metrics import confusion_text, report_text, summary, write_report
from fakeprint.data.cache import SplitData, load_split
from fakeprint.data.dataset import portable_path, stratified_split
from fakeprint.data.splits import internal_ids_digest, read_split_csv
from fakeprint.engine.onnx import load_backend
from fakeprint.engine.predict import Classifier, EnsembleClassifier, combine, predict_with_progress
from fakeprint.features.preprocess import tta_mode
from fakeprint.models.checkpoint import read_metadata, resolve_checkpoint
from fakeprint.models.ensemble_file import is_ensemble_path, read_ensemble


def load_eval_split(data: Path, split: str, checkpoint: Path, cache_dir: str | None = None,
                    progress: bool = True, others: tuple[Path, ...] = ()) -> SplitData:
    """A labelled split; ``internal`` is the held-out part of train recorded in the run's ``split.csv`` (or, for
    a shipped model, recomputed and checked against its metadata). ``others``: the rest of an ensemble, each of
    which must have held out the same images."""
    if split != "internal":
        return load_split(Path(data), split, cache_dir=cache_dir, progress=progress)
    full = load_split(Path(data), "train", cache_dir=cache_dir, progress=progress)
    held = _internal_ids(full, Path(checkpoint))
    for other in others:  # compared as sets of image ids: a run folder and a shipped model may hold the same split
        if _internal_ids(full, Path(other)) != held:
            raise FakeprintError(f"--split internal: {checkpoint} and {other} held out different internal splits, "
                                 "so no image is held out from all of them")
    idx = np.array([i for i, image_id in enumerate(full.ids) if image_id in held], dtype=np.int64)
    if len(idx) != len(held):
        raise FakeprintError(f"{_split_file(Path(checkpoint))}: {len(held) - len(idx)} internal-split images are not "
                             f"in {data}/train.csv")
    return full.subset(idx, "internal")


def _internal_ids(full: SplitData, checkpoint: Path) -> set[str]:
    """The image ids ``checkpoint``'s run held out: its ``split.csv``, or for a checkpoint without its run folder
    (a shipped model) the split its figure names, recomputed."""
    split_csv = _split_file(checkpoint)
    if split_csv.is_file():
        held = set(read_split_csv(split_csv).get("internal", ([], []))[0])
    else:
        held = _recomputed_internal_ids(full, checkpoint, split_csv)
    if not held:
        raise FakeprintError(f"{split_csv}: this run held no internal split out (trained with train_on_all), so "
                             "--split internal would score images it trained on; evaluate another split")
    return held


def _recomputed_internal_ids(full: SplitData, checkpoint: Path, split_csv: Path) -> set[str]:
    """The internal split of ``checkpoint``'s run, recomputed from train.csv with the run's ``val_fraction`` and
    ``split_seed``, and checked against the digest in its metadata."""

    meta = read_metadata(checkpoint)
    want = (meta.get("held_out") or {}).get("internal_ids_sha256")
    cfg = meta.get("config") or {}
    if not want or cfg.get("train_on_all"):
        raise FakeprintError(f"{split_csv}: not found; --split internal needs the split.csv of the training run")
    _, va = stratified_split(full.labels, float(cfg["val_fraction"]), int(cfg["split_seed"]))
    ids = {full.ids[i] for i in va}
    if internal_ids_digest(ids) != want:
        raise FakeprintError(f"{checkpoint}: the internal split recomputed from this train.csv is not the one the "
                             "model's figure was measured on (a different train.csv?)")
    return ids


def evaluate(clf: Classifier | EnsembleClassifier, data: SplitData, out_dir: Path | None,
             tta: bool | str | None = None, title: str | None = None) -> dict[str, Any]:
    """``tta`` None: the checkpoint's own test-time augmentation (recorded in the metrics as used)."""
    if data.labels is None:
        raise FakeprintError(f"split {data.name!r} has no labels; evaluation needs image_id,label")

    pred = predict_with_progress(clf, data.images, f"evaluating on {data.name}", tta=tta)
    tta = getattr(clf, "tta", "none") if tta is None else tta_mode(tta)
    title = title or f"{clf.name} on the {data.name} split of {data.root}"

    extra = {"split": data.name, "checkpoint": portable_path(clf.path) if clf.path else
             [portable_path(m.path) for m in clf.members],
             "tta": tta}
    if out_dir is None:
        m = summary(data.labels, pred.labels, len(clf.classes)) | extra
    else:
        m = write_report(Path(out_dir), data.labels, pred.labels, title, extra, num_classes=len(clf.classes))
    m["text"] = (f"{title}\naccuracy {m['accuracy'] * 100:.2f}% ({m['n']} images)\n\n"
                 f"{confusion_text(m['confusion_matrix'])}\n\n{report_text(data.labels, pred.labels, len(clf.classes))}")
    return m


def evaluate_checkpoint(checkpoint: str | Path | list, data: str | Path, split: str = "validation",
                        out_dir: str | Path | None = None, tta: bool | str | None = None,
                        device: str = "cpu") -> dict[str, Any]:
    """Evaluate one checkpoint, or several as a probability-averaging ensemble (a list of checkpoints)."""
    paths = list(checkpoint) if isinstance(checkpoint, (list, tuple)) else [checkpoint]
    clf, ds = load_scored(paths, data, split, device)
    return evaluate(clf, ds, Path(out_dir) if out_dir else None, tta=tta)


def load_scored(checkpoints: list, data: str | Path, split: str, device: str = "cpu",
                progress: bool = True) -> tuple[Classifier | EnsembleClassifier, SplitData]:
    """One checkpoint, or several as their ensemble, and the labelled split they are scored on (an internal split
    must be held out by every member)."""
    paths = [Path(c) for c in checkpoints]
    clf = combine([load_backend(p, "auto", device) for p in paths])
    held = [m for p in paths for m in _checkpoints_of(p)]
    return clf, load_eval_split(Path(data), split, held[0], progress=progress, others=tuple(held[1:]))


def _checkpoints_of(path: Path) -> list[Path]:
    """The checkpoints behind ``path``: itself, or an ensemble file's members', also where a member is an ensemble
    file (each holds out the split; the file itself has no split.csv)."""
    if not is_ensemble_path(path):
        return [path]
    return [c for m in read_ensemble(path)[0] for c in _checkpoints_of(Path(m))]


def default_split(checkpoint: str | Path) -> str:
    """``internal`` when the checkpoint's run held images out (its ``split.csv`` lists some), else
    ``validation``: the default of ``evaluate`` and ``analyze``."""
    try:
        path = _split_file(Path(checkpoint))
    except FakeprintError:
        return "validation"
    if path.is_file():
        return "internal" if read_split_csv(path).get("internal") else "validation"
    if not str(checkpoint).endswith(".onnx") and (read_metadata(checkpoint).get("held_out") or {}).get(
            "internal_ids_sha256"):  # a shipped model: its figure's split
        return "internal"
    return "validation"


def _split_file(checkpoint: Path) -> Path:
    if str(checkpoint).endswith(".onnx"):
        return Path(checkpoint).parent / "split.csv"
    return resolve_checkpoint(checkpoint).parent / "split.csv"
