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
