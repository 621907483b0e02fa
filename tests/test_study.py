"""`fakeprint study`: every study end to end at the hidden tiny scale, plus the combination rules."""

import csv
import json

import numpy as np
import pytest

from conftest import make_train_only
from fakeprint.core.errors import FakeprintError
from fakeprint.interfaces.cli import main
from fakeprint.studies.grids import STUDIES, get_grid
from fakeprint.studies.study import (
    combine_specialist,
    run_study,
    specialist_probability,
    tune_threshold,
)

COLUMNS = ["variant", "accuracy (%)", "macro F1", "class-4 recall", "training time (s)"]



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 images per class, no validation.csv: studies evaluate on the internal split."""
    return make_train_only(tmp_path_factory.mktemp("study") / "data", n_train=100, seed=2)


@pytest.fixture(scope="module")
def studies(data, tmp_path_factory):
    """Every study run once at the tiny scale (augmentation with two seeds)."""
    base = tmp_path_factory.mktemp("studies")
    return {name: (run_study(name, data, "tiny", base / name, seeds=2 if name == "augmentation" else 1,
                             log=lambda s: None), base / name) for name in STUDIES}


def _table(md: str) -> list[list[str]]:
    rows = [line for line in md.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


@pytest.mark.parametrize("name", list(STUDIES))
def test_study_writes_its_table_json_and_plots(name, studies):
    report, out = studies[name]
    grid = get_grid(name, "tiny")
    for f in ("study.md", "study.json", "accuracy.png", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "study.md").read_text()
    table = _table(md)
    assert table[0] == COLUMNS
    assert [r[0] for r in table[2:]] == [v.label for v in grid.variants]
    assert "internal split" in md
    saved = json.loads((out / "study.json").read_text())
    assert [v["id"] for v in saved["variants"]] == [v.id for v in grid.variants]
    assert saved["n_eval"] == 10  # 10% of 100 images, stratified
    assert "internal split** (10 images: 10% of train.csv" in md and saved["reused_runs"] == 0
    for v in saved["variants"]:
        for r in v["runs"]:
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["class4_recall"] <= 1.0
            cm = np.array(r["confusion_matrix"])
            assert cm.sum() == 10 and r["accuracy"] == pytest.approx(np.trace(cm) / 10)
            assert r["class4_recall"] == pytest.approx(cm[4, 4] / cm[4].sum())
    # one run folder per training run
    trained = [p for p in (out / "runs").glob("*/seed*") if (p / "summary.json").is_file()]
    assert len(trained) == grid.trainings() * saved["seeds"]


def test_study_rows_show_mean_and_spread_over_seeds(studies):
    report, out = studies["augmentation"]
    rows = _table((out / "study.md").read_text())[2:]
    assert all("±" in r[1] and "±" in r[2] for r in rows)
    for v in report["variants"]:
        accs = [r["accuracy"] for r in v["runs"]]
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        assert v["accuracy"]["mean"] == pytest.approx(np.mean(accs))
        assert v["accuracy"]["std"] == pytest.approx(np.std(accs, ddof=1))
    one_seed = _table((studies["residual"][1] / "study.md").read_text())[2:]
    assert not any("±" in c for r in one_seed for c in r)


def test_variants_get_their_overrides(studies):
    import yaml

    out = studies["augmentation"][1]
    none = yaml.safe_load((out / "runs" / "none" / "seed1" / "config.yaml").read_text())
    photo = yaml.safe_load((out / "runs" / "photometric" / "seed0" / "config.yaml").read_text())
    assert (none["hflip"], none["rotation"], none["color_jitter"], none["seed"]) == (False, 0.0, 0.0, 1)
    assert (photo["hflip"], photo["rotation"], photo["color_jitter"]) == (True, 15.0, 0.2)
    noskip = yaml.safe_load((studies["residual"][1] / "runs" / "noskip" / "seed0" / "config.yaml").read_text())
    assert noskip["model"] == "skipconcnn_narrow_noskip"
    c4 = studies["class4"][1] / "runs"
    assert yaml.safe_load((c4 / "focal" / "seed0" / "config.yaml").read_text())["loss"] == "focal"
    assert yaml.safe_load((c4 / "balanced" / "seed0" / "config.yaml").read_text())["sampler"] == "balanced"


def test_ensemble_uses_the_members_and_averaging_is_the_mean_of_their_probabilities(studies, data):
    import yaml

    from fakeprint.engine.evaluate import load_eval_split
    from fakeprint.engine.predict import load

    report, out = studies["ensemble"]
    runs = out / "runs"
    cfg = yaml.safe_load((runs / "ensemblecnn" / "seed0" / "config.yaml").read_text())
    assert cfg["base_checkpoints"] == [str(runs / "skipconcnn" / "seed0"), str(runs / "threecnn" / "seed0")]
    split = load_eval_split(data, "internal", runs / "skipconcnn" / "seed0", progress=False)
    p = (load(runs / "skipconcnn" / "seed0").predict(split.images).probs
         + load(runs / "threecnn" / "seed0").predict(split.images).probs) / 2
    avg = next(v for v in report["variants"] if v["id"] == "average")
    assert avg["accuracy"]["mean"] == pytest.approx(float((p.argmax(1) == split.labels).mean()))
    members = [v["train_time_s"]["mean"] for v in report["variants"] if v["id"] in ("skipconcnn", "threecnn")]
    assert avg["train_time_s"]["mean"] == pytest.approx(sum(members))


def test_averaging_takes_the_argmax_of_the_mean_probability(monkeypatch, data):
    from fakeprint.data.cache import SplitData
    from fakeprint.studies import study

    labels = np.array([0, 1, 2])
    split = SplitData("internal", data, ["a", "b", "c"], labels, np.zeros((3, 100, 100, 3), np.uint8))
    monkeypatch.setattr("fakeprint.studies.study.load_eval_split", lambda *a, **k: split)
    pa = np.array([[0.6, 0.4, 0, 0, 0], [0.55, 0.45, 0, 0, 0], [0, 0, 0.6, 0.4, 0]])      # right, wrong, right
    pb = np.array([[0.45, 0.55, 0, 0, 0], [0.1, 0.9, 0, 0, 0], [0, 0, 0.45, 0.55, 0]])    # wrong, right, wrong
    monkeypatch.setattr(study, "_probs", lambda run, images: {"A": pa, "B": pb}[run])
    members = [{"run": r, "seed": 0, "train_time_s": t, "split": "internal split: 3 images"} for r, t in
               (("A", 1.0), ("B", 2.0))]
    r = study.average_members(data, members, ["A", "B"])
    assert r["accuracy"] == 1.0 and r["train_time_s"] == 3.0 and r["own_train_time_s"] == 0.0


def test_specialist_trains_on_the_baselines_training_part_with_binary_labels(studies, data):
    out = studies["class4"][1]
    with open(out / "runs" / "baseline" / "seed0" / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    view = out / "data-class4-vs-rest"
    for part, subset in (("train", "train"), ("validation", "internal")):
        with open(view / f"{part}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        expect = [(r["image_id"], "4" if r["label"] == "4" else "0") for r in split if r["subset"] == subset]
        assert [(r["image_id"], r["label"]) for r in rows] == expect
    spec = next(v for v in studies["class4"][0]["variants"] if v["id"] == "specialist")["runs"][0]
    assert spec["threshold"] in [round(t, 2) for t in np.arange(0.05, 1.0, 0.05)] + [1.0]
    assert "predict 4 where" in spec["detail"]
    # the reported confusion matrix is the documented rule applied to the two saved models
    from fakeprint.engine.evaluate import load_eval_split
    from fakeprint.engine.predict import load

    base = out / "runs" / "baseline" / "seed0"
    held = load_eval_split(data, "internal", base, progress=False)
    p4 = specialist_probability(load(out / "runs" / "specialist" / "seed0").predict(held.images).probs)
    pred = combine_specialist(load(base).predict(held.images).probs, p4, spec["threshold"])
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (held.labels, pred), 1)
    assert cm.tolist() == spec["confusion_matrix"]


def test_combination_rule_and_threshold_tuning():
    main = np.array([[0.9, 0.05, 0.0, 0.0, 0.05], [0.1, 0.8, 0.0, 0.0, 0.1], [0.6, 0.0, 0.0, 0.0, 0.4]])
    spec = np.array([[0.9, 0, 0, 0, 0.1], [0.3, 0, 0, 0, 0.7], [0.1, 0, 0, 0, 0.3]])  # labels 0 (rest) / 4
    p4 = specialist_probability(spec)
    assert p4 == pytest.approx([0.1, 0.7, 0.75])
    assert combine_specialist(main, p4, 0.72).tolist() == [0, 1, 4]
    assert combine_specialist(main, p4, 1.0).tolist() == [0, 1, 0]
    # truth [0, 1, 4]: any threshold in [0.70, 0.75) fixes the third image only; the highest such is chosen
    assert tune_threshold(main, p4, np.array([0, 1, 4])) == (0.7, 1.0)
    # when overriding never helps, the threshold is 1.0 (never override)
    assert tune_threshold(main, p4, np.array([0, 1, 0]))[0] == 1.0


def test_rerun_reuses_finished_runs_and_refuses_a_changed_config(studies, data):
    out = studies["failed"][1]
    best = out / "runs" / "fiveconv" / "seed0" / "best.safetensors"
    before = best.stat().st_mtime_ns
    again = run_study("failed", data, "tiny", out, log=lambda s: None)
    assert best.stat().st_mtime_ns == before
    assert again["reused_runs"] == again["training_runs"] == get_grid("failed", "tiny").trainings()
    assert "5 of 5 runs reused" in (out / "study.md").read_text()
    assert [v["accuracy"] for v in again["variants"]] == [v["accuracy"] for v in studies["failed"][0]["variants"]]
    # a run killed before its summary was written is continued, not retrained
    (out / "runs" / "fiveconv" / "seed0" / "summary.json").unlink()
    third = run_study("failed", data, "tiny", out, log=lambda s: None)
    assert (out / "runs" / "fiveconv" / "seed0" / "summary.json").is_file()
    assert best.stat().st_mtime_ns == before and third["reused_runs"] == again["training_runs"] - 1
    assert [v["accuracy"] for v in third["variants"]] == [v["accuracy"] for v in again["variants"]]
    with pytest.raises(FakeprintError, match="another config"):
        run_study("failed", data, "tiny", out, extra={"lr": 0.123}, log=lambda s: None)


def test_cli_study_and_its_errors(studies, data, capsys):
    out = studies["class4"][1]
    assert main(["study", "class4", "--data", str(data), "--scale", "tiny", "--out", str(out)]) == 0
    assert "| variant | accuracy (%) |" in capsys.readouterr().out
    assert main(["study", "residual", "--data", str(data), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3 training run(s)" in text and "skipconcnn_narrow_noskip" in text
    assert main(["study", "failed", "--data", str(data), "--scale", "full", "--dry-run"]) == 0
    assert "11 training run(s)" in capsys.readouterr().out
    assert main(["study", "class4", "--data", str(data / "nope"), "--scale", "tiny"]) == 2
    assert "train.csv: file not found" in capsys.readouterr().err
    assert main(["study", "class4", "--data", str(data), "--seeds", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["study", "nosuchstudy", "--data", str(data)])
