"""A study's outputs: ``study.md`` (the table), ``study.json``, ``accuracy.png`` and ``curves.png``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fakeprint.core.io import atomic_write
from fakeprint.data.dataset import dataset_identity
from fakeprint.studies.grids import Grid


def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def summarise_study(name: str, scale: str, data: Path, grid: Grid, results: dict[str, list[dict]], seeds: int,
               wall: float, extra: dict | None) -> dict[str, Any]:
    variants = []
    for v in grid.variants:
        runs = results[v.id]
        agg = {k: dict(zip(("mean", "std"), _stats([r[k] for r in runs]), strict=True))
               for k in ("accuracy", "macro_f1", "class4_recall", "train_time_s")}
        variants.append({"id": v.id, "label": v.label, "kind": v.kind, "preset": v.preset or grid.preset,
                         "overrides": v.overrides, "members": list(v.members), "runs": runs} | agg)
    first = next(r for rs in results.values() for r in rs)

    return {"study": name, "scale": scale, "data": dataset_identity(data), "split": first["split"],
            "n_eval": first["n"], "seeds": seeds, "wall_time_s": wall, "note": grid.note,
            "preset": grid.preset, "base": grid.base,
            "extra_overrides": extra or {}, "variants": variants}


def _fmt(mean: float, std: float, seeds: int, scale: float = 1.0, digits: int = 2) -> str:
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if seeds > 1 else "")


def study_markdown(report: dict[str, Any]) -> str:
    """The study's table and notes as Markdown."""
    seeds = report["seeds"]
    internal = "internal split" in report["split"]
    desc = report["split"].split(": ", 1)[-1]                # "1250 images (10% of train.csv, ...)"
    where = (f"the **internal split** ({desc.replace(' (', ': ', 1).removesuffix(')')})"
             if internal else f"the official validation split ({report['n_eval']} images)")
    reused = report.get("reused_runs", 0)
    again = f" ({reused} of {report['training_runs']} runs reused from an earlier invocation)" if reused else ""
    spread = f"mean ± standard deviation over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [
        f"# Study: {report['study']} ({report['scale']})",
        "",
        f"Evaluated on {where}, at each run's **last epoch** (no epoch is selected on that split)"
        f"{_steering_note(report)}. "
        f"{spread.capitalize()}. Training time: seconds in the training loop, including the members a "
        f"combined variant needs. Whole study: {report['wall_time_s'] / 60:.1f} min{again}.",
        "",
        "| variant | accuracy (%) | macro F1 | class-4 recall | training time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for v in report["variants"]:
        lines.append(f"| {v['label']} | {_fmt(v['accuracy']['mean'], v['accuracy']['std'], seeds, 100)} | "
                     f"{_fmt(v['macro_f1']['mean'], v['macro_f1']['std'], seeds, 1, 4)} | "
                     f"{_fmt(v['class4_recall']['mean'], v['class4_recall']['std'], seeds, 1, 3)} | "
                     f"{_fmt(v['train_time_s']['mean'], v['train_time_s']['std'], seeds, 1, 0)} |")
    base = ", ".join(f"`{k}={_yaml(val)}`" for k, val in report["base"].items()) or "nothing else"
    lines += ["", f"Every run: preset `{report['preset']}` (unless a variant names another), then {base}, "
              "then the variant's own overrides:", ""]
    for v in report["variants"]:
        if v["kind"] == "average":
            what = "mean of the softmax probabilities of " + " and ".join(v["members"])
        else:
            own = [f"preset `{v['preset']}`"] if v["preset"] != report["preset"] else []
            own += [f"`{k}={_yaml(val)}`" for k, val in v["overrides"].items()]
            what = ", ".join(own) or "no overrides"
            if v["kind"] == "specialist":
                what += (f"; a class-4-vs-rest model (labels 4 / 0) on {v['members'][0]}'s training part, "
                         "combined: " + "; ".join(r["detail"] for r in v["runs"]))
            elif v["members"]:
                what += "; frozen members: " + " and ".join(v["members"])
        lines.append(f"- **{v['label']}**: {what}")
    if report["note"]:
        lines += ["", f"Note: {report['note']}."]
    return "\n".join(lines) + "\n"


def _steering_note(report: dict[str, Any]) -> str:
    """Say so where runs of the study let the evaluation split steer their training."""
    uses = [v["label"] for v in report["variants"] if v["kind"] != "average" and any(
        r.get("steered") for r in v["runs"])]
    if not uses:
        return ""
    return ("; these runs let that split steer a plateau scheduler or early stopping, so their figures are "
            "optimistic: " + ", ".join(uses))


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    """study.json, study.md, accuracy.png and curves.png in ``out``."""
    atomic_write(out / "study.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out / "study.md", study_markdown(report).encode())
    plot_accuracy(report, out / "accuracy.png")
    plot_study_curves(report, out / "curves.png")


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = report["variants"]
    mean = [v["accuracy"]["mean"] * 100 for v in vs]
    std = [v["accuracy"]["std"] * 100 for v in vs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(vs) + 2), 4), dpi=110)
    ax.bar(range(len(vs)), mean, yerr=std if report["seeds"] > 1 else None, capsize=4, color="tab:blue")
    for i, m in enumerate(mean):
        ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(vs)))
    ax.set_xticklabels([v["label"] for v in vs], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    lo = min(mean) - max(std + [0]) - 5
    ax.set_ylim(max(0.0, lo), min(100.0, max(mean) + max(std + [0]) + 3))
    seeds = f"mean ± std over {report['seeds']} seeds" if report["seeds"] > 1 else "one seed"
    ax.set_title(f"study {report['study']} ({report['scale']}): {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_study_curves(report: dict[str, Any], path: Path) -> None:
    """Validation accuracy and training loss per epoch of every trained run (one colour per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(report["variants"]):
        for j, r in enumerate(v["runs"]):
            if not r.get("run") or not (Path(r["run"]) / "metrics.csv").is_file():
                continue
            with open(Path(r["run"]) / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            ep = [int(x["epoch"]) for x in rows]
            label = (v["label"] + (" (specialist, binary)" if v["kind"] == "specialist" else "")) if j == 0 else None
            style = dict(color=colours[i % len(colours)], alpha=1.0 if j == 0 else 0.45, marker=".")
            a.plot(ep, [float(x["val_acc"]) * 100 for x in rows], label=label, **style)
            b.plot(ep, [float(x["train_loss"]) for x in rows], **style)
    a.set_xlabel("epoch")
    a.set_ylabel("validation accuracy (%)")
    b.set_xlabel("epoch")
    b.set_ylabel("training loss")
    a.legend(fontsize=7)
    fig.suptitle(f"study {report['study']} ({report['scale']}): learning curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
