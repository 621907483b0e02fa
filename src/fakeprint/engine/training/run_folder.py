"""What a run folder holds besides checkpoints: ``metrics.csv`` (the one reader and writer), the resume
point, the held-out figure a checkpoint may claim, ``curves.png``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.models.checkpoint import (
    load_checkpoint,
    load_resume_state,
    save_checkpoint,
    save_resume_state,
)

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
                  "val_recall_weakest", "selection_acc", "epoch_time_s", "train_images_per_s"]


def save_resume_point(out: Path, epoch: int, model: nn.Module, meta: dict, state: dict[str, Any]) -> None:
    """Everything needed to continue after ``epoch``, made current by one atomic rename.

    Weights (safetensors) and optimizer/scheduler state (torch, read back with ``weights_only=True``) go
    into a fresh folder ``.resume-<epoch>``; then ``resume.json`` is atomically pointed at it and older
    folders are removed. A kill at any moment leaves ``resume.json`` naming a complete folder.
    """
    folder = out / f".resume-{epoch + 1:04d}"
    folder.mkdir(exist_ok=True)
    save_checkpoint(folder / "model", model, meta | {"epoch": epoch + 1})
    save_resume_state(folder / "state.pt", state)
    atomic_write(out / "resume.json", (json.dumps({"epoch": epoch + 1, "folder": folder.name}) + "\n").encode())
    for old in out.glob(".resume-*"):
        if old.name != folder.name:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def load_resume_point(out: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        pointer = json.loads((out / "resume.json").read_text())
        folder = out / str(pointer["folder"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FakeprintError(f"{out / 'resume.json'}: unreadable resume pointer ({e})") from None
    if folder.parent != out or not folder.name.startswith(".resume-"):
        raise FakeprintError(f"{out / 'resume.json'}: resume folder {folder.name!r} is not inside the run")
    weights, _ = load_checkpoint(folder / "model.safetensors")
    return weights, load_resume_state(folder / "state.pt")


def held_out_figure(ev: dict[str, Any], split: str, tta: str, epoch: int, selection: str) -> dict[str, Any]:
    """What a checkpoint may claim: its accuracy on images it was not trained on, and how it was measured."""
    return {"accuracy": ev["val_acc"], "macro_f1": ev["val_macro_f1"],
            "recall": [float(r) for r in ev["val_recall"]], "n": int(np.asarray(ev["confusion_matrix"]).sum()),
            "split": split, "epoch": epoch, "selection": selection, "tta": tta,
            "how": "this model, on images it never trained on"}


def write_history(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:  # a missing figure (no held-out split) is an empty field
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue().encode())


def read_history(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "epoch" else float(v) if v != "" else None) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def plot_training_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch of one run (training, and the held-out split where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.plot(ep, [r["train_loss"] for r in history], label="train")
    if history[0]["val_loss"] is not None:
        a.plot(ep, [r["val_loss"] for r in history], label="held out")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["train_acc"] for r in history], label="train (augmented batches)")
    if history[0]["val_acc"] is not None:
        b.plot(ep, [r["val_acc"] for r in history], label="held out")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
