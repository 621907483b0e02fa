"""Error analysis of a checkpoint on a labelled split: where it fails, what the generators leave behind.

``analyze(checkpoint, data, split, out)`` writes into ``out``:

- ``analysis.md`` / ``analysis.json``: accuracy, per-class precision and recall, the most-confused pairs,
  calibration (expected calibration error), and where each figure is;
- ``mistakes.png``: the worst mistakes (the most confident wrong predictions), each captioned with its
  image id, true and predicted class and the predicted class's probability;
- ``spectra.png``: the mean log-magnitude Fourier spectrum of each class (the generators' fingerprints),
  and below each the difference to the mean over all classes;
- ``calibration.png``: a reliability diagram (accuracy against confidence in ten equal-width bins) with
  the confidence histogram;
- ``confusion_matrix.png``, ``metrics.json``, ``report.md``: the usual evaluation files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.core.metrics import reliability, write_report
from fakeprint.data.dataset import dataset_identity, portable_path
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load, predict_with_progress
from fakeprint.models.checkpoint import output_dir, resolve_checkpoint

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def mean_log_spectrum(images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Mean over images of ``log(1 + |FFT2(gray - mean(gray))|)``, zero frequency in the centre (fftshift).

    ``images``: N x H x W x 3 uint8. Subtracting each image's mean removes the DC peak, so the map shows
    the periodic traces (upsampling grids, checkerboards, gratings) and the noise floor.
    """
    if len(images) == 0:
        raise FakeprintError("no images to compute a spectrum from")
    total = np.zeros(images.shape[1:3], dtype=np.float64)
    for start in range(0, len(images), chunk):
        gray = images[start : start + chunk].astype(np.float32) @ LUMA / 255.0
        gray -= gray.mean(axis=(1, 2), keepdims=True)
        mag = np.abs(np.fft.fft2(gray, axes=(1, 2)))
        total += np.log1p(mag).sum(axis=0)
    return np.fft.fftshift(total / len(images))


def confused_pairs(cm: np.ndarray, top: int = 5) -> list[dict[str, Any]]:
    """Off-diagonal cells of a confusion matrix (rows actual), largest first; ties by (true, predicted)."""
    cm = np.asarray(cm)
    cells = [(int(cm[i, j]), i, j) for i in range(cm.shape[0]) for j in range(cm.shape[1]) if i != j and cm[i, j]]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    support = cm.sum(axis=1)
    return [{"true": i, "predicted": j, "count": n, "share_of_true": n / max(int(support[i]), 1)}
            for n, i, j in cells[:top]]


def plot_gallery(images: np.ndarray, captions: list[str], path: Path, title: str, cols: int = 4) -> None:
    """A grid of images with a caption under each (also used by ``fakeprint label-issues``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, -(-n // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.55 * rows + 0.4), dpi=110, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, cap in zip(axes.ravel(), images, captions, strict=False):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(cap, fontsize=7)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_spectra(spectra: dict[int, np.ndarray], path: Path, title: str) -> None:
    """Top row: each class's mean log spectrum; bottom row: its difference to the mean over classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(spectra)
    overall = np.mean([spectra[c] for c in classes], axis=0)
    diffs = {c: spectra[c] - overall for c in classes}
    lim = max(float(np.abs(d).max()) for d in diffs.values()) or 1.0
    vmin = min(float(s.min()) for s in spectra.values())
    vmax = max(float(s.max()) for s in spectra.values())
    k = len(classes)
    fig, axes = plt.subplots(2, k, figsize=(2.4 * k + 0.8, 5.2), dpi=110, squeeze=False)
    for i, c in enumerate(classes):
        im0 = axes[0, i].imshow(spectra[c], cmap="magma", vmin=vmin, vmax=vmax)
        axes[0, i].set_title(f"class {c}", fontsize=9)
        im1 = axes[1, i].imshow(diffs[c], cmap="coolwarm", vmin=-lim, vmax=lim)
        axes[1, i].set_title(f"class {c} - mean", fontsize=9)
        for a in axes[:, i]:
            a.set_xticks([])
            a.set_yticks([])
    fig.colorbar(im0, ax=list(axes[0]), fraction=0.02, label="log(1 + |F|)")
    fig.colorbar(im1, ax=list(axes[1]), fraction=0.02, label="difference")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_calibration(cal: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(4.6, 5.6), dpi=110, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    rows = cal["bins"]
    mids = [(r["low"] + r["high"]) / 2 for r in rows]
    width = rows[0]["high"] - rows[0]["low"] if rows else 0.1
    a.bar(mids, [r["accuracy"] for r in rows], width=width * 0.95, color="tab:blue", edgecolor="black",
          label="accuracy")
    a.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    a.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="tab:orange", ms=4,
           label="mean confidence")
    a.set_ylabel("accuracy")
    a.set_ylim(0, 1)
    a.legend(fontsize=7, loc="upper left")
    a.set_title(f"{title}\nECE {cal['ece']:.4f}", fontsize=9)
    b.bar(mids, [r["n"] for r in rows], width=width * 0.95, color="grey")
    b.set_xlabel("confidence (top probability)")
    b.set_ylabel("images")
    b.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def analyze(checkpoint: str | Path, data: str | Path, split: str = "internal", out: str | Path | None = None,
            device: str = "cpu", top: int = 16, progress: bool = True) -> dict[str, Any]:
    """Analyse ``checkpoint`` on ``split`` of ``data`` (splits as ``fakeprint evaluate``; ``internal`` is
    the training run's held-out part); writes the analysis folder and returns its numbers."""
    from sklearn.metrics import precision_recall_fscore_support


    weights = resolve_checkpoint(checkpoint)
    out = Path(out) if out else output_dir(weights, f"analysis-{split}")
    clf = load(checkpoint, device)
    ds = load_eval_split(Path(data), split, Path(checkpoint), progress=progress)
    if ds.labels is None:
        raise FakeprintError(f"split {split!r} of {data} has no labels; the analysis needs image_id,label")
    if len(ds) == 0:
        raise FakeprintError(f"split {split!r} of {data} has no images")
    k = len(clf.classes)

    probs = predict_with_progress(clf, ds.images, f"analysing {split}", progress=None if progress else False).probs
    pred = probs.argmax(1)
    labels = ds.labels
    title = f"{clf.name} on the {split} split"
    m = write_report(out, labels, pred, title, {"split": split, "checkpoint": str(weights)}, num_classes=k)
    precision, recall, f1, support = precision_recall_fscore_support(labels, pred, labels=list(range(k)),
                                                                      zero_division=0)
    per_class = [{"class": c, "precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                  "support": int(support[c])} for c in range(k)]
    pairs = confused_pairs(np.asarray(m["confusion_matrix"]))

    confidence = probs.max(1)
    wrong = np.flatnonzero(pred != labels)
    worst = wrong[np.argsort(-confidence[wrong], kind="stable")][:top]
    mistakes = [{"image_id": ds.ids[i], "true": int(labels[i]), "predicted": int(pred[i]),
                 "confidence": float(confidence[i]), "p_true": float(probs[i, labels[i]])} for i in worst]
    plot_gallery(ds.images[worst], [f"{x['image_id'][:12]}\ntrue {x['true']} -> {x['predicted']} ({x['confidence']:.2f})"
                                    for x in mistakes], out / "mistakes.png",
                 f"{title}: the {len(worst)} most confident mistakes of {len(wrong)}")

    present = [c for c in range(k) if (labels == c).any()]
    spectra = {c: mean_log_spectrum(ds.images[labels == c]) for c in present}
    plot_spectra(spectra, out / "spectra.png",
                 f"mean log-magnitude spectrum per class ({split} split, {len(ds)} images; centre = zero frequency)")
    overall = np.mean([spectra[c] for c in present], axis=0)
    spectrum_distance = {str(c): float(np.sqrt(np.mean((spectra[c] - overall) ** 2))) for c in present}

    cal = reliability(confidence, pred == labels)
    plot_calibration(cal, out / "calibration.png", title)


    result = {"checkpoint": portable_path(weights), "data": dataset_identity(data), "split": split, "n": int(len(ds)),
              "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "per_class": per_class,
              "confused_pairs": pairs, "mistakes": mistakes, "n_mistakes": int(len(wrong)),
              "calibration": cal, "spectrum_rms_difference_to_mean": spectrum_distance,
              "confusion_matrix": m["confusion_matrix"]}
    atomic_write(out / "analysis.json", (json.dumps(result, indent=2) + "\n").encode())
    atomic_write(out / "analysis.md", analysis_markdown(result, title).encode())
    result["out"] = str(out)
    return result


def analysis_markdown(r: dict[str, Any], title: str) -> str:
    weakest = min(r["per_class"], key=lambda c: c["recall"])
    lines = [
        f"# Analysis: {title}",
        "",
        f"Checkpoint `{r['checkpoint']}`, {r['n']} images of the {r['split']} split: accuracy "
        f"**{r['accuracy'] * 100:.2f}%**, macro F1 {r['macro_f1']:.4f}, {r['n_mistakes']} mistakes. "
        f"Weakest class: {weakest['class']} (recall {weakest['recall']:.3f}).",
        "",
        "## Per class",
        "",
        "| class | precision | recall | F1 | support | spectrum RMS difference to mean |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in r["per_class"]:
        dist = r["spectrum_rms_difference_to_mean"].get(str(c["class"]))
        lines.append(f"| {c['class']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} | "
                     f"{'' if dist is None else f'{dist:.4f}'} |")
    lines += ["", "## Most-confused pairs (true -> predicted)", ""]
    if r["confused_pairs"]:
        lines += ["| true | predicted | images | share of the true class |", "| --- | --- | ---: | ---: |"]
        lines += [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['share_of_true'] * 100:.1f}% |"
                  for p in r["confused_pairs"]]
    else:
        lines.append("No mistakes.")
    cal = r["calibration"]
    lines += [
        "",
        "## Calibration",
        "",
        f"Expected calibration error (10 equal-width bins of the top probability): **{cal['ece']:.4f}**. "
        "Reliability diagram: `calibration.png`.",
        "",
        "| confidence bin | images | accuracy | mean confidence |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['n']} | {b['accuracy']:.3f} | {b['confidence']:.3f} |"
              for b in cal["bins"]]
    lines += [
        "",
        "## Figures",
        "",
        f"- `mistakes.png`: the {len(r['mistakes'])} most confident mistakes (image id, true -> predicted, "
        "probability of the prediction).",
        "- `spectra.png`: mean log-magnitude Fourier spectrum of each class (grey level, per-image mean "
        "removed, zero frequency in the centre), and each class's difference to the mean over classes: "
        "bright points and lines are periodic generator traces.",
        "- `calibration.png`: reliability diagram and confidence histogram.",
        "- `confusion_matrix.png`, `report.md`, `metrics.json`: the evaluation.",
        "",
    ]
    return "\n".join(lines)
