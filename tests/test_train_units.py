import numpy as np
import pytest
import torch
from torch import nn

from fakeprint.engine.config import load_config
from fakeprint.engine.training.ema import EMA
from fakeprint.engine.training.loop import cm_to_pairs
from fakeprint.engine.training.setup import build_scheduler


def test_ema_averages_weights_and_batchnorm_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = EMA(model, decay=0.9, warmup=False)  # the plain average (the warm-up: test_recipes.py)
    w0, m0 = model[0].weight.detach().clone(), model[1].running_mean.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model.train()
    model(torch.randn(8, 3, 10, 10) + 5)  # moves the running statistics
    ema.update(model)
    assert torch.allclose(ema.model[0].weight, w0 + 0.1, atol=1e-6)
    assert torch.allclose(ema.model[1].running_mean, 0.9 * m0 + 0.1 * model[1].running_mean, atol=1e-6)
    assert ema.model[1].num_batches_tracked == model[1].num_batches_tracked


def test_warmup_linear_warms_up_then_decays_to_zero():
    cfg = load_config("demo", {"epochs": 4, "warmup_epochs": 1, "scheduler": "onecycle", "lr": 1.0})
    assert cfg["scheduler"] == "warmup_linear"  # the old name is read as the new one
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert per_step and lrs[0] == 0.1 and max(lrs) == 1.0 and lrs.index(1.0) == 9
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] < 0.05


def test_plateau_scheduler_is_per_epoch_and_maximises():
    cfg = load_config("threecnn")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch=10)
    assert not per_step and sched.mode == "max" and sched.patience == 15 and sched.factor == 0.8


def test_confusion_matrix_expands_to_pairs():
    cm = np.array([[2, 1], [0, 3]])
    t, p = cm_to_pairs(cm)
    assert sorted(zip(t.tolist(), p.tolist(), strict=True)) == [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 1)]


def test_metrics_from_a_confusion_matrix_match_scikit_learn():
    import numpy as np

    from fakeprint.core.metrics import from_confusion, summary

    rng = np.random.default_rng(0)
    t = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.7, t, rng.integers(0, 5, 300))
    s, f = summary(t, p), from_confusion(summary(t, p)["confusion_matrix"])
    assert f["accuracy"] == pytest.approx(s["accuracy"]) and f["macro_f1"] == pytest.approx(s["macro_f1"])
    assert f["recall"] == pytest.approx([s["per_class"][str(c)]["recall"] for c in range(5)])


def test_a_selection_split_steers_the_schedule_and_the_internal_split_only_reports(tiny_train_only, tmp_path):
    """``selection_fraction``: part of the training part decides the plateau scheduler, early stopping and
    best.json; the internal split is measured every epoch and steers nothing."""
    import csv as csvmod
    import json

    from fakeprint.engine.config import load_config
    from fakeprint.engine.training.train import train

    cfg = load_config("demo", {"epochs": 8, "progress": False, "batch_size": 25, "threads": 1, "workers": 1,
                               "scheduler": "plateau", "plateau_patience": 0, "early_stop": 1,
                               "selection_fraction": 0.2, "ema": 0})
    summary = train(tiny_train_only, cfg, tmp_path / "run")
    with open(tmp_path / "run" / "split.csv", newline="") as f:
        rows = list(csvmod.DictReader(f))
    subsets = {s: {r["image_id"] for r in rows if r["subset"] == s} for s in ("train", "internal", "selection")}
    assert all(subsets.values()) and not (subsets["train"] & subsets["selection"])
    assert not (subsets["internal"] & (subsets["train"] | subsets["selection"]))
    from fakeprint.data.splits import read_split_csv  # the one reader, used by evaluate and the studies

    parts = read_split_csv(tmp_path / "run" / "split.csv")
    assert {k: set(v[0]) for k, v in parts.items()} == subsets
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        hist = list(csvmod.DictReader(f))
    sel = [float(r["selection_acc"]) for r in hist]
    # early_stop=1: the run stops at the first epoch whose selection accuracy is no better than the best so far
    stop = next((i + 1 for i in range(1, len(sel)) if sel[i] <= max(sel[:i])), len(sel))
    assert summary["epochs_run"] == stop == len(hist)
    assert all(r["val_acc"] != "" for r in hist)  # the internal split is still measured, for the report
    assert "selection split" in summary["split"] and "selection_note" in summary and "best_val_acc" not in summary
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert best["held_out"]["selection"] == "best epoch, chosen on the separate selection split"


def test_a_selection_split_also_comes_from_the_training_images_beside_an_official_validation_split(tiny_data, tmp_path):
    from fakeprint.engine.config import load_config
    from fakeprint.engine.training.train import train

    cfg = load_config("demo", {"epochs": 1, "progress": False, "batch_size": 25, "threads": 1, "workers": 1,
                               "selection_fraction": 0.2, "ema": 0})
    summary = train(tiny_data, cfg, tmp_path / "run")
    assert "official validation split" in summary["split"] and "selection split" in summary["split"]
    assert "selection_note" in summary


def test_the_training_path_moves_relus_after_pools_and_keeps_the_checkpoint_layout():
    """``place_model`` (what ``fakeprint train`` and the recipe study build) runs ``relu_after_pool``: its state
    dict has the keys a freshly built model of the config has, so its checkpoints load as before."""
    from fakeprint.engine.training.setup import build_model, place_model

    cfg = load_config("threecnn")
    model = place_model(cfg, torch.device("cpu"), 5)
    assert list(model.state_dict()) == list(build_model(cfg, 5).state_dict())
    pools = [s for s in model.modules() if isinstance(s, nn.Sequential) and len(s) == 2
             and isinstance(s[0], nn.MaxPool2d) and isinstance(s[1], nn.ReLU)]
    assert len(pools) == 3
