"""The table of round 6 (``experiments/gpu_round6.py``, two calls of one H200 lease) from its run folders.

    python experiments/round6_table.py --phase runs/r6 --phase runs/r6b [--ensemble runs/r6/ens6] \
        --out benchmarks/results/recipes-gpu-round6

Each ``--phase`` is the unpacked ``$OUT`` of one call: ``round6.json`` and ``runs/<id>/`` (``last.json``,
``summary.json``, ``metrics.csv``). Every figure is the run's **last epoch** on the internal split with its own
test-time augmentation (flip), as measured on the GPU at the end of training (bf16); where ``recipe-eval.json``
exists beside a run (``recipes.evaluate_last``, on the CPU in fp32), its flip figure is added. ``--ensemble``:
a ``fakeprint evaluate`` output folder (``metrics.json``) of a fixed ensemble, added as one row.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any


def row(run: Path, plan: dict[str, Any], ips: float) -> dict[str, Any]:
    last = json.loads((run / "last.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "metrics.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    held = last["held_out"]
    over = plan["overrides"]
    out = {
        "run": run.name, "model_args": over.get("model_args", {"width": 64, "c3": 256}),
        "distilled": bool(over.get("distill_from")), "seed": over.get("seed", 0),
        "parameters": last["parameters"], "epochs": summary["epochs_run"],
        "train_minutes": summary["train_time_s"] / 60, "probe_images_per_s": ips,
        "train_acc_last_epoch_augmented": float(curve[-1]["train_acc"]),
        "accuracy": held["accuracy"], "class4_recall": held["recall"][4], "macro_f1": held["macro_f1"],
        "tta": held["tta"], "selection": held["selection"], "split": held["split"],
    }
    cpu = run / "recipe-eval.json"
    if cpu.is_file():
        out["accuracy_cpu_fp32_flip"] = json.loads(cpu.read_text())["tta"]["flip"]["accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", type=Path, action="append", required=True)
    ap.add_argument("--ensemble", type=Path, action="append", default=[])
    ap.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .md are written")
    ap.add_argument("--note", default="", help="a closing paragraph (e.g. which code each call ran)")
    args = ap.parse_args()

    rows, calls = [], []
    for phase in args.phase:
        info = json.loads((phase / "round6.json").read_text())
        calls.append({k: info[k] for k in ("machine", "commit", "versions", "minutes", "probe_images_per_s",
                                           "status", "wall_time_s") if k in info})
        for rid, plan in info["runs"].items():
            rows.append(row(phase / "runs" / rid, plan, info["probe_images_per_s"][rid]))
    ensembles = []
    for e in args.ensemble:
        m = json.loads((e / "metrics.json").read_text())
        ensembles.append({"folder": str(e), "accuracy": m["accuracy"], "class4_recall": m["per_class"]["4"]["recall"],
                          "macro_f1": m["macro_f1"], "members": m.get("checkpoint")})
    report = {"campaign": "issue 10, round 6: distilled CPU-fast students and more teachers (H200)",
              "calls": calls, "rows": rows, "ensembles": ensembles, "note": args.note}
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    lines = ["# Issue 10, round 6: distilled CPU-fast students and more teachers (one H200 lease)", "",
             "Internal split (1,250 images of train.csv, stratified, split_seed 0, never trained on), **last epoch**,",
             "flip TTA, measured on the GPU at the end of training (bf16; `cpu fp32`: the same checkpoint re-measured on",
             "the CPU). Teachers of the distilled runs: the three round-3 `threecnn_dilated_fast` runs (weight 0.7, T 2).",
             "Every run: the `threecnn_dilated_fast` recipe; widths as given (c3 = 4 x width).", "",
             "| run | width | distilled | seed | parameters | epochs | GPU minutes | accuracy (flip) | cpu fp32 | class-4 recall |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cpu = f"{100 * r['accuracy_cpu_fp32_flip']:.2f}%" if "accuracy_cpu_fp32_flip" in r else ""
        lines.append(f"| {r['run']} | {r['model_args']['width']} | {'yes' if r['distilled'] else 'no'} | {r['seed']} | "
                     f"{r['parameters']:,} | {r['epochs']} | {r['train_minutes']:.1f} | {100 * r['accuracy']:.2f}% | "
                     f"{cpu} | {r['class4_recall']:.3f} |")
    for e in ensembles:
        lines += ["", f"Fixed ensemble `{e['folder']}`: {100 * e['accuracy']:.2f}%, class-4 recall "
                  f"{e['class4_recall']:.3f}, macro F1 {e['macro_f1']:.4f}."]
    for i, c in enumerate(calls):
        lines += ["", f"Call {i + 1}: {c['machine']}, {len(c['status'])} runs side by side, max_minutes {c['minutes']}, "
                  f"wall {c['wall_time_s']:.0f} s, commit {c['commit']}."]
    if args.note:
        lines += ["", args.note]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
