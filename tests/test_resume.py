"""Killed runs: a training killed with SIGKILL mid-epoch and resumed ends exactly like an uninterrupted one."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

ARGS = ["--config", "demo", "--set", "epochs=4", "--set", "progress=false", "--set", "batch_size=10",
        "--set", "threads=1", "--set", "deterministic=true", "--set", "ema=0.9"]
COMPARED = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"]


def _rows(run):
    with open(run / "metrics.csv") as f:
        return [{k: r[k] for k in COMPARED} for r in csv.DictReader(f)]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_matches_an_uninterrupted_run(cli, tiny_data, tmp_path):
    full = tmp_path / "full"
    proc = cli("train", "--data", str(tiny_data), *ARGS, "--out", str(full))
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "fakeprint", "train", "--data", str(tiny_data), *ARGS, "--out", str(killed)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"FAKEPRINT_COMMIT": "test"})
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "resume.json").exists():
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)  # the first epoch is done; the second is under way
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(_rows(killed)) < 4

    # a run started by an older fakeprint lacks newer config keys: they take their defaults
    cfg = (killed / "config.yaml").read_text()
    (killed / "config.yaml").write_text("\n".join(x for x in cfg.splitlines() if not x.startswith("train_on_all:")))
    proc = cli("train", "--resume", str(killed))
    assert proc.returncode == 0, proc.stderr
    assert _rows(killed) == _rows(full)
    assert json.loads((killed / "run.json").read_text())["resumes"] == 1
    assert json.loads((full / "run.json").read_text())["resumes"] == 0
    a, b = load_file(killed / "best.safetensors"), load_file(full / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_folder_without_a_run_is_refused(cli, tmp_path):
    proc = cli("train", "--resume", str(tmp_path), "--data", str(tmp_path))
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_same_seed_same_metrics(cli, tiny_data, tmp_path):
    """Reproducibility: two CPU runs with the same seed and data give identical metrics."""
    for name in ("a", "b"):
        proc = cli("train", "--data", str(tiny_data), *ARGS, "--set", "epochs=2", "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
    assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
    proc = cli("train", "--data", str(tiny_data), *ARGS, "--set", "epochs=2", "--set", "seed=1", "--out", str(tmp_path / "c"))
    assert _rows(tmp_path / "c") != _rows(tmp_path / "a")  # the seed matters: the comparison can fail


def test_max_minutes_ends_the_run_cleanly_after_the_epoch_that_passes_it(cli, tiny_data, tmp_path):
    """A time limit stops after a whole epoch and the run still ends as usual (last checkpoint, report,
    summary saying why); without it the same run trains every epoch."""
    run = tmp_path / "limited"
    proc = cli("train", "--data", str(tiny_data), *ARGS, "--set", "max_minutes=0.00001", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_by"] == "time limit" and summary["epochs_run"] == 1 and len(_rows(run)) == 1
    assert "time limit" in proc.stderr and (run / "report.md").is_file() and (run / "last.safetensors").is_file()
    # a time-limited run continues with a new limit (applied and recorded); the curve goes on where it stopped
    before = _rows(run)
    proc = cli("train", "--resume", str(run), "--set", "max_minutes=0")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == "epochs"
    assert _rows(run)[:1] == before and [r["epoch"] for r in _rows(run)] == ["1", "2", "3", "4"]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_minutes"] == 0
    assert json.loads((run / "run.json").read_text())["resumes"] == 1
    proc = cli("train", "--data", str(tiny_data), *ARGS, "--set", "epochs=2", "--out", str(tmp_path / "free"))
    assert json.loads((tmp_path / "free" / "summary.json").read_text())["stopped_by"] == "epochs"
