"""The robustness suite: a model (or an ensemble) scored on a labelled split after each named perturbation of the
image files (``features.perturb``), read back through fakeprint's own decode path.

For every perturbation: accuracy, class-4 recall, macro F1, the share of answers flagged ``uncertain`` (all, the
wrong ones, the right ones; None for a model without calibration), the expected calibration error of the top
probability, and the mean top probability of the wrong answers. Written as ``robustness.md``, ``robustness.json``
and ``robustness.png`` (accuracy against strength, one line per family). Each image's perturbation is seeded by
the suite's seed, the spec and the image's position, so a rerun perturbs every image the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fakeprint.core.io import atomic_write
from fakeprint.core.metrics import ece
from fakeprint.core.versions import git_commit, versions
from fakeprint.data.dataset import portable_path
from fakeprint.engine.evaluate import load_scored
from fakeprint.features.perturb import perturbed_images, strength, suite
from fakeprint.models.checkpoint import results_dir
from fakeprint.studies.common import scores
from fakeprint.studies.recipes import machine


def score(labels: np.ndarray, pred) -> dict[str, Any]:
    """What the table shows of one perturbation's predictions."""
    s = scores(labels, pred.labels)
    wrong = pred.labels != labels
    flags = None if pred.uncertain is None else np.asarray(pred.uncertain, bool)
    top = pred.probs.max(1)
    return {"accuracy": s["accuracy"], "class4_recall": s["class4_recall"], "macro_f1": s["macro_f1"],
            "recall": s["recall"], "n": s["n"],
            "uncertain": None if flags is None else float(flags.mean()),
            "uncertain_on_wrong": None if flags is None or not wrong.any() else float(flags[wrong].mean()),
            "uncertain_on_right": None if flags is None or wrong.all() else float(flags[~wrong].mean()),
            "ece": float(ece(pred.probs.astype(np.float64), labels)),
            "mean_top_probability_wrong": float(top[wrong].mean()) if wrong.any() else None}


def run_robustness(checkpoints: list[str], data: str | Path, split: str = "internal", specs: str = "default",
                   out: str | Path | None = None, seed: int = 0, tta: str | None = None, device: str = "cpu",
                   progress: bool = True) -> dict[str, Any]:
    """Score ``checkpoints`` (several: their ensemble) on ``split`` of ``data`` under every perturbation of
    ``specs`` (a suite name or specs separated by ``;``); writes the report into ``out`` and returns it."""
    specs_list = suite(specs)
    clf, ds = load_scored(checkpoints, data, split, device, progress)
    out = Path(out) if out else results_dir(checkpoints, f"robustness-{split}")
    rows, t0 = [], time.perf_counter()
    for spec in tqdm(specs_list, desc="perturbations", unit="spec", disable=not progress, dynamic_ncols=True):
        images = perturbed_images(ds.images, spec, seed)
        family, value = strength(spec)
        rows.append({"spec": spec, "family": family, "strength": value} | score(ds.labels, clf.predict(images,
                                                                                                     tta=tta)))
    report = {"model": clf.name, "checkpoints": [portable_path(p) for p in checkpoints], "split": ds.name,
              "split_note": _split_note(ds.name), "n": int(len(ds.labels)), "tta": tta or getattr(clf, "tta", "none"),
              "epoch": "each checkpoint's own (a run folder: its last epoch)", "seed": seed,
              "calibrated": rows[0]["uncertain"] is not None, "seconds": time.perf_counter() - t0,
              "machine": machine(), "commit": git_commit(), "versions": versions(), "results": rows}
    write_report(out, report)
    return report | {"out": str(out)}


def _split_note(name: str) -> str:
    return ("internal split: the run's held-out part of train.csv (split.csv), never trained on"
            if name == "internal" else f"the dataset's {name} split")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def robustness_markdown(r: dict[str, Any]) -> str:
    clean = next((x for x in r["results"] if x["spec"] == "none"), None)
    lines = [f"# Robustness of {r['model']}", "",
             f"{r['n']} images of the {r['split_note']}; epoch: {r['epoch']}; TTA {r['tta']}; each file re-encoded "
             f"with a real encoder and read back through fakeprint's decode path (seed {r['seed']}).", "",
             "| perturbation | accuracy | vs clean | class-4 recall | uncertain | uncertain on wrong | "
             "uncertain on right | ECE | top prob. of wrong |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for x in r["results"]:
        delta = "" if clean is None else f"{(x['accuracy'] - clean['accuracy']) * 100:+.1f}"
        wrong_p = "-" if x["mean_top_probability_wrong"] is None else f"{x['mean_top_probability_wrong']:.2f}"
        lines.append(f"| `{x['spec']}` | {_pct(x['accuracy'])} | {delta} | {x['class4_recall']:.3f} | "
                     f"{_pct(x['uncertain'])} | {_pct(x['uncertain_on_wrong'])} | {_pct(x['uncertain_on_right'])} | "
                     f"{x['ece']:.3f} | {wrong_p} |")
    worst = min(r["results"], key=lambda x: x["accuracy"])
    lines += ["", f"Worst: `{worst['spec']}` at {_pct(worst['accuracy'])}. Commit {r['commit']}.", ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write(out / "robustness.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out / "robustness.md", robustness_markdown(report).encode())
    plot_robustness(report, out / "robustness.png")


def plot_robustness(report: dict[str, Any], path: Path) -> None:
    """Accuracy against strength, one line per family of one-step perturbations; chains as points at the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families: dict[str, list[tuple[float, float]]] = {}
    for x in report["results"]:
        if x["family"] not in ("none", "chain"):
            families.setdefault(x["family"], []).append((x["strength"], x["accuracy"]))
    n = max(1, len(families))
    cols = min(4, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.2 * cols, 2.6 * ((n + cols - 1) // cols)),
                             dpi=110, squeeze=False)
    clean = next((x["accuracy"] for x in report["results"] if x["spec"] == "none"), None)
    for ax, (family, pts) in zip(axes.flat, sorted(families.items()), strict=False):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] * 100 for p in pts], "o-")
        if clean is not None:
            ax.axhline(clean * 100, color="grey", lw=0.8, ls="--")
        ax.set_title(family, fontsize=9)
        ax.set_ylabel("accuracy %", fontsize=8)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    fig.suptitle(f"{report['model']} on the {report['split']} split (dashed: clean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
