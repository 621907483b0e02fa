"""train -> evaluate -> predict on a tiny generated dataset, through the CLI, checking files and formats."""

import csv
import json

import numpy as np
import pytest
import yaml

from conftest import FAST_TRAIN


def test_train_evaluate_predict(cli, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--data", str(tiny_data), *FAST_TRAIN, "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["epochs_run"] == 2 and 0 <= summary["accuracy"] <= 1

    for name in ("config.yaml", "run.json", "metrics.csv", "best.safetensors", "best.json", "last.safetensors",
                 "last.json", "resume.json", "curves.png", "report.md", "metrics.json", "confusion_matrix.png"):
        assert (run / name).is_file(), name
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["model"] == "fpnet_tiny" and cfg["batch_size"] == 25
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1"} <= set(rows[0])
    meta = json.loads((run / "best.json").read_text())
    assert meta["model"] == "fpnet_tiny" and meta["num_classes"] == 5 and meta["commit"]
    assert meta["normalization"]["mean"] == [0.485, 0.456, 0.406] and meta["config"]["epochs"] == 2
    info = json.loads((run / "run.json").read_text())
    assert info["split"].startswith("official validation") and info["val_images"] == 50
    assert {"torch", "fakeprint", "python"} <= set(info["versions"])

    proc = cli("evaluate", str(run), "--data", str(tiny_data), "--split", "validation", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == 50 and (cm.sum(1) == 10).all()  # rows are the actual classes
    assert abs(m["accuracy"] - np.trace(cm) / 50) < 1e-9
    assert "precision    recall  f1-score   support" in proc.stdout and "macro avg" in proc.stdout
    assert "actual \\ predicted" in (tmp_path / "ev" / "report.md").read_text()
    assert (tmp_path / "ev" / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"

    sub = tmp_path / "submission.csv"
    proc = cli("predict", str(run), "--data", str(tiny_data), "--split", "test", "--out", str(sub), "--tta")
    assert proc.returncode == 0, proc.stderr
    lines = sub.read_text().splitlines()
    test_ids = [line for line in (tiny_data / "test.csv").read_text().splitlines()[1:]]
    assert lines[0] == "image_id,label"
    assert [line.split(",")[0] for line in lines[1:]] == test_ids
    assert all(line.split(",")[1] in {"0", "1", "2", "3", "4"} for line in lines[1:])

    images = sorted((tiny_data / "test").iterdir())[:2]
    proc = cli("predict", str(run / "best.safetensors"), *map(str, images), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [o["image"] for o in out] == [str(p) for p in images]
    assert all(abs(sum(o["probabilities"].values()) - 1) < 1e-5 for o in out)


def test_internal_split_is_seeded_stratified_and_recorded(cli, tiny_train_only, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--data", str(tiny_train_only), *FAST_TRAIN, "--set", "epochs=1", "--set", "val_fraction=0.2",
               "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((run / "split.csv").read_text().splitlines()))
    held = [r for r in rows if r["subset"] == "internal"]
    assert len(rows) == 100 and len(held) == 20
    assert sorted(int(r["label"]) for r in held) == sorted(list(range(5)) * 4)
    assert "internal split" in json.loads((run / "run.json").read_text())["split"]
    proc = cli("evaluate", str(run), "--data", str(tiny_train_only), "--split", "internal", "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 20


def test_ensemble_trains_from_two_frozen_base_checkpoints(tmp_path):
    import torch

    from fakeprint.data.demo import make_demo_dataset
    from fakeprint.engine.config import load_config
    from fakeprint.engine.training.train import train
    from fakeprint.models import create_model
    from fakeprint.models.checkpoint import load_checkpoint, save_checkpoint

    bases = []
    for name in ("skipconcnn", "threecnn"):
        torch.manual_seed(len(bases))
        bases.append(save_checkpoint(tmp_path / name / "best", create_model(name), {"model": name, "num_classes": 5}))
    # SkipConCNN costs 13.6 G multiply-adds an image: the fewest images that still make a split of five classes
    data = make_demo_dataset(tmp_path / "data", n_train=20, n_val=10, n_test=0, seed=1)
    cfg = load_config("ensemblecnn", {"epochs": 1, "progress": False, "batch_size": 10,
                                      "base_checkpoints": [str(b) for b in bases]})
    train(data, cfg, tmp_path / "ens")
    ens, meta = load_checkpoint(tmp_path / "ens" / "best")
    assert meta["trainable_parameters"] == 727 and meta["parameters"] == 9_387_553
    three, _ = load_checkpoint(bases[1])
    for k, v in three.state_dict().items():  # the frozen member is unchanged by training
        assert torch.equal(ens.members[1].state_dict()[k], v), k


@pytest.mark.slow
def test_train_on_all_uses_every_image_and_claims_no_held_out_figure(cli, tiny_train_only, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--data", str(tiny_train_only), *FAST_TRAIN, "--set", "train_on_all=true", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["train_images"] == 100 and info["val_images"] == 0 and "no held-out split" in info["split"]
    meta = json.loads((run / "last.json").read_text())
    assert meta["epoch"] == 2 and meta["metrics"] == {} and "held_out" not in meta
    assert not (run / "best.safetensors").exists() and not (run / "metrics.json").exists()
    with open(run / "split.csv", newline="") as f:  # every image listed, none as "internal"
        subsets = [r["subset"] for r in csv.DictReader(f)]
    assert len(subsets) == 100 and set(subsets) == {"train"}
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["val_acc"] == "" for r in rows)
    # scoring the "internal split" of such a run would score training images: refused with a clear error
    proc = cli("evaluate", str(run), "--data", str(tiny_train_only), "--split", "internal")
    assert proc.returncode == 2 and "train_on_all" in proc.stderr and "Traceback" not in proc.stderr
    # a schedule steered by a held-out split cannot exist without one
    proc = cli("train", "--data", str(tiny_train_only), *FAST_TRAIN, "--set", "train_on_all=true",
               "--set", "scheduler=plateau", "--out", str(tmp_path / "r2"))
    assert proc.returncode == 2 and "fixed schedule" in proc.stderr
