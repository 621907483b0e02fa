"""Metrics and reports: accuracy, the confusion matrix (rows actual, columns predicted), scikit-learn's
classification report, written as ``metrics.json``, ``report.md`` and ``confusion_matrix.png``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix, f1_score

from fakeprint.core.io import atomic_write


def summary(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = 5) -> dict:
    labels = list(range(num_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    rep = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    return {
        "accuracy": float((np.asarray(y_true) == np.asarray(y_pred)).mean()) if len(y_true) else 0.0,
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(len(y_true)),
        "per_class": {
            str(c): {k: float(rep[str(c)][k]) for k in ("precision", "recall", "f1-score")} | {"support": int(rep[str(c)]["support"])}
            for c in labels
        },
        "confusion_matrix": cm.tolist(),
    }


def from_confusion(cm: np.ndarray | list[list[int]]) -> dict:
    """Accuracy, per-class recall and precision, and macro F1 from a confusion matrix (rows actual): the one
    place these are derived from counts (``summary`` derives the same from label pairs via scikit-learn)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    recall = cm.diagonal() / np.maximum(cm.sum(1), 1)
    precision = cm.diagonal() / np.maximum(cm.sum(0), 1)
    f1 = np.where(recall + precision > 0, 2 * recall * precision / np.maximum(recall + precision, 1e-12), 0.0)
    return {"accuracy": float(cm.diagonal().sum() / max(n, 1)), "recall": recall.tolist(),
            "precision": precision.tolist(), "macro_f1": float(f1.mean()), "n": int(n)}


def report_text(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = 5, digits: int = 4) -> str:
    return classification_report(y_true, y_pred, labels=list(range(num_classes)), digits=digits, zero_division=0)


def confusion_text(cm: list[list[int]]) -> str:
    k = len(cm)
    width = max(6, max(len(str(v)) for row in cm for v in row) + 1)
    head = "actual \\ predicted".ljust(19) + "".join(str(c).rjust(width) for c in range(k))
    rows = [f"{c}".ljust(19) + "".join(str(v).rjust(width) for v in cm[c]) for c in range(k)]
    return "\n".join([head, *rows])


def plot_confusion(cm: list[list[int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=120)
    im = ax.imshow(a, cmap="Blues")
    k = a.shape[0]
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(a[i, j]), ha="center", va="center",
                    color="white" if a[i, j] > a.max() / 2 else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(out_dir: Path, y_true: np.ndarray, y_pred: np.ndarray, title: str, extra: dict | None = None,
                 num_classes: int = 5) -> dict:
    """Write metrics.json, report.md and confusion_matrix.png into ``out_dir``; returns the metrics."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = summary(y_true, y_pred, num_classes) | (extra or {})
    text = report_text(y_true, y_pred, num_classes)
    atomic_write(out_dir / "metrics.json", (json.dumps(m, indent=2) + "\n").encode())
    md = [
        f"# {title}",
        "",
        f"Accuracy: **{m['accuracy'] * 100:.2f}%** on {m['n']} images; macro F1 {m['macro_f1']:.4f}.",
        "",
        "## Confusion matrix (rows actual, columns predicted)",
        "",
        "```",
        confusion_text(m["confusion_matrix"]),
        "```",
        "",
        "## Classification report",
        "",
        "```",
        text.rstrip(),
        "```",
        "",
    ]
    atomic_write(out_dir / "report.md", "\n".join(md).encode())
    plot_confusion(m["confusion_matrix"], out_dir / "confusion_matrix.png", title)
    return m


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a logits array (the one used by calibration and by every prediction)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the top label in ``bins`` equal-width confidence bins."""

    return reliability(probs.max(1), probs.argmax(1) == labels, bins)["ece"]


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Top-label calibration in ``bins`` equal-width confidence bins (empty bins are left out).

    ``ece = sum_b (n_b / N) |accuracy_b - confidence_b|``.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        if n == 0:
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += n / len(confidence) * abs(acc - conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n, "accuracy": acc, "confidence": conf})
    return {"ece": float(ece), "bins": rows}
