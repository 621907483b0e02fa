"""Reproduce the reference report's table: ThreeCNN, dilated ThreeCNN, SkipConCNN and EnsembleCNN trained
with the report's presets on the real data, each evaluated on the internal split (1,250 images, seeded,
stratified), with wall time. Writes ``report_table-<device>.json`` and ``.md`` and prints the JSON.

    python benchmarks/reproduce_report.py --data data/unibuc-deepfake --device cuda --out-dir runs/report
    python benchmarks/reproduce_report.py --data DIR --scale smoke        # minutes on a CPU: 1 epoch each

The report's own figures (selected on its validation split): SkipConCNN 92.64%, ThreeCNN 89.78%,
dilated ThreeCNN 93.03%, EnsembleCNN 93.44%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, environment, pick  # noqa: E402
from fakeprint.engine.config import load_config  # noqa: E402
from fakeprint.engine.evaluate import evaluate, load_eval_split  # noqa: E402
from fakeprint.engine.predict import load  # noqa: E402
from fakeprint.engine.training.train import train  # noqa: E402

REPORT = {"threecnn": 0.8978, "threecnn_dilated": 0.9303, "skipconcnn": 0.9264, "ensemblecnn": 0.9344}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out-dir", default="runs/report")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--scale", choices=("full", "smoke"), default="full")
    ap.add_argument("--results", default="benchmarks/results", help="folder for report_table-<device>.json/.md")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every training")
    args = ap.parse_args()
    out = Path(args.out_dir)
    extra = [*args.set, f"device={args.device}", "progress=false", "val_fraction=0.1", "split_seed=0"]
    if args.scale == "smoke":
        extra += ["epochs=1", "max_train_images=500"]
    rows = {}
    for preset in ("threecnn", "threecnn_dilated", "skipconcnn", "ensemblecnn"):
        overrides = list(extra)
        if preset == "ensemblecnn":
            overrides.append(f"base_checkpoints=[{out / 'skipconcnn'},{out / 'threecnn'}]")
        cfg = load_config(preset, overrides)
        t0 = time.perf_counter()
        summary = train(args.data, cfg, out / preset)
        wall = time.perf_counter() - t0
        clf = load(out / preset, device=str(pick(args.device)))
        m = evaluate(clf, load_eval_split(Path(args.data), "internal", out / preset), out / preset / "eval-internal")
        rows[preset] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "class4_recall": m["per_class"]["4"]["recall"], "confusion_matrix": m["confusion_matrix"],
                        "per_class": m["per_class"], "epochs_run": summary["epochs_run"], "train_time_s": wall,
                        "report_accuracy": REPORT[preset], "report_text": m["text"]}
    env = environment(pick(args.device))
    n_eval = sum(sum(row) for row in next(iter(rows.values()))["confusion_matrix"])
    split = f"internal split ({n_eval:,} images of train.csv, stratified, seed 0)"
    result = {"benchmark": "reproduce_report", "scale": args.scale, "split": split,
              "environment": env, "models": rows}
    device_tag = "cpu" if "cpu" in str(env.get("device", "cpu")).lower() else str(env["device"]).replace(" ", "-")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = f"report_table-{args.scale}-{device_tag}"
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# The report's table, reproduced ({args.scale} scale, {env.get('device')})", "",
             f"Accuracy on the {split}; the report's figures were selected on its validation split.", "",
             "| model | accuracy | report | macro F1 | class-4 recall | epochs | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['accuracy'] * 100:.2f}% | {r['report_accuracy'] * 100:.2f}% | {r['macro_f1']:.4f} | "
                     f"{r['class4_recall']:.3f} | {r['epochs_run']} | {r['train_time_s']:.0f} s |")
    for k, r in rows.items():
        lines += ["", f"## {k}", "", "```", r["report_text"].rstrip(), "```"]
    (results / f"{name}.md").write_text("\n".join(lines) + "\n")
    emit(result, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
