"""`fakeprint analyze`: the analysis folder end to end, and the spectrum, calibration and pair arithmetic."""

import json
import shutil

import numpy as np
import pytest

from fakeprint.core.metrics import reliability
from fakeprint.data.demo import make_demo_dataset
from fakeprint.engine.config import load_config
from fakeprint.engine.training.train import train
from fakeprint.interfaces.cli import main
from fakeprint.reports.analyze import analyze, confused_pairs, mean_log_spectrum
from fakeprint.studies.grids import SCALE_BASE


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained on a train-only dataset (so it has an internal split), and that dataset."""
    base = tmp_path_factory.mktemp("analyze")
    data = make_demo_dataset(base / "data", n_train=100, n_val=25, n_test=1, seed=3)
    (data / "test.csv").unlink()
    shutil.rmtree(data / "test")
    internal = base / "internal-data"
    shutil.copytree(data, internal, ignore=shutil.ignore_patterns("validation*", ".fakeprint-cache"))
    cfg = load_config("demo", SCALE_BASE["tiny"] | {"model_args": {"width": 4}, "epochs": 2})
    train(internal, cfg, base / "run")
    return base / "run", internal, data


def test_analysis_folder_on_the_internal_split(run, tmp_path):
    ckpt, internal, _ = run
    r = analyze(ckpt, internal, "internal", tmp_path / "a", progress=False)
    for f in ("analysis.md", "analysis.json", "mistakes.png", "spectra.png", "calibration.png",
              "confusion_matrix.png", "metrics.json", "report.md"):
        assert (tmp_path / "a" / f).is_file(), f
    saved = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert saved["n"] == 10 and saved["split"] == "internal"
    # the dataset by name and content hash, never this machine's absolute path
    assert set(saved["data"]) == {"name", "csv_sha256"} and str(tmp_path) not in json.dumps(saved)
    cm = np.array(saved["confusion_matrix"])
    for c in saved["per_class"]:
        k = c["class"]
        assert c["recall"] == pytest.approx(cm[k, k] / cm[k].sum())
        assert c["precision"] == pytest.approx(cm[k, k] / cm[:, k].sum() if cm[:, k].sum() else 0.0)
    assert saved["n_mistakes"] == cm.sum() - np.trace(cm)
    confs = [m["confidence"] for m in saved["mistakes"]]
    assert confs == sorted(confs, reverse=True) and all(m["true"] != m["predicted"] for m in saved["mistakes"])
    assert sum(b["n"] for b in saved["calibration"]["bins"]) == 10
    md = (tmp_path / "a" / "analysis.md").read_text()
    assert all(h in md for h in ("## Per class", "## Most-confused pairs", "## Calibration", "mistakes.png"))
    assert r["accuracy"] == pytest.approx(np.trace(cm) / 10)


def test_analysis_cli_on_the_validation_split_and_errors(run, tmp_path, capsys):
    ckpt, internal, data = run
    assert main(["analyze", str(ckpt), "--data", str(data), "--split", "validation", "--out", str(tmp_path / "v")]) == 0
    assert "25 images" in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / "analysis.json").read_text())["n"] == 25
    # a checkpoint copied away from its run folder has no split.csv: --split internal is a clear error
    lone = tmp_path / "lone"
    lone.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(ckpt / f"best{suffix}", lone / f"best{suffix}")
    assert main(["analyze", str(lone / "best.safetensors"), "--data", str(internal), "--split", "internal"]) == 2
    assert "split.csv" in capsys.readouterr().err


def test_spectrum_finds_a_periodic_trace_and_ignores_the_mean():
    flat = np.full((4, 100, 100, 3), 77, dtype=np.uint8)
    assert np.abs(mean_log_spectrum(flat)).max() < 1e-3                # the per-image mean (DC) is removed
    x = np.arange(100)
    stripes = (128 + 60 * np.sin(2 * np.pi * x / 4))[None, None, :, None]  # period 4 along the width
    imgs = np.broadcast_to(stripes, (3, 100, 100, 3)).astype(np.uint8)
    spec = mean_log_spectrum(imgs)
    peak = np.unravel_index(np.argmax(spec), spec.shape)
    assert peak[0] == 50 and abs(peak[1] - 50) == 25                # zero frequency at the centre (fftshift)


def test_calibration_hand_computed():
    cal = reliability(np.array([0.95, 0.95, 0.55, 0.55]), np.array([1, 0, 1, 1]))
    assert [(b["low"], b["n"], b["accuracy"]) for b in cal["bins"]] == [(0.5, 2, 1.0), (0.9, 2, 0.5)]
    assert cal["ece"] == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    perfect = reliability(np.array([1.0, 1.0]), np.array([1, 1]))
    assert perfect["ece"] == pytest.approx(0.0) and perfect["bins"][0]["high"] == 1.0


def test_confused_pairs_are_the_largest_off_diagonal_cells():
    cm = np.array([[8, 1, 0], [0, 5, 0], [4, 4, 2]])
    pairs = confused_pairs(cm, top=2)
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [(2, 0, 4), (2, 1, 4)]
    assert pairs[0]["share_of_true"] == pytest.approx(0.4)
