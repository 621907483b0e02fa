"""Time to accuracy: train a preset with ``fakeprint.engine.training.train.train`` and report, after every epoch, the
training time so far (training steps only: from the decoded cache, no decoding, no evaluation, no
checkpoint writing) and the validation accuracy, and when ``--target`` was first reached.

The training time of an epoch is the time ``train`` measures around ``train_one_epoch`` (with a device
synchronisation); it is read back from the run's ``metrics.csv`` (``train_time_s`` where the column
exists, else images / ``train_images_per_s``). The decoded cache is built (or checked) before training
starts, and its time is reported apart.

    python benchmarks/time_to_accuracy.py --data data/unibuc-deepfake --config threecnn --set epochs=30
    python benchmarks/time_to_accuracy.py --data data/unibuc-deepfake --config fpnet_gpu --target 0.935 --warm-start
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_DATA, emit, environment, log, pick
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import dataset_identity
from fakeprint.engine.config import load_config
from fakeprint.engine.training.train import train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--config", default="threecnn", help="a preset name or a YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--target", type=float, default=0.935, help="validation accuracy to reach")
    p.add_argument("--run", default=None, help="keep the run folder here (default: a temporary folder)")
    p.add_argument("--warm-start", action="store_true",
                   help="first train one untimed epoch in a throwaway folder (CUDA context, cuDNN autotuning, "
                        "compile caches), as airbench times a warm process")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def epoch_times(run: Path) -> list[dict]:
    """Per-epoch rows of ``metrics.csv`` with ``train_time_s`` (training steps only) and its running sum."""
    import yaml

    info = json.loads((run / "run.json").read_text())
    bs = int(yaml.safe_load((run / "config.yaml").read_text())["batch_size"])
    world = int(info.get("world_size", 1))
    images = (int(info["train_images"]) // world) // bs * bs * world  # what DeviceBatches(drop_last) serves
    rows, total = [], 0.0
    with open(run / "metrics.csv", newline="") as f:
        for r in csv.DictReader(f):
            t = float(r["train_time_s"]) if r.get("train_time_s") else images / float(r["train_images_per_s"])
            total += t
            rows.append({"epoch": int(r["epoch"]), "train_time_s": round(t, 4), "cumulative_train_s": round(total, 4),
                         "val_acc": float(r["val_acc"]), "val_loss": float(r["val_loss"]),
                         "val_recall_weakest": float(r["val_recall_weakest"]),
                         "epoch_time_with_eval_s": float(r["epoch_time_s"])})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, ["progress=false", *args.set])
    device = pick(cfg["device"])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    result: dict = {"benchmark": "time_to_accuracy", "environment": environment(device)}
    root = Path(args.data)

    t0 = time.perf_counter()
    for split in ("train", "validation"):
        if split == "train" or (root / "validation.csv").is_file():
            load_split(root, split, cache_dir=cfg["cache_dir"], workers=cfg["workers"],
                       on_bad_image=cfg["on_bad_image"], progress=False)
    cache_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="fakeprint-tta-") as tmp:
        if args.warm_start:
            log("warm start: one untimed epoch ...")
            train(root, cfg | {"epochs": 1}, Path(tmp) / "warm")
        run = Path(args.run) if args.run else Path(tmp) / "run"
        log(f"training {cfg['model']} ({args.config}) into {run} ...")
        t0 = time.perf_counter()
        summary = train(root, cfg, run)
        wall_s = time.perf_counter() - t0
        if not rank0:
            return {}
        rows = epoch_times(run)
    reached = next((r for r in rows if r["val_acc"] >= args.target), None)
    result |= {
        "config": args.config, "overrides": args.set, "model": cfg["model"], "data": dataset_identity(root),
        "split": summary.get("split"), "target": args.target,
        "time_to_target_s": reached["cumulative_train_s"] if reached else None,
        "epoch_reached": reached["epoch"] if reached else None,
        "best_val_acc": max((r["val_acc"] for r in rows), default=None),
        "train_time_s": rows[-1]["cumulative_train_s"] if rows else 0.0,
        "wall_time_s": round(wall_s, 3), "cache_s": round(cache_s, 3), "warm_start": args.warm_start,
        "epochs": rows, "config_resolved": {k: cfg[k] for k in ("batch_size", "epochs", "lr", "optimizer",
                                                                  "scheduler", "amp", "channels_last", "compile")},
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
