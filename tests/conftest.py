"""Shared fixtures: tiny generated datasets and a way to run the CLI as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fakeprint.data.demo import make_demo_dataset

os.environ.setdefault("FAKEPRINT_COMMIT", "test")

# pytest-xdist (pyproject's addopts: one worker per core) shares the cores between its workers: each worker and the
# CLI processes it starts (torch reads OMP_NUM_THREADS when it starts) get their share of threads, not all of them
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _SHARE = max(1, _CORES // _WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_SHARE))
    torch.set_num_threads(_SHARE)


@pytest.fixture(autouse=True, scope="module")
def _restore_torch_threads():
    """Training with ``threads=N`` sets a process-wide torch setting: no test module leaks it to the next
    (module scope, so that module-scoped fixtures that train are covered too)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def make_train_only(root: Path, n_train: int, seed: int) -> Path:
    """A generated dataset with train.csv + train/ only: training makes an internal split of it."""
    return make_demo_dataset(root, n_train=n_train, n_val=0, n_test=0, seed=seed)


@pytest.fixture(scope="session")
def tiny_data_master(tmp_path_factory) -> Path:
    """A small five-class dataset in the report's layout (train / validation / test), made once."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    make_demo_dataset(root, n_train=100, n_val=50, n_test=20, seed=1)
    return root


def private_copy(master: Path, tmp_path: Path) -> Path:
    """A copy of a generated dataset (without its decoded cache) that one test may modify."""
    dst = tmp_path / "data"
    shutil.copytree(master, dst, ignore=shutil.ignore_patterns(".fakeprint-cache"))
    return dst


@pytest.fixture
def tiny_data(tiny_data_master, tmp_path) -> Path:
    """A private copy of the tiny dataset that a test may modify."""
    return private_copy(tiny_data_master, tmp_path)


@pytest.fixture
def tiny_train_only(tiny_data) -> Path:
    """The tiny dataset without validation.csv: training must make an internal split."""
    (tiny_data / "validation.csv").unlink()
    shutil.rmtree(tiny_data / "validation")
    return tiny_data


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m fakeprint ARGS`` in a subprocess, as a user would; returns the completed process."""
    full_env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run([sys.executable, "-m", "fakeprint", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli


FAST_TRAIN = ["--config", "demo", "--set", "epochs=2", "--set", "progress=false", "--set", "batch_size=25",
              "--set", "threads=1"]


def rename_test_ids(root: Path, ids: list[str]) -> None:
    """Give a dataset's test images (and the rows of its test.csv) the ids ``ids``, in order."""
    import csv

    with open(root / "test.csv", newline="") as f:
        old = [r["image_id"] for r in csv.DictReader(f)]
    for o, n in zip(old, ids, strict=False):
        src = next((root / "test").glob(f"{o}.*"))
        src.rename(src.with_name(n + src.suffix))
    with open(root / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id"])
        w.writerows([i] for i in ids)
