"""Two-process DDP training on CPU (gloo), launched by ``torchrun`` exactly as a user would."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from fakeprint.data.demo import make_demo_dataset

N_TRAIN, N_VAL = 80, 30


def _torchrun() -> str | None:
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else shutil.which("torchrun")


def _rank_logs(log_dir: Path, rank: int) -> tuple[str, str]:
    (folder,) = log_dir.glob(f"*/attempt_0/{rank}")
    return (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()


def _train_two_ranks(tmp_path: Path, *sets: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """``torchrun --nproc_per_node=2 -m fakeprint train`` on a small demo dataset with ``--set`` ``sets``;
    returns the finished process, the run folder and torchrun's log folder."""
    data = make_demo_dataset(tmp_path / "data", n_train=N_TRAIN, n_val=N_VAL, n_test=0, seed=2)
    run, logs = tmp_path / "run", tmp_path / "logs"
    cmd = [_torchrun(), "--standalone", "--nproc_per_node=2", "--log-dir", str(logs), "--redirects", "3",
           "-m", "fakeprint", "train", "--data", str(data), "--config", "demo",
           "--set", "progress=false", "--set", "batch_size=8", "--set", "threads=1", "--set", "device=cpu",
           *(arg for kv in sets for arg in ("--set", kv)), "--out", str(run)]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path), run, logs


def needs_torchrun_and_gloo(test):
    test = pytest.mark.skipif(_torchrun() is None, reason="torchrun is missing")(test)
    return pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                              reason="torch.distributed with gloo is missing")(test)


@needs_torchrun_and_gloo
@pytest.mark.slow
def test_torchrun_two_processes_train_one_run(tmp_path):
    # micro_batch: each rank accumulates its slices and the gradients are reduced once per batch (no_sync)
    proc, run, logs = _train_two_ranks(tmp_path, "epochs=2", "micro_batch=3")
    out0, err0 = _rank_logs(logs, 0)
    out1, err1 = _rank_logs(logs, 1)
    assert proc.returncode == 0, f"{proc.stderr[-2000:]}\n--- rank 0:\n{err0[-2000:]}\n--- rank 1:\n{err1[-2000:]}"

    # only rank 0 writes: its summary on stdout, its epoch lines on stderr; rank 1 says nothing of the kind
    summary = json.loads(out0)
    assert out1.strip() == ""
    assert "epoch   1" in err0 and "epoch" not in err1

    info = json.loads((run / "run.json").read_text())
    assert info["world_size"] == 2 and info["train_images"] == N_TRAIN and info["val_images"] == N_VAL

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "train_images_per_s"):
            assert math.isfinite(float(r[key])), (key, r)
        assert 0 <= float(r["val_acc"]) <= 1 and float(r["train_images_per_s"]) > 0

    for stem in ("best", "last"):
        assert (run / f"{stem}.safetensors").stat().st_size > 0
        meta = json.loads((run / f"{stem}.json").read_text())
        assert meta["model"] == "fpnet_tiny"
    assert json.loads((run / "last.json").read_text())["epoch"] == 2
    for name in ("metrics.json", "report.md", "confusion_matrix.png", "curves.png", "summary.json"):
        assert (run / name).stat().st_size > 0, name

    # the ranks agree: validation metrics reduced over both ranks' shards (what every rank acts on) equal
    # rank 0's own evaluation of the saved last checkpoint on the whole validation split (the report's)
    best_row = max(rows, key=lambda r: float(r["val_acc"]))
    report = json.loads((run / "metrics.json").read_text())
    assert sum(map(sum, report["confusion_matrix"])) == N_VAL, "every validation image evaluated exactly once"
    assert report["accuracy"] == pytest.approx(float(rows[-1]["val_acc"]), abs=1e-5)
    assert summary["best_val_acc"] == pytest.approx(float(best_row["val_acc"]), abs=1e-5)
    assert json.loads((run / "best.json").read_text())["epoch"] == int(best_row["epoch"])
    assert summary["epochs_run"] == 2
    assert json.loads((run / "summary.json").read_text()) == summary


@needs_torchrun_and_gloo
@pytest.mark.slow
def test_torchrun_ranks_stop_together_at_the_time_limit(tmp_path):
    """max_minutes under DDP: the ranks agree (all-reduced) on the epoch to stop at, so none waits for another."""
    proc, run, _ = _train_two_ranks(tmp_path, "epochs=3", "max_minutes=0.00001")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "time limit" and summary["epochs_run"] == 1
