"""Search ``train.csv`` for mislabelled images: k-fold out-of-fold probabilities + cleanlab's confident learning.

Every image of ``train.csv`` is held out by exactly one of ``k`` stratified folds
(``sklearn.model_selection.StratifiedKFold``, shuffled with ``seed``). For each fold a model is trained on
the other ``k - 1`` folds through ``fakeprint.engine.training.train.train`` on a *view* of the dataset (a folder with
``train.csv`` = the fold's training images, ``validation.csv`` = its held-out images and symlinks to the
original image folder; no image is copied), and the held-out images are classified with the fold's
**last** checkpoint (the best one is selected on the held-out fold, which would leak). For the same reason
the folds train on a fixed schedule: a plateau scheduler or early stopping, which read the held-out fold's
labels, are refused. The out-of-fold
probabilities go to ``cleanlab.filter.find_label_issues`` (default ``filter_by='prune_by_noise_rate'``),
ranked by self-confidence (the probability the model gives the given label; lowest first).

Writes into ``out``: ``label_issues.csv`` (``image_id,given_label,suggested_label,self_confidence,rank``),
``oof_probs.csv`` (every image's out-of-fold probabilities), ``label_issues.json`` (counts and settings),
``label_issues.png`` (a gallery of the top candidates) and ``folds/<i>/run`` (the fold runs).
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fakeprint.core.csvio import write_csv
from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import NUM_CLASSES, dataset_identity
from fakeprint.engine.config import load_config
from fakeprint.engine.predict import load
from fakeprint.engine.training.train import train
from fakeprint.reports.analyze import plot_gallery
from fakeprint.studies.study import dataset_view


def fold_indices(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train_idx, held_idx) per fold, stratified by label; every index is held out exactly once."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if folds < 2:
        raise FakeprintError(f"--folds must be at least 2, got {folds}")
    counts = np.bincount(labels)
    small = [c for c in range(len(counts)) if 0 < counts[c] < folds]
    if small:
        raise FakeprintError(f"{folds} folds need at least {folds} images of every class; class(es) "
                             f"{', '.join(map(str, small))} have fewer")
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(labels)), labels))


def rank_label_issues(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Indices of likely label issues, most likely first (cleanlab, ranked by self-confidence)."""
    from cleanlab.filter import find_label_issues

    return np.asarray(find_label_issues(labels=np.asarray(labels), pred_probs=np.asarray(probs),
                                        return_indices_ranked_by="self_confidence", n_jobs=1), dtype=np.int64)


def find_issues(data: str | Path, out: str | Path, folds: int = 5, config: str | None = "demo",
                overrides: list[str] | dict | None = None, seed: int = 0, top: int = 24,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train ``folds`` models, collect out-of-fold probabilities and rank likely mislabelled images."""

    log = log or (lambda s: print(s, file=sys.stderr))
    data, out = Path(data), Path(out)
    if not (data / "train.csv").is_file():
        raise FakeprintError(f"{data / 'train.csv'}: file not found (label-issues searches train.csv)")
    cfg = load_config(config, overrides)
    if cfg["scheduler"] == "plateau" or int(cfg["early_stop"]):
        # the fold's held-out images are its validation split: they must not steer its training
        raise FakeprintError("label-issues: a plateau scheduler or early stopping would be steered by the held-out "
                             "fold's labels; use a fixed schedule (--set scheduler=warmup_linear --set early_stop=0)")
    full = load_split(data, "train", cache_dir=cfg["cache_dir"], workers=cfg["workers"], progress=cfg["progress"])
    labels = full.labels
    splits = fold_indices(labels, folds, seed)
    probs = np.full((len(full), NUM_CLASSES), np.nan, dtype=np.float64)
    log(f"label-issues: {folds} folds over {len(full)} images of {data / 'train.csv'} = {folds} training runs; "
        f"results in {out}")
    for f, (tr, held) in enumerate(splits):
        fold_dir = out / "folds" / str(f)
        run_dir = fold_dir / "run"
        view = dataset_view(fold_dir / "data", data, {
            "train": ([full.ids[i] for i in tr], labels[tr].tolist(), "train"),
            "validation": ([full.ids[i] for i in held], labels[held].tolist(), "train"),
        })
        fold_cfg = dict(cfg) | {"cache_dir": str(fold_dir / "cache")}
        if not (run_dir / "last.safetensors").is_file() or not (run_dir / "summary.json").is_file():
            log(f"[{f + 1}/{folds}] training on {len(tr)} images, holding out {len(held)} -> {run_dir}")
            train(view, fold_cfg, run_dir, resume=(run_dir / "metrics.csv").is_file())
        shutil.rmtree(fold_dir / "cache", ignore_errors=True)  # a decoded copy of the fold; the originals remain
        probs[held] = load(run_dir / "last").predict(full.images[held]).probs
    if np.isnan(probs).any():
        raise FakeprintError("internal error: some images got no out-of-fold prediction")

    ranked = rank_label_issues(labels, probs)
    self_conf = probs[np.arange(len(labels)), labels]
    suggested = probs.argmax(1)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "label_issues.csv", ["image_id", "given_label", "suggested_label", "self_confidence", "rank"],
              ([full.ids[i], int(labels[i]), int(suggested[i]), f"{self_conf[i]:.6f}", r + 1]
               for r, i in enumerate(ranked)))
    write_csv(out / "oof_probs.csv", ["image_id", "label", *(f"p{c}" for c in range(probs.shape[1]))],
              ([full.ids[i], int(labels[i]), *(f"{p:.6f}" for p in probs[i])] for i in range(len(labels))))


    shown = ranked[:top]
    plot_gallery(full.images[shown], [f"#{r + 1} {full.ids[i][:12]}\ngiven {labels[i]} -> {suggested[i]} "
                                      f"(p_given {self_conf[i]:.2f})" for r, i in enumerate(shown)],
                 out / "label_issues.png",
                 f"top {len(shown)} of {len(ranked)} label-issue candidates ({folds}-fold out-of-fold, cleanlab)")
    per_class = {str(c): int((labels[ranked] == c).sum()) for c in range(NUM_CLASSES)}

    result = {"data": dataset_identity(data), "images": int(len(labels)), "folds": folds, "seed": seed,
              "config": config, "overrides": overrides or [], "model": cfg["model"],
              "oof_accuracy": float((suggested == labels).mean()), "issues": int(len(ranked)),
              "issues_per_given_label": per_class,
              "top": [{"image_id": full.ids[i], "given_label": int(labels[i]), "suggested_label": int(suggested[i]),
                       "self_confidence": float(self_conf[i])} for i in ranked[:top]]}
    atomic_write(out / "label_issues.json", (json.dumps(result, indent=2) + "\n").encode())
    result["out"] = str(out)
    return result
