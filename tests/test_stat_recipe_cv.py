"""tools/stat_recipe_cv.py: recipes of the statistics head cross-validated on the training part only."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_train_only
from fakeprint import statcache
from fakeprint.checkpoint import load_checkpoint
from fakeprint.config import load_config
from fakeprint.data.cache import load_split
from fakeprint.models import create_model
from fakeprint.train import train

ROOT = Path(__file__).resolve().parent.parent


def _cv(data: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "stat_recipe_cv.py"), "--data", str(data), "--folds", "3",
           "--features", str(tmp_path / "stats.pt"), "--save-probs", str(tmp_path / "probs"),
           "--out", str(tmp_path / "cv.json"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_cv_scores_every_training_part_image_once_and_never_the_internal_split(tmp_path):
    data = make_train_only(tmp_path / "data", n_train=100, seed=3)
    tiny = ["--set", "epochs=2", "--set", "batch_size=20", "--set", "model_args.hidden=16",
            "--set", "model_args.feature_set=v1"]
    proc = _cv(data, tmp_path, *tiny, "--variant", "base", "--variant", "mixup", "stat_mixup=0.4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cv.json").read_text())
    # 10% of the 100 images is the internal split: only the other 90 are computed, split into 3 folds of 30
    assert result["training_part_images"] == 90 and result["folds_run"] == 3
    assert result["data"]["name"] == "data" and str(tmp_path) not in (tmp_path / "cv.json").read_text()
    assert "internal split not loaded" in result["split"] and "last epoch" in result["split"]
    for name in ("base", "mixup"):
        v = result["variants"][name]
        assert len(v["fold_accuracy"]) == 3 and all(0 <= a <= 1 for a in v["fold_accuracy"])
        saved = torch.load(tmp_path / "probs" / f"{name}.pt", weights_only=True)
        assert sorted(saved["index"].tolist()) == list(range(90))  # every image scored once, out of fold
        assert torch.allclose(saved["probs"].sum(1), torch.ones(90), atol=1e-5)
    assert result["variants"]["mixup"]["overrides"][-1] == "stat_mixup=0.4"
    # mixing statistic rows changes the training: the two variants' probabilities differ
    a, b = (torch.load(tmp_path / "probs" / f"{n}.pt", weights_only=True)["probs"] for n in ("base", "mixup"))
    assert not torch.allclose(a, b)
    assert "all_variants_averaged_accuracy" in result

    # the statistics are kept: a second call reads them (and refuses nothing)
    again = _cv(data, tmp_path, *tiny, "--variant", "base", "--run-folds", "1")
    assert again.returncode == 0, again.stderr
    assert "statistics read from" in again.stderr
    assert json.loads((tmp_path / "cv.json").read_text())["folds_run"] == 1
    assert str(tmp_path) not in (tmp_path / "cv.json").read_text()  # the kept statistics named by file name only
    # another dataset with the same statistics file: computed again, not read
    other = make_train_only(tmp_path / "other", n_train=100, seed=4)
    fresh = _cv(other, tmp_path, *tiny, "--variant", "base", "--run-folds", "1")
    assert fresh.returncode == 0 and "holds other statistics" in fresh.stderr, fresh.stderr
    # a variant cannot change what the statistics are: they are computed once for all of them
    wrong = _cv(data, tmp_path, *tiny, "--variant", "v2", "model_args.feature_set=v2")
    assert wrong.returncode != 0 and "feature set" in wrong.stderr and "--set" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    for args, named in ((["--variant", "x", "lrr=1"], "lrr"), (["--variant", "img", "mixup=0.2"], "mixup"),
                        (["--data", str(tmp_path / "nowhere"), "--features", ""], "nowhere")):
        bad = _cv(data, tmp_path, *args)
        assert bad.returncode != 0 and "error:" in bad.stderr and named in bad.stderr, bad.stderr
        assert "Traceback" not in bad.stderr


def _tool():
    spec = importlib.util.spec_from_file_location("stat_recipe_cv", ROOT / "tools" / "stat_recipe_cv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lossless", [{}, {"vflip": True, "rot90": True, "tta": "dihedral"}], ids=["flips", "dihedral"])
def test_a_fold_is_trained_as_fakeprint_train_trains(tmp_path, lossless):
    """train_fold on the statistics of a dataset's images ends with the weights fakeprint train reaches on those
    images with the same seed (train_on_all: the same images in the same order)."""
    data = make_train_only(tmp_path / "data", n_train=60, seed=5)
    cfg = load_config(None, {"model": "statmlp", "model_args": {"feature_set": "v1", "hidden": 16, "layers": 2},
                             "epochs": 2, "batch_size": 16, "progress": False, "ema": 0.9, "amp": "off",
                             "rotation": 0, "scheduler": "warmup_linear", "early_stop": 0, "train_on_all": True,
                             "seed": 3} | lossless)
    train(data, cfg, tmp_path / "run")
    full = load_split(data, "train", progress=False)
    head = create_model(cfg["model"], **cfg["model_args"])
    rows = statcache.statistics(head, torch.from_numpy(np.array(full.images)), cfg["normalize"], views=statcache.views(cfg))
    trained = _tool().train_fold(cfg, rows, torch.from_numpy(np.asarray(full.labels)).long(), seed=3)
    want = load_checkpoint(tmp_path / "run" / "last")[0].state_dict()
    assert trained.state_dict().keys() == want.keys()
    for k, w in want.items():
        torch.testing.assert_close(trained.state_dict()[k], w, rtol=1e-3, atol=1e-4)
    other = _tool().train_fold(cfg, rows, torch.from_numpy(np.asarray(full.labels)).long(), seed=4)
    assert not torch.allclose(other.state_dict()["mlp.1.weight"], want["mlp.1.weight"])  # the seed matters


def test_a_crop_variant_trains_on_crops_scores_the_whole_images_and_folds_can_be_picked(tmp_path):
    """stat_crops: the crops' statistics are computed once for every variant and only the variants that ask for
    them train on them; each fold is scored on the whole images; --only-folds trains just those folds."""
    data = make_train_only(tmp_path / "data", n_train=100, seed=6)
    tiny = ["--set", "epochs=2", "--set", "batch_size=20", "--set", "model_args.hidden=16",
            "--set", "model_args.feature_set=v1"]
    proc = _cv(data, tmp_path, *tiny, "--only-folds", "2,0", "--variant", "base", "--variant", "crops",
               "stat_crops=2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "cv.json").read_text())
    assert result["fold_numbers"] == [0, 2] and result["folds_run"] == 2
    kept = torch.load(tmp_path / "stats.pt", weights_only=True)
    assert kept["rows"].shape[:2] == (90, 2 + 4) and kept["key"]["crops"] == 2 and kept["key"]["crop_size"] == 90
    a, b = (torch.load(tmp_path / "probs" / f"{n}.pt", weights_only=True) for n in ("base", "crops"))
    assert len(a["index"]) == 60 and torch.equal(a["index"], b["index"])  # folds 0 and 2: 30 images each
    assert not torch.allclose(a["probs"], b["probs"])  # the crops changed the training
    for args, named in ((["--only-folds", "3"], "numbered 0 to 2"), (["--only-folds", "x"], "--only-folds"),
                        (["--variant", "c", "stat_crops=1", "rot90=true"], "flip views")):
        bad = _cv(data, tmp_path, *tiny, *args)
        assert bad.returncode != 0 and named in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
