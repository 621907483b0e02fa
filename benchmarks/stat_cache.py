"""Training time of a statistics-only preset with its statistics computed every epoch (``stat_cache=off``) and
computed once (``stat_cache=on``, ``fakeprint.engine.training.statcache``): the same recipe, seed and images, one run each, with
``fakeprint.engine.training.train.train`` itself. Prints one JSON object: the one-off statistics time, the median epoch time of
each path, both runs' totals, the preset's full schedule projected from them, and both runs' last-epoch
internal-split accuracy (flip TTA; a check that the two paths train the same model, not a figure of the recipe:
the runs are short).

    python benchmarks/stat_cache.py --data data/unibuc-deepfake --epochs 2 \\
        --out benchmarks/results/stat_cache-cpu-2core-avx2-statmlp_v6_h2.json
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import tempfile
from pathlib import Path

import torch

from _common import DEFAULT_DATA, emit, environment, log
from fakeprint.engine.config import load_config
from fakeprint.engine.training.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--config", default="statmlp_v6_h2")
    ap.add_argument("--epochs", type=int, default=2, help="epochs of each timed run (the preset's: see the JSON)")
    ap.add_argument("--max-train-images", type=int, default=0, help="0: the whole training part")
    ap.add_argument("--out")
    args = ap.parse_args()

    preset_epochs = int(load_config(args.config)["epochs"])
    result = {"environment": environment(torch.device("cpu")), "config": args.config, "data": args.data,
              "epochs_timed": args.epochs, "preset_epochs": preset_epochs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("on", "off"):
            log(f"stat_cache={mode}: {args.epochs} epoch(s)")
            cfg = load_config(args.config, {"epochs": args.epochs, "stat_cache": mode, "progress": False,
                                            "max_train_images": args.max_train_images})
            out = Path(tmp) / mode
            summary = train(args.data, cfg, out)
            run = json.loads((out / "run.json").read_text())
            with open(out / "metrics.csv", newline="") as f:
                epochs = [float(row["epoch_time_s"]) for row in csv.DictReader(f)]
            median = statistics.median(epochs)
            result["runs"][mode] = {
                "train_images": run["train_images"], "statistics_time_s": round(run["statistics_time_s"], 2),
                "epoch_times_s": [round(e, 2) for e in epochs], "median_epoch_s": round(median, 2),
                "train_time_s": round(summary["train_time_s"], 2),
                "preset_schedule_projected_min": round((run["statistics_time_s"] + preset_epochs * median) / 60, 2),
                "last_epoch_accuracy": summary.get("accuracy"), "split": summary.get("split"),
            }
    on, off = result["runs"]["on"], result["runs"]["off"]
    result["speedup_per_epoch"] = round(off["median_epoch_s"] / on["median_epoch_s"], 1)
    result["speedup_preset_schedule"] = round(off["preset_schedule_projected_min"]
                                              / on["preset_schedule_projected_min"], 1)
    emit(result, args.out)


if __name__ == "__main__":
    main()
