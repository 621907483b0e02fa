"""tools/feature_probe.py: the hand-made statistics are what they say, and the probe runs end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from feature_probe import GROUPS, features  # noqa: E402


def test_constant_image_statistics():
    img = np.full((2, 100, 100, 3), 128, np.uint8)
    f = features(img)
    assert {g: f[g].shape for g in GROUPS} == {"colour": (2, 150), "residual": (2, 9),
                                               "cooccurrence": (2, 180), "spectrum": (2, 200)}
    # colour: six channels x (mean, std, 7 percentiles, 16-bin histogram); each histogram sums to 1
    colour = f["colour"][0].reshape(6, 25)
    np.testing.assert_allclose(colour[:3, 0], 128 / 255, rtol=1e-5)
    np.testing.assert_allclose(colour[:, 9:].sum(1), 1.0, rtol=1e-5)
    assert colour[0, 9 + int(128 / 255 * 16)] == 1.0
    # no noise residual at all
    np.testing.assert_allclose(f["residual"][0], 0.0, atol=1e-6)
    # every neighbouring difference is 0: all the mass in the middle bin (4 of 9) and pair (4, 4) of 81
    co = f["cooccurrence"][0]
    for start in (0, 90):
        assert co[start + 4] == 1.0 and co[start + 9 + 4 * 9 + 4] == 1.0
        assert co[start:start + 90].sum() == 2.0


def test_statistics_tell_images_apart():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 250, 100, dtype=np.float32)
    smooth = np.broadcast_to((ramp[:, None] + ramp[None, :])[None, :, :, None] / 2, (1, 100, 100, 3)).astype(np.uint8)
    noisy = rng.integers(0, 256, (1, 100, 100, 3), dtype=np.uint8)
    fs, fn = features(smooth), features(noisy)
    assert fn["residual"][0, 0] > 10 * fs["residual"][0, 0]  # residual std, red channel
    # high-frequency residual power (outer rings) is far higher for noise
    assert fn["spectrum"][0, 40:50].mean() > fs["spectrum"][0, 40:50].mean() + 3


def test_probe_end_to_end(tiny_data_master, tmp_path):
    rows = list(csv.DictReader((tiny_data_master / "train.csv").open()))
    run = tmp_path / "run"
    run.mkdir()
    by_class: dict[str, int] = {}
    with (run / "split.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "subset"])
        for r in rows:  # the first 4 of each class held out
            k = by_class[r["label"]] = by_class.get(r["label"], 0) + 1
            w.writerow([r["image_id"], r["label"], "internal" if k <= 4 else "train"])
    shared = tmp_path / "shared.csv"
    shared.write_text("image_id,label,predicted,models_wrong,same_wrong_label\n"
                      f"{rows[0]['image_id']},{rows[0]['label']},0,2,True\n")
    out = tmp_path / "res" / "probe"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "feature_probe.py"), "--data", str(tiny_data_master),
                        "--run", str(run), "--shared", str(shared), "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["n_train"] == len(rows) - 20 and report["n_scored"] == 20
    assert report["shared_errors"]["n"] == 1
    row = report["models"]["all features"]
    assert 0.0 <= row["accuracy"] <= 1.0 and row["right_on_shared_errors"] in (0, 1)
    # the demo's generators differ in their traces: the statistics must do far better than chance (20%)
    assert row["accuracy"] >= 0.5
    assert "| all features |" in out.with_suffix(".md").read_text()


def test_probe_names_a_missing_split(tiny_data_master, tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "feature_probe.py"), "--data", str(tiny_data_master),
                        "--run", str(tmp_path), "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert p.returncode != 0 and "split.csv" in p.stderr and "Traceback" not in p.stderr


def _run_with_first_20_held_out(data: Path, tmp_path: Path) -> tuple[list[dict], Path]:
    """train.csv's rows, and a run folder whose split.csv holds out the first 20 of them as the internal split."""
    rows = list(csv.DictReader((data / "train.csv").open()))
    run = tmp_path / "run"
    run.mkdir()
    with (run / "split.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "subset"])
        for i, r in enumerate(rows):
            w.writerow([r["image_id"], r["label"], "internal" if i < 20 else "train"])
    return rows, run


def test_probe_selection_split_leaves_the_internal_split_out(tiny_data_master, tmp_path):
    rows, run = _run_with_first_20_held_out(tiny_data_master, tmp_path)
    out = tmp_path / "sel"
    args = [sys.executable, str(ROOT / "tools" / "feature_probe.py"), "--data", str(tiny_data_master),
            "--run", str(run), "--evaluate-on", "selection", "--feature-set", "v2", "--classifier", "mlp",
            "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    n_rest = len(rows) - 20
    assert report["n_train"] + report["n_scored"] == n_rest  # the internal split is neither fitted nor scored
    assert report["n_scored"] == round(0.1 * n_rest) or abs(report["n_scored"] - 0.1 * n_rest) <= 5
    assert "selection split" in report["split"] and report["feature_set"] == "v2" and report["classifier"] == "mlp"
    assert set(report["features"]) > {"colour", "chroma", "cooccurrence_rgb"}
    p = subprocess.run([*args, "--blend", "default"], capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--blend" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize(("feature_set", "classifier", "dim"), [("v4", "head", 3705), ("v5", "head2", 4973)])
def test_probe_cross_validates_on_the_training_part_only(tiny_data_master, tmp_path, feature_set, classifier, dim):
    """--evaluate-on cv scores every image of the internal split's training part once, by a model fitted on the
    other folds (--classifier head / head2: the statistics head's MLP in torch, one layer of 256 / two of 512), and
    never touches the internal split."""
    rows, run = _run_with_first_20_held_out(tiny_data_master, tmp_path)
    out = tmp_path / "cv"
    args = [sys.executable, str(ROOT / "tools" / "feature_probe.py"), "--data", str(tiny_data_master),
            "--run", str(run), "--evaluate-on", "cv", "--folds", "3", "--feature-set", feature_set, "--classifier", classifier,
            "--out", str(out)]
    p = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    n_rest = len(rows) - 20
    assert report["n_scored"] == n_rest and abs(report["n_train"] - 2 * n_rest / 3) <= 5
    assert "3-fold cross-validation" in report["split"] and report["engine"].startswith("torch")
    assert report["features"]["srm_chroma"] == 500 and sum(report["features"].values()) == dim
    assert report["classifier"] == classifier
    row = report["models"]["all features"]
    assert len(row["fold_accuracy"]) == 3
    # the folds partition the scored images: the overall accuracy is their size-weighted mean
    assert min(row["fold_accuracy"]) - 0.01 <= row["accuracy"] <= max(row["fold_accuracy"]) + 0.01
    assert row["accuracy"] >= 0.5  # the demo's generators are told apart far above chance (20%)
    assert "Accuracy of each fold" in out.with_suffix(".md").read_text()
    p = subprocess.run([*args[:-2], "--folds", "1", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "--folds" in p.stderr and "Traceback" not in p.stderr


def test_the_probes_heads_have_the_statistics_heads_shapes(monkeypatch):
    """head: one hidden layer of 256 (dropout 0.2); head2: two of 512 (dropout 0.3), as hybrid_v4_h2_w32's head."""
    import torch
    from feature_probe import HEAD_SHAPES, fit_head

    made = []
    real = torch.nn.Linear.__init__

    def spy(self, i, o, *a, **k):
        made.append((i, o))
        real(self, i, o, *a, **k)

    monkeypatch.setattr(torch.nn.Linear, "__init__", spy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    for name, want in (("head", [(12, 256), (256, 2)]), ("head2", [(12, 512), (512, 512), (512, 2)])):
        made.clear()
        p = fit_head(x, y, x[:50], seed=0, epochs=5, shape=HEAD_SHAPES[name])
        assert made == want
        assert p.shape == (50, 2) and np.allclose(p.sum(1), 1, atol=1e-5) and (p.argmax(1) == y[:50]).mean() > 0.8
