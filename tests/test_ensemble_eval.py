"""Ensembles of any registered models: probability averaging over several checkpoints."""

import json

import numpy as np
import pytest
import torch

from fakeprint.core.errors import FakeprintError
from fakeprint.engine.predict import EnsembleClassifier, load
from fakeprint.models import create_model
from fakeprint.models.checkpoint import save_checkpoint


@pytest.fixture
def two_runs(tmp_path):
    runs = []
    for i, name in enumerate(("fpnet_tiny", "threecnn")):
        torch.manual_seed(i)
        save_checkpoint(tmp_path / f"run{i}" / "best", create_model(name), {"model": name, "num_classes": 5})
        runs.append(tmp_path / f"run{i}")
    return runs


def test_ensemble_averages_member_probabilities(two_runs):
    members = [load(r) for r in two_runs]
    ens = EnsembleClassifier(members)
    x = np.random.default_rng(0).integers(0, 256, (6, 100, 100, 3), dtype=np.uint8)
    expected = (members[0].predict(x).probs + members[1].predict(x).probs) / 2
    pred = ens.predict(x)
    np.testing.assert_allclose(pred.probs, expected, atol=1e-6)
    assert (pred.labels == expected.argmax(1)).all() and ens.name == "ensemble(fpnet_tiny, threecnn)"


def test_cli_evaluates_several_checkpoints_as_one_ensemble(cli, two_runs, tiny_data, tmp_path):
    proc = cli("evaluate", *map(str, two_runs), "--data", str(tiny_data), "--out", str(tmp_path / "ev"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n"] == 50 and len(m["checkpoint"]) == 2


def test_internal_split_must_be_shared_by_every_member(cli, two_runs, tiny_data, tmp_path):
    (two_runs[0] / "split.csv").write_text("image_id,label,subset\na,0,internal\n")
    (two_runs[1] / "split.csv").write_text("image_id,label,subset\nb,0,internal\n")
    proc = cli("evaluate", *map(str, two_runs), "--data", str(tiny_data), "--split", "internal", "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "different internal splits" in proc.stderr and "Traceback" not in proc.stderr


def test_ensemble_refuses_no_members():
    with pytest.raises(FakeprintError, match="at least one"):
        EnsembleClassifier([])


def test_an_ensemble_without_out_writes_to_the_working_directory(two_runs, tiny_data, tmp_path):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "fakeprint", "evaluate", *map(str, two_runs), "--data", str(tiny_data),
                           "--split", "validation", "--json"], capture_output=True, text=True, cwd=tmp_path,
                          env=os.environ | {"PYTHONUNBUFFERED": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "eval-validation-ensemble-of-2"
    assert json.loads(proc.stdout)["out"] == str(out) and (out / "metrics.json").is_file()


@pytest.mark.slow
def test_members_that_held_out_the_same_images_are_scored_together_however_each_records_them(cli, two_runs,
                                                                                             tiny_data, tmp_path):
    """A run folder lists its internal split in split.csv; a shipped model has no run folder and records a digest of
    the split's ids, recomputed from train.csv. The same images held out either way: one ensemble, scored on them
    (refused before: the check compared split.csv files, and a member without one never matched)."""
    from fakeprint.data.dataset import stratified_split
    from fakeprint.data.splits import internal_ids_digest

    rows = [line.split(",") for line in (tiny_data / "train.csv").read_text().splitlines()[1:]]
    ids, labels = [r[0] for r in rows], np.array([int(r[1]) for r in rows])
    tr, va = stratified_split(labels, 0.2, 3)
    held = [ids[i] for i in va]
    lines = [f"{ids[i]},{labels[i]},{'internal' if i in set(va) else 'train'}" for i in range(len(ids))]
    (two_runs[0] / "split.csv").write_text("image_id,label,subset\n" + "\n".join(lines) + "\n")
    shipped = tmp_path / "shipped"  # no split.csv beside it, as in src/fakeprint/weights
    torch.manual_seed(2)
    save_checkpoint(shipped / "best", create_model("threecnn"), {
        "model": "threecnn", "num_classes": 5, "config": {"val_fraction": 0.2, "split_seed": 3, "train_on_all": False},
        "held_out": {"internal_ids_sha256": internal_ids_digest(held)}})
    proc = cli("evaluate", str(two_runs[0]), str(shipped), "--data", str(tiny_data), "--split", "internal",
               "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == len(held) == 20
    # the same ids, in another order and beside a selection subset: the same split
    (two_runs[1] / "split.csv").write_text("image_id,label,subset\n" + "\n".join(reversed(lines)) + f"\n{ids[tr[0]]},"
                                           f"{labels[tr[0]]},selection\n")
    proc = cli("evaluate", *map(str, two_runs), str(shipped), "--data", str(tiny_data), "--split", "internal",
               "--out", str(tmp_path / "e3"))
    assert proc.returncode == 0, proc.stderr
    # a shipped-style member whose recorded split is another: refused, naming both
    save_checkpoint(shipped / "best", create_model("threecnn"), {
        "model": "threecnn", "num_classes": 5, "config": {"val_fraction": 0.2, "split_seed": 4, "train_on_all": False},
        "held_out": {"internal_ids_sha256": internal_ids_digest(
            [ids[i] for i in stratified_split(labels, 0.2, 4)[1]])}})
    proc = cli("evaluate", str(two_runs[0]), str(shipped), "--data", str(tiny_data), "--split", "internal",
               "--out", str(tmp_path / "e4"))
    assert proc.returncode == 2 and "different internal splits" in proc.stderr and str(shipped) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_ensemble_computes_the_statistics_once_for_members_whose_sets_begin_alike(tmp_path, monkeypatch):
    """default (v4) and accurate (v5): v4's groups begin v5's, so inside the ensemble the v4 member takes its
    statistics from the v5 member's (computed first whatever the order given) and the answer is unchanged."""
    from fakeprint.features.statistics import StatFeatures

    runs = []
    for i, fs in enumerate(("v4", "v5")):
        torch.manual_seed(i)
        args = {"width": 8, "c3": 16, "feature_set": fs, "hidden": 16}
        save_checkpoint(tmp_path / f"h{i}" / "best", create_model("hybrid", **args),
                        {"model": "hybrid", "num_classes": 5, "model_args": args, "tta": "flip"})
        runs.append(tmp_path / f"h{i}")
    members = [load(r) for r in runs]
    x = np.random.default_rng(1).integers(0, 256, (40, 100, 100, 3), dtype=np.uint8)
    alone = [m.predict(x).probs for m in members]
    computed = []
    for name in ("_forward", "_forward_and_mirror"):
        def counting(self, t, inner=getattr(StatFeatures, name)):
            computed.append(self.dim)
            return inner(self, t)

        monkeypatch.setattr(StatFeatures, name, counting)
    pred = EnsembleClassifier(members).predict(x, batch_size=32)
    np.testing.assert_allclose(pred.probs, (alone[0] + alone[1]) / 2, atol=1e-6)
    v5 = members[1].model.head.stats.dim
    assert computed and set(computed) == {v5}  # v4's never computed: taken from v5's, slice by slice
    computed.clear()
    members[0].predict(x)  # outside an ensemble nothing is shared
    assert computed and set(computed) == {members[0].model.head.stats.dim}


def test_shared_statistics_need_an_equal_input_and_the_same_normalisation():
    from fakeprint.features.stat_ops import shared_statistics
    from fakeprint.features.statistics import StatFeatures

    x = torch.randn(3, 3, 100, 100)
    v4, v5, v4_raw = StatFeatures("v4"), StatFeatures("v5"), StatFeatures("v4", input_norm="none")
    with torch.no_grad(), shared_statistics():
        big = v5(x)
        assert torch.equal(v4(x), big[:, :v4.dim])
        y = x.clone()
        y[0, 0, 0, 0] += 1.0  # one value differs: computed anew
        assert torch.equal(v4(y), StatFeatures("v4")._forward(y))
        assert torch.equal(v4_raw(x), StatFeatures("v4", input_norm="none")._forward(x))
        small = StatFeatures("v3")(x)  # a smaller set seen first does not serve a larger one
        assert small.shape[1] < v4.dim and torch.equal(StatFeatures("v7")(x), StatFeatures("v7")._forward(x))
