"""The one owner of ``split.csv``: which images of train.csv a run trained on, held out, or selected with.

``split.csv`` is ``image_id,label,subset`` (subset ``train``, ``internal`` or ``selection``), written with the csv
module so that ids with commas or quotes stay one field; a checkpoint without its run folder (a shipped model)
records the digest of its internal split's ids instead.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np

from fakeprint.core.csvio import write_csv


def write_split_csv(path: Path, ids: list[str], labels: np.ndarray, train_idx, internal_idx, selection_idx=()) -> None:
    """``split.csv`` (``image_id,label,subset``; subset ``train``, ``internal`` or ``selection``), written with
    the csv module (ids with commas or quotes stay one field). ``evaluate.load_eval_split`` reads it back."""
    write_csv(path, ["image_id", "label", "subset"],
              [*([ids[i], int(labels[i]), "train"] for i in train_idx),
               *([ids[i], int(labels[i]), "internal"] for i in internal_idx),
               *([ids[i], int(labels[i]), "selection"] for i in selection_idx)])


def read_split_csv(path: Path) -> dict[str, tuple[list[str], list[int]]]:
    """``split.csv`` read back: subset (``train``, ``internal``, ``selection``) -> (ids, labels), in file order.
    The one reader of what ``write_split_csv`` wrote (evaluate, the studies, the recipe study)."""
    out: dict[str, tuple[list[str], list[int]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ids, labels = out.setdefault(r.get("subset") or "", ([], []))
            ids.append(r["image_id"])
            labels.append(int(r["label"]))
    return out


def internal_ids_digest(ids: list[str] | set[str]) -> str:
    """SHA-256 of the sorted image ids of an internal split: what a checkpoint records (``held_out``) to find
    its split again without its run folder."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()
