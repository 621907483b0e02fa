"""The table of round 8 (``experiments/gpu_round8.py``, two calls of one H200 lease) from its run folders.

    python experiments/round8_table.py --data data/unibuc-deepfake --phase runs/r8 --phase runs/r8b \
        --shared benchmarks/results/shared-errors-round6.csv --reference default \
        --ensemble hybrids_b128=hybrid_b128_s0,hybrid_b128_s1,hybrid_b128_rp00_s0 \
        --out benchmarks/results/recipes-gpu-round8

Each ``--phase`` is the unpacked ``$OUT`` of one call: ``round8.json`` and ``runs/<id>/`` (``last.*``,
``summary.json``, ``metrics.csv``, ``split.csv``). Every run's last checkpoint (the **last epoch**) is scored again
here on the internal split, on the CPU in float32, with the test-time augmentation its metadata names (flip); the
GPU's own figure at the end of training (bf16) is listed beside it. ``--ensemble NAME=A,B,...``: the mean of
those runs' probabilities, fixed before scoring; ``--reference``: checkpoints scored the same way for comparison.
``--shared``: how many of those images (the errors every CNN of rounds 3-6 made) each model gets right.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from feature_probe import summary  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--phase", type=Path, action="append", required=True)
    ap.add_argument("--shared", type=Path)
    ap.add_argument("--reference", nargs="*", default=[], help="checkpoints or shipped names, scored the same way")
    ap.add_argument("--ensemble", action="append", default=[], help="NAME=run,run,...: mean probabilities")
    ap.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .md are written")
    args = ap.parse_args()

    import fakeprint
    from fakeprint.core.versions import git_commit
    from fakeprint.data.cache import load_split

    runs: dict[str, dict[str, Any]] = {}
    for phase in args.phase:
        info = json.loads((phase / "round8.json").read_text())
        for rid, plan in info["runs"].items():
            runs[rid] = {"dir": phase / "runs" / rid, "plan": plan, "probe": info["probe_images_per_s"][rid],
                         "machine": str(info["machine"]), "phase": str(phase)}
    first = next(iter(runs.values()))["dir"]
    subset = {r["image_id"]: r["subset"] for r in csv.DictReader((first / "split.csv").open())}
    data = load_split(args.data, "train", progress=False)
    idx = np.flatnonzero([subset[i] != "train" for i in data.ids])
    images, y = np.asarray(data.images)[idx], np.asarray(data.labels)[idx]
    ids = [data.ids[i] for i in idx]
    shared = None
    if args.shared:
        wanted = {r["image_id"] for r in csv.DictReader(args.shared.open())}
        shared = np.array([i in wanted for i in ids])

    probs: dict[str, np.ndarray] = {}
    rows: dict[str, dict[str, Any]] = {}
    for rid, r in runs.items():
        if (r["dir"] / "split.csv").read_bytes() != (first / "split.csv").read_bytes():
            raise SystemExit(f"{r['dir']}: a different internal split from {first}")
        clf = fakeprint.load(r["dir"] / "last.safetensors")
        probs[rid] = clf.predict(images).probs
        last = json.loads((r["dir"] / "last.json").read_text())
        run_summary = json.loads((r["dir"] / "summary.json").read_text())
        with open(r["dir"] / "metrics.csv", newline="") as f:
            curve = list(csv.DictReader(f))
        cfg = last["config"]
        rows[rid] = {
            **summary(probs[rid], y, shared), "tta": clf.tta, "model": last["model"],
            "parameters": last["parameters"], "preset": r["plan"]["preset"], "overrides": r["plan"]["overrides"],
            "batch_size": cfg["batch_size"], "rotation": cfg["rotation"], "rotation_prob": cfg.get("rotation_prob", 1.0),
            "epochs": run_summary["epochs_run"], "train_minutes": round(run_summary["train_time_s"] / 60, 2),
            "train_acc_last_epoch_augmented": float(curve[-1]["train_acc"]),
            "gpu_accuracy_last_epoch": last["held_out"]["accuracy"], "probe_images_per_s": round(r["probe"]),
        }
        print(rid, {k: rows[rid][k] for k in ("accuracy", "class4_recall", "gpu_accuracy_last_epoch")}, flush=True)
    for name in args.reference:
        clf = fakeprint.load(name)
        probs[name] = clf.predict(images).probs
        rows[name] = {**summary(probs[name], y, shared), "tta": clf.tta, "model": clf.name, "reference": True}
        print(name, rows[name], flush=True)
    ensembles = {}
    for spec in args.ensemble:
        name, _, members = spec.partition("=")
        members_list = members.split(",")
        unknown = [m for m in members_list if m not in probs]
        if unknown:
            raise SystemExit(f"--ensemble {name}: unknown members {', '.join(unknown)}")
        ensembles[name] = {**summary(np.mean([probs[m] for m in members_list], 0), y, shared), "members": members_list}
        print(name, ensembles[name], flush=True)

    report = {"what": "round 8: the hybrid and the statistics MLP (experiments/gpu_round8.py), last epoch, internal split",
              "split": f"internal split ({len(y)} images, the runs' split.csv), scored on the CPU in float32",
              "machine": next(iter(runs.values()))["machine"], "commit": git_commit(),
              "shared_errors": None if shared is None else {"file": str(args.shared), "n": int(shared.sum())},
              "runs": rows, "ensembles": ensembles}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    n_sh = "" if shared is None else f" (of {int(shared.sum())})"
    lines = ["# Round 8: the hybrid and the statistics MLP (one H200 lease, two calls)", "",
             f"Internal split ({len(y)} images), **last epoch**, each model's own TTA (flip), scored on the CPU in "
             "float32; *GPU*: the same checkpoint scored at the end of training (bf16). Nothing selected on the split.",
             "", "| run | model | batch | rotated | epochs | GPU-min | train acc. | accuracy | GPU | class-4 recall | "
             f"right on the shared errors{n_sh} |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rid, r in rows.items():
        if r.get("reference"):
            continue
        rot = f"{r['rotation_prob']:.0%}" if r["rotation"] else "none"
        lines.append(f"| `{rid}` | {r['model']} | {r['batch_size']} | {rot} | {r['epochs']} | {r['train_minutes']:.1f} | "
                     f"{100 * r['train_acc_last_epoch_augmented']:.1f}% | **{100 * r['accuracy']:.2f}%** | "
                     f"{100 * r['gpu_accuracy_last_epoch']:.2f}% | {r['class4_recall']:.3f} | "
                     f"{r.get('right_on_shared_errors', '')} |")
    for name, r in rows.items():
        if r.get("reference"):
            lines.append(f"| `{name}` (reference, shipped) | {r['model']} | | | | | | {100 * r['accuracy']:.2f}% | | "
                         f"{r['class4_recall']:.3f} | {r.get('right_on_shared_errors', '')} |")
    for name, r in ensembles.items():
        lines.append(f"| ensemble `{name}`: {', '.join(r['members'])} | | | | | | | {100 * r['accuracy']:.2f}% | | "
                     f"{r['class4_recall']:.3f} | {r.get('right_on_shared_errors', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
