"""The recipe study and what it is built from: MixUp/CutMix, stochastic depth, EMA warm-up, dihedral TTA
recorded in checkpoints and applied by default, and figures that say how they were measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

import fakeprint
from conftest import FAST_TRAIN
from conftest_service import make_checkpoint, random_images
from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import load_config
from fakeprint.engine.training.ema import EMA
from fakeprint.features.augment import mix_batch
from fakeprint.features.preprocess import tta_mode, tta_views
from fakeprint.models.layers import ResidualBlock
from fakeprint.studies.recipes import candidates, plan_epochs

# ------------------------------------------------------------------------------------ mixing, layers

def test_cutmix_pastes_one_box_and_its_area_is_the_target_weight():
    x = torch.rand(6, 3, 20, 20)
    g = torch.Generator().manual_seed(3)
    out, perm, lam = mix_batch(x, {"cutmix": 1.0}, g)
    assert perm is not None and 0.0 <= lam <= 1.0
    from_other = (out != x).any(1)  # pixels that came from the shuffled copy (where it differs)
    same_as_perm = torch.isclose(out, x[perm]).all(1)
    assert ((~from_other) | same_as_perm).all()
    pasted = (torch.isclose(out, x[perm]).all(1) & ~torch.isclose(x, x[perm]).all(1)).float()
    moved = (perm != torch.arange(6))
    assert pasted[moved].mean(dim=(1, 2)).allclose(torch.full((int(moved.sum()),), 1.0 - lam), atol=1e-6)
    # the same generator state gives the same mix (runs are reproducible and resumable)
    again = mix_batch(x, {"cutmix": 1.0}, torch.Generator().manual_seed(3))
    assert torch.equal(again[0], out) and again[2] == lam


def test_mixup_blends_and_mix_prob_zero_leaves_the_batch_alone():
    x = torch.rand(5, 3, 8, 8)
    out, perm, lam = mix_batch(x, {"mixup": 0.4}, torch.Generator().manual_seed(1))
    assert torch.allclose(out, lam * x + (1 - lam) * x[perm])
    out, perm, lam = mix_batch(x, {"mixup": 0.4, "mix_prob": 0.0}, torch.Generator().manual_seed(1))
    assert perm is None and lam == 1.0 and out is x
    assert mix_batch(x, {}, torch.Generator())[1] is None


def test_stochastic_depth_drops_whole_residual_branches_in_training_only():
    torch.manual_seed(0)
    block = ResidualBlock(8, 8, drop_path=0.9)
    x = torch.randn(64, 8, 6, 6)
    block.train()
    out = block(x)
    dropped = torch.isclose(out, torch.relu(x)).flatten(1).all(1)
    assert 30 < int(dropped.sum()) < 64  # about 90% of the samples keep only the shortcut
    block.eval()
    plain = ResidualBlock(8, 8)
    plain.load_state_dict(block.state_dict())
    assert torch.allclose(block(x), plain.eval()(x))


def test_ema_warmup_tracks_the_model_from_the_first_step():
    model = torch.nn.Linear(4, 2)
    warm, cold = EMA(model, 0.999, warmup=True), EMA(model, 0.999, warmup=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    warm.update(model)
    cold.update(model)
    # update 0 of the warm-up uses decay min(0.999, 1/10) = 0.1: the average moves 90% of the way
    assert torch.allclose(warm.model.weight, start + 0.9)
    assert torch.allclose(cold.model.weight, start + 0.001)
    assert warm.current_decay() == pytest.approx(2 / 11)


# ------------------------------------------------------------------------------ test-time augmentation

def test_tta_modes_and_dihedral_views():
    assert tta_mode(True) == "flip" and tta_mode(False) == "none" and tta_mode("dihedral") == "dihedral"
    with pytest.raises(FakeprintError, match="tta must be"):
        tta_mode("sideways")
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    views = tta_views(x, "dihedral")
    assert len(views) == 8 and len({v.numpy().tobytes() for v in views}) == 8
    assert len(tta_views(x, "flip")) == 2 and tta_views(x, "none")[0] is x
    assert load_config("fpnet_cpu", {"tta": True})["tta"] == "flip"
    with pytest.raises(FakeprintError, match="config: tta"):
        load_config(None, {"tta": "sometimes"})


def test_a_checkpoint_applies_its_own_tta_by_default(tmp_path, cli):
    run = make_checkpoint(tmp_path, sharpen=8.0, seed=5, tta="dihedral")
    clf = fakeprint.load(run)
    assert clf.tta == "dihedral"
    images = random_images(6, seed=2)
    default = clf.predict(images).probs
    np.testing.assert_allclose(default, clf.predict(images, tta="dihedral").probs, atol=1e-6)
    assert np.abs(default - clf.predict(images, tta="none").probs).max() > 1e-3
    # the dihedral average by hand: the same number as the model's predict
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = sum(clf.model(torch.rot90(v, k, (2, 3))) for k in range(4) for v in (x, x.flip(3))) / 8
    np.testing.assert_allclose(default, logits.softmax(1).numpy(), atol=1e-5)
    # the CLI: the checkpoint's TTA by default, --no-tta to turn it off
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(images[0]).save(path)
    on = json.loads(cli("predict", str(run), str(path), "--json").stdout)[0]["probabilities"]
    off = json.loads(cli("predict", str(run), str(path), "--json", "--no-tta").stdout)[0]["probabilities"]
    assert abs(on["0"] - float(default[0, 0])) < 1e-5 and abs(off["0"] - on["0"]) > 1e-4


def test_the_service_reports_the_held_out_figure_and_applies_the_tta(tmp_path):
    from fastapi.testclient import TestClient

    from fakeprint.interfaces.serve import build_service, create_app

    held = {"accuracy": 0.875, "split": "internal split: 1250 images", "selection": "last epoch", "tta": "flip",
            "how": "this model, on images it never trained on"}
    run = make_checkpoint(tmp_path, metrics={"val_acc": 0.999}, held_out=held, tta="flip")
    with TestClient(create_app(build_service(run))) as client:
        info = client.get("/v1/model").json()
    assert info["held_out"] == held and info["tta"] == "flip"


# ----------------------------------------------------------------------------------------- the study

def test_plan_and_candidates():
    assert plan_epochs(20, 120.0, 11250) == 12 and plan_epochs(0.01, 1.0, 10_000) == 1
    ids = [r.id for r in candidates()]
    assert ids[0] == "baseline" and len(ids) == len(set(ids)) >= 12
    with pytest.raises(FakeprintError, match="unknown recipe"):
        candidates(["baseline", "nope"])
    with pytest.raises(FakeprintError, match="needs its members"):
        candidates(["ensemble_reg"])
    from fakeprint.studies.recipes import recipe_config

    w32 = recipe_config(candidates(["dilated_w32"])[0], None)  # the shipped default's preset, as a candidate
    assert w32["model_args"] == {"width": 32, "c3": 128} and w32["epochs"] == 69
    assert w32["early_stop"] == 0 and w32["progress"] is False and w32["tta"] == "flip"


def test_speed_probe_can_run_for_a_time_from_a_start_time():
    import time

    from fakeprint.studies.recipes import measure_speed, recipe_config

    cfg = recipe_config(candidates(["baseline"])[0], {"threads": 1}, tiny=True)
    start = time.time() + 0.3
    ips = measure_speed(cfg, steps=2, seconds=0.5, start_at=start)
    assert ips > 0 and time.time() >= start + 0.5  # waited for the start, then timed at least the period


@pytest.mark.slow
def test_recipe_study_end_to_end(cli, tiny_train_only, tmp_path):
    out = tmp_path / "study"
    args = ["study", "recipes", "--data", str(tiny_train_only), "--scale", "tiny", "--budget-minutes", "0.01",
            "--only", "baseline,cutmix,translate,rot15_bilinear,ensemble_reg", "--out", str(out)]
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "recipes.json").read_text())
    rows = {r["id"]: r for r in report["candidates"]}
    assert list(rows) == ["baseline", "cutmix", "translate", "rot15_bilinear", "ensemble_reg"]
    assert report["selection"] == "last epoch (no selection)" and "internal split" in report["split"]
    for r in rows.values():
        assert set(r["tta"]) == {"none", "flip", "dihedral", "own"} and r["n"] == 10
        for m in r["tta"].values():
            assert np.asarray(m["confusion_matrix"]).sum() == 10 and 0 <= m["accuracy"] <= 1
    base = rows["baseline"]
    # "own": the views the model was trained with (the baseline: all eight flips and turns)
    assert base["tta"]["own"]["views"] == "dihedral"
    assert base["tta"]["own"]["accuracy"] == base["tta"]["dihedral"]["accuracy"]
    assert base["epochs"] == report["candidates"][0]["planned"]["epochs"] >= 1
    assert base["train_part_images"] == 90 and 0 <= base["train_part_accuracy"] <= 1
    assert yaml.safe_load((out / "runs" / "cutmix" / "config.yaml").read_text())["cutmix"] == 1.0
    md = (out / "recipes.md").read_text()
    assert "last epoch" in md and "| + CutMix (alpha 1) |" in md and "(sum)" in md
    # again: every run and the plan are reused, the table is the same
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "recipes.json").read_text())["candidates"] == report["candidates"]
    wrong = cli(*[a if a != "0.01" else "0.02" for a in args])
    assert wrong.returncode == 2 and "budget" in wrong.stderr


def test_recipe_study_refuses_flags_that_do_not_apply(cli, tiny_train_only, tmp_path):
    proc = cli("study", "recipes", "--data", str(tiny_train_only), "--out", str(tmp_path / "s"))
    assert proc.returncode == 2 and "--budget-minutes" in proc.stderr
    proc = cli("study", "augmentation", "--data", str(tiny_train_only), "--budget-minutes", "3")
    assert proc.returncode == 2 and "recipes study only" in proc.stderr


# ------------------------------------------------------------------------------- honest run figures

def test_a_run_reports_its_last_epoch_and_labels_the_best_one(cli, tiny_train_only, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--data", str(tiny_train_only), *FAST_TRAIN, "--set", "tta=flip", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"] == "last epoch" and metrics["epoch"] == 2 and metrics["tta"] == "flip"
    last = json.loads((run / "last.json").read_text())
    assert last["held_out"]["selection"] == "last epoch" and last["held_out"]["n"] == 10 and last["tta"] == "flip"
    best = json.loads((run / "best.json").read_text())
    assert "optimistic" in best["held_out"]["selection"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"] == "last epoch" and "optimistic" in summary["best_val_acc_note"]
    assert fakeprint.load(run).path.name == "last.safetensors"  # a run folder means its reported checkpoint


def test_label_issues_refuses_a_schedule_steered_by_the_held_out_fold(tiny_train_only, tmp_path):
    from fakeprint.studies.label_issues import find_issues

    with pytest.raises(FakeprintError, match="held-out"):
        find_issues(tiny_train_only, tmp_path / "li", folds=2, overrides={"scheduler": "plateau"})


def test_distillation_trains_towards_the_teachers_and_refuses_a_leaky_teacher(tiny_train_only, tmp_path):
    from fakeprint.engine.training.distill import distill_loss, distill_target
    from fakeprint.engine.training.train import train

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.0, 0.0]])
    same = distill_loss(logits, distill_target(logits.clone(), None, 1.0, 2.0), torch.tensor(0.0), 1.0, 2.0)
    teacher = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0]])
    other = distill_loss(logits, distill_target(teacher, None, 1.0, 2.0), torch.tensor(0.0), 1.0, 2.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6) and other.item() > 0.5
    pair = torch.cat([logits, teacher])  # under MixUp the targets mix like the images: lam of one, 1 - lam of the other
    mixed = distill_target(pair, torch.tensor([1, 0]), 0.25, 2.0)
    torch.testing.assert_close(mixed[0], 0.25 * torch.softmax(logits[0] / 2, 0) + 0.75 * torch.softmax(teacher[0] / 2, 0))
    base = {"epochs": 1, "progress": False, "batch_size": 25, "threads": 1, "workers": 1}
    teacher = tmp_path / "teacher"
    train(tiny_train_only, load_config("demo", base), teacher)
    student = train(tiny_train_only, load_config("demo", base | {"distill_from": [str(teacher / "last.safetensors")]}),
                    tmp_path / "student")
    assert student["epochs_run"] == 1 and 0 <= student["accuracy"] <= 1
    leaky = tmp_path / "leaky"
    train(tiny_train_only, load_config("demo", base | {"train_on_all": True}), leaky)
    with pytest.raises(FakeprintError, match="held-out images"):
        train(tiny_train_only, load_config("demo", base | {"distill_from": [str(leaky / "last.safetensors")]}),
              tmp_path / "s2")
    with pytest.raises(FakeprintError, match="list them before it"):
        candidates(["distill_reg", "baseline", "cutmix", "translate", "rot15_bilinear"])


def test_teachers_are_asked_only_about_the_views_they_were_trained_on(tmp_path):
    """A teacher trained with horizontal flips only is averaged over the image and its mirror, one trained with
    all flips and turns over the eight views (asking the first about quarter turns cost 13 points once)."""
    from fakeprint.engine.predict import load
    from fakeprint.engine.runtime import predict_logits
    from fakeprint.engine.training.distill import teacher_logits, teacher_views

    assert teacher_views({"hflip": True, "vflip": False, "rot90": False}) == "flip"
    assert teacher_views({"hflip": True, "vflip": True, "rot90": True}) == "dihedral"
    assert teacher_views({"hflip": False}) == "none"
    images = torch.from_numpy(random_images(6))
    cfg = load_config("demo", {"progress": False, "amp": "off"})  # fp32: the same on CPUs with and without bf16
    for aug, views in (({"hflip": True, "vflip": False, "rot90": False}, "flip"),
                       ({"hflip": True, "vflip": True, "rot90": True}, "dihedral")):
        path = make_checkpoint(tmp_path / views, extra_meta={"config": cfg | aug}) / "best.safetensors"
        model = load(path).model
        want = predict_logits(model, images, torch.device("cpu"), batch_size=4, norm="imagenet", tta=views)
        other = predict_logits(model, images, torch.device("cpu"), batch_size=4, norm="imagenet",
                               tta="dihedral" if views == "flip" else "flip")
        got = teacher_logits([str(path)], images, torch.device("cpu"), cfg)
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, other, atol=1e-5)


def test_teacher_logits_are_kept_for_a_resume_and_recomputed_when_anything_changes(tmp_path, monkeypatch):
    from fakeprint.engine.training import distill
    from fakeprint.engine.training.distill import teacher_logits

    cfg = load_config("demo", {"progress": False})
    path = str(make_checkpoint(tmp_path / "t", extra_meta={"config": cfg}) / "best.safetensors")
    images = torch.from_numpy(random_images(6))
    cache = tmp_path / "teacher_logits.safetensors"
    first = teacher_logits([path], images, torch.device("cpu"), cfg, cache=cache)
    assert cache.is_file()
    calls = []
    real = distill.predict_logits
    monkeypatch.setattr(distill, "predict_logits", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = teacher_logits([path], images, torch.device("cpu"), cfg, cache=cache)
    assert torch.equal(again, first) and calls == []  # read back, not recomputed
    other = images.flip(1).contiguous()
    changed = teacher_logits([path], other, torch.device("cpu"), cfg, cache=cache)
    assert calls and not torch.allclose(changed, first)  # other images: recomputed, and the cache follows
    calls.clear()
    cache.write_bytes(b"not a safetensors file")
    torch.testing.assert_close(teacher_logits([path], other, torch.device("cpu"), cfg, cache=cache), changed)
    assert calls  # a damaged cache is recomputed, not trusted


# --------------------------------------------------------------------------------- honest confidence

def test_temperature_scaling_recovers_an_overconfident_model():
    from fakeprint.engine.calibration import calibrate, fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 5)) * 1.5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=row) for row in p])
    assert fit_temperature(z * 3.0, labels) == pytest.approx(3.0, rel=0.1)  # logits 3x too sharp
    cal = calibrate(z * 3.0, labels)
    assert cal["ece_after_cross_fitted"] < cal["ece_before"] / 2
    assert cal["flagged_share"] == pytest.approx(0.05, abs=0.01) and cal["n"] == 4000
    with pytest.raises(FakeprintError, match="at least 20"):
        calibrate(z[:5], labels[:5])


def test_a_calibrated_checkpoint_scales_its_probabilities_and_flags_low_scores(tmp_path, cli):
    from fakeprint.engine.runtime import predict_logits
    from fakeprint.models.checkpoint import update_metadata

    run = make_checkpoint(tmp_path, sharpen=8.0, seed=5)
    images = random_images(8, seed=4)
    raw = fakeprint.load(run)
    assert raw.predict(images).uncertain is None  # no calibration: nothing is claimed
    logits = predict_logits(raw.model, images, raw.device).numpy()
    top = np.sort((np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)).max(1))
    update_metadata(run, {"calibration": {"temperature": 2.0, "uncertain_below": float(top[3] + 1e-6)}})
    clf = fakeprint.load(run)
    pred = clf.predict(images)
    want = np.exp(logits / 2) / np.exp(logits / 2).sum(1, keepdims=True)
    np.testing.assert_allclose(pred.probs, want, atol=1e-5)
    assert pred.uncertain.sum() == 4 and pred.as_dicts()[0]["uncertain"] in (True, False)
    from PIL import Image

    flagged = int(np.argmax(pred.uncertain))
    path = tmp_path / "u.png"
    Image.fromarray(images[flagged]).save(path)
    out = cli("predict", str(run), str(path))
    assert out.returncode == 0 and out.stdout.strip().endswith("\tuncertain (low_confidence)"), out.stderr
    from fastapi.testclient import TestClient

    from fakeprint.interfaces.serve import build_service, create_app

    with TestClient(create_app(build_service(run))) as client:
        r = client.post("/v1/predict", files=[("files", ("u.png", path.read_bytes(), "image/png"))]).json()
        assert r["results"][0]["uncertain"] is True
        assert client.get("/v1/model").json()["calibration"]["temperature"] == 2.0


def test_training_calibrates_its_last_checkpoint_and_calibrate_refuses_training_images(cli, tiny_train_only, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", "--data", str(tiny_train_only), *FAST_TRAIN, "--set", "val_fraction=0.3", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    cal = json.loads((run / "last.json").read_text())["calibration"]
    assert cal["n"] == 30 and cal["temperature"] > 0 and "internal split" in cal["split"]
    proc = cli("calibrate", str(run), "--data", str(tiny_train_only))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["flagged_share_probes"]) == {"plain colour", "noise", "demo (synthetic generators)"}
    proc = cli("calibrate", "default", "--data", str(tiny_train_only), "--split", "validation")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
