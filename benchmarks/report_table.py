"""The report's table, our rows: each run's internal-split accuracy at the epoch the report's procedure picks and
at the last epoch, with confusion matrices and classification reports (issue 14).

Each run folder is a finished ``fakeprint train`` run of a report preset (``best`` and ``last`` checkpoints,
``metrics.csv``, ``summary.json``, ``run.json``, ``split.csv``). Both checkpoints are evaluated here with the
preset's own test-time augmentation (none: the report used none), on the internal split of the run.

    python benchmarks/report_table.py --data data/unibuc-deepfake --out benchmarks/results/report_table-gpu \\
        threecnn=runs/r3a/runs/threecnn threecnn_dilated=runs/r3a/runs/threecnn_dilated ...

prints the JSON and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

REPORT = {"threecnn": 0.8978, "threecnn_dilated": 0.9303}  # the report's validation accuracy (selected on it)


def row(name: str, run: Path, data: Path) -> dict[str, Any]:
    from fakeprint.core.metrics import from_confusion, report_text, summary
    from fakeprint.data.dataset import dataset_identity, portable_path
    from fakeprint.engine.evaluate import load_eval_split
    from fakeprint.engine.predict import load

    with open(run / "metrics.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    ran = json.loads((run / "summary.json").read_text())
    info = json.loads((run / "run.json").read_text())
    cfg = json.loads((run / "last.json").read_text())["config"]
    held = load_eval_split(data, "internal", run / "last.safetensors", progress=False)
    out: dict[str, Any] = {
        "run": name, "preset": cfg["model"], "folder": portable_path(run), "data": dataset_identity(data),
        "split": ran["split"], "n": int(len(held.labels)), "device": info["device"],
        "train_images": info["train_images"], "epochs_run": ran["epochs_run"],
        "stopped_by": ran.get("stopped_by"), "wall_time_min": ran["train_time_s"] / 60.0,
        "images_per_s": sum(float(h["train_images_per_s"]) for h in hist) / len(hist),
        "resumed": info.get("resumes"), "tta": cfg.get("tta", "none"),
        "steered_by": "selection split" if float(cfg.get("selection_fraction") or 0) > 0 else "the internal split itself",
        "report_accuracy": REPORT.get(name),
    }
    for which in ("best", "last"):
        clf = load(run / f"{which}.safetensors")
        meta = json.loads((run / f"{which}.json").read_text())
        pred = clf.predict(held.images).labels  # the checkpoint's own test-time augmentation
        m = summary(held.labels, pred)
        out[which] = {"epoch": meta["epoch"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                      "recall": from_confusion(m["confusion_matrix"])["recall"],
                      "confusion_matrix": m["confusion_matrix"],
                      "classification_report": report_text(held.labels, pred)}
    return out


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [f"# The report's ThreeCNN rows, trained with the presets as they are ({machine})", "",
             "Internal split (1,250 images of train.csv, stratified, split_seed 0, never trained on). **best**: the epoch "
             "the report's procedure keeps (highest accuracy on the split that steers the plateau scheduler and early "
             "stopping); for the presets as they are that is the internal split itself, so the best-epoch figure is "
             "optimistic, like the report's own. **last**: the epoch training ended at (no selection). No test-time "
             "augmentation (the presets', as the report).", "",
             "| run | steered by | epochs (stopped by) | minutes | images/s | best epoch | accuracy at best | last-epoch accuracy | "
             "class-4 recall (last) | report |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rep = f"{r['report_accuracy'] * 100:.2f}%" if r["report_accuracy"] else "-"
        lines.append(f"| {r['run']} | {r['steered_by']} | {r['epochs_run']} ({r['stopped_by']}) | {r['wall_time_min']:.1f} | "
                     f"{r['images_per_s']:.0f} | {r['best']['epoch']} | {r['best']['accuracy'] * 100:.2f}% | "
                     f"**{r['last']['accuracy'] * 100:.2f}%** | {r['last']['recall'][4]:.3f} | {rep} |")
    for r in rows:
        for which in ("best", "last"):
            e = r[which]
            cm = "\n".join("    " + " ".join(f"{v:4d}" for v in line) for line in e["confusion_matrix"])
            lines += ["", f"## {r['run']}, {which} epoch ({e['epoch']}): {e['accuracy'] * 100:.2f}%", "",
                      "Confusion matrix (rows actual, columns predicted):", "", cm, "", "```",
                      e["classification_report"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("runs", nargs="+", help="NAME=RUN_FOLDER")
    args = ap.parse_args()
    from fakeprint.core.versions import git_commit, versions

    rows = []
    for spec in args.runs:
        name, _, folder = spec.partition("=")
        rows.append(row(name, Path(folder), args.data))
    machine = rows[0]["device"]
    result = {"benchmark": "report_table", "commit": git_commit(), "versions": versions(),
              "evaluated_on": "cpu", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, machine))
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
