"""`fakeprint label-issues`: folds, cleanlab ranking, and the whole search end to end on a tiny dataset."""

import csv

import numpy as np
import pytest

from conftest import make_train_only
from fakeprint.core.errors import FakeprintError
from fakeprint.interfaces.cli import main
from fakeprint.studies.label_issues import find_issues, fold_indices, rank_label_issues

FAST = {"epochs": 1, "model_args": {"width": 4}, "progress": False, "threads": 1, "workers": 1, "batch_size": 16}



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_only(tmp_path_factory.mktemp("li") / "data", n_train=60, seed=4)


def test_folds_hold_every_image_out_exactly_once_and_are_stratified():
    labels = np.repeat(np.arange(5), [10, 10, 10, 10, 20])
    folds = fold_indices(labels, 5, seed=0)
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(labels)))
    for tr, h in folds:
        assert not set(tr) & set(h)
        assert np.bincount(labels[h], minlength=5).tolist() == [2, 2, 2, 2, 4]
    assert [h.tolist() for _, h in fold_indices(labels, 5, seed=0)] == [h.tolist() for _, h in folds]


def test_folds_refuse_too_few_images_per_class():
    with pytest.raises(FakeprintError, match="at least 3 images of every class"):
        fold_indices(np.array([0, 0, 0, 1, 1]), 3, seed=0)
    with pytest.raises(FakeprintError, match="at least 2"):
        fold_indices(np.array([0, 1]), 1, seed=0)


def test_cleanlab_ranks_confidently_contradicted_labels_first():
    rng = np.random.default_rng(0)
    n, k = 300, 5
    true = np.arange(n) % k
    probs = rng.dirichlet(np.ones(k) * 0.3, n) * 0.2
    probs[np.arange(n), true] += 0.8                 # a good model: ~0.85 on the true class
    given = true.copy()
    flipped = np.array([3, 50, 101, 202, 299])
    given[flipped] = (true[flipped] + 2) % k         # five wrong labels, the model sure of the true class
    probs[flipped] = 0.005
    probs[flipped, true[flipped]] = 0.98
    ranked = rank_label_issues(given, probs)
    assert set(ranked) == set(flipped)
    self_conf = probs[ranked, given[ranked]]
    assert np.all(np.diff(self_conf) >= 0)           # ranked by self-confidence, lowest first


def test_label_issues_end_to_end(data, tmp_path):
    out = tmp_path / "li"
    r = find_issues(data, out, folds=2, config="demo", overrides=FAST, log=lambda s: None)
    with open(data / "train.csv", newline="") as f:
        given = {row["image_id"]: int(row["label"]) for row in csv.DictReader(f)}
    with open(out / "label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "label_issues.csv", newline="") as f:
        assert f.readline().strip() == "image_id,given_label,suggested_label,self_confidence,rank"
    assert len(rows) == r["issues"] > 0   # a one-epoch model contradicts many labels: the checks below bite
    assert [int(x["rank"]) for x in rows] == list(range(1, len(rows) + 1))
    conf = [float(x["self_confidence"]) for x in rows]
    assert conf == sorted(conf)
    with open(out / "oof_probs.csv", newline="") as f:
        oof = {row["image_id"]: row for row in csv.DictReader(f)}
    assert set(oof) == set(given)                              # every image got an out-of-fold prediction
    for x in rows:
        assert int(x["given_label"]) == given[x["image_id"]]
        p = np.array([float(oof[x["image_id"]][f"p{c}"]) for c in range(5)])
        assert float(x["self_confidence"]) == pytest.approx(p[given[x["image_id"]]], abs=1e-5)
        assert int(x["suggested_label"]) == int(p.argmax())
    assert (out / "label_issues.png").read_bytes()[:4] == b"\x89PNG"
    # each fold model trained on the other fold only, and its decoded cache was cleaned up
    ids = []
    for f in range(2):
        with open(out / "folds" / str(f) / "data" / "train.csv", newline="") as fh:
            tr = {row["image_id"] for row in csv.DictReader(fh)}
        with open(out / "folds" / str(f) / "data" / "validation.csv", newline="") as fh:
            held = {row["image_id"] for row in csv.DictReader(fh)}
        assert not tr & held and tr | held == set(given)
        ids += sorted(held)
        assert not (out / "folds" / str(f) / "cache").exists()
    assert sorted(ids) == sorted(given)


def test_label_issues_cli_errors(data, tmp_path, capsys):
    assert main(["label-issues", "--data", str(data), "--folds", "1", "--out", str(tmp_path / "x")]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["label-issues", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "train.csv" in capsys.readouterr().err
