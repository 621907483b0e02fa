"""The model shipped inside the package loads with no path and predicts as it did when it was shipped."""

import sys
from pathlib import Path

import numpy as np
import pytest

import fakeprint
from fakeprint.predict import default_model_path

pytestmark = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))


def test_default_model_is_small_and_documented():
    path = default_model_path()
    assert path.stat().st_size <= 15 * 1024 * 1024
    clf = fakeprint.load()
    assert clf.meta["num_classes"] == 5


def test_default_model_claims_only_a_held_out_figure():
    """Its figure is one on images a model never trained on, labelled; no figure on its own training images."""
    meta = fakeprint.load().meta
    held = meta["held_out"]
    assert held["n"] == 1250 and 0.2 < held["accuracy"] < 1.0 and held["how"] and held["selection"] == "last epoch"
    assert "internal split" in held["split"]
    if meta["config"]["train_on_all"]:  # trained on the internal split itself: no figure of its own may be shown
        assert not meta["metrics"] and "same recipe" in held["how"]
    assert fakeprint.load().tta == held["tta"] == meta["self_test"]["tta"]


def test_default_model_reproduces_its_self_test_on_generated_images():
    from ship_default_model import self_test_images

    clf = fakeprint.load()
    pred = clf.predict(self_test_images())
    expected = np.array(clf.meta["self_test"]["probs"])
    assert pred.probs.shape == (5, 5)
    np.testing.assert_allclose(pred.probs, expected, atol=1e-4)
    assert (pred.labels == expected.argmax(1)).all()


def test_cli_predict_without_a_checkpoint_uses_the_default_model(cli, tmp_path):
    from PIL import Image

    from fakeprint.data.demo import render

    path = tmp_path / "gen.png"
    Image.fromarray(render(3, np.random.default_rng(7))).save(path)
    proc = cli("predict", str(path))
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().split("\t")
    assert line[0] == str(path) and line[1] in {"0", "1", "2", "3", "4"}
    assert "default.safetensors" in proc.stderr


def test_default_model_is_calibrated_on_images_it_never_saw_and_flags_uncertain_predictions():
    """Its temperature and uncertain threshold come from a held-out run of its own recipe (fitted on that run's
    internal split, with the same test-time augmentation), and every prediction carries the flag."""
    clf = fakeprint.load()
    cal = clf.meta["calibration"]
    assert cal["tta"] == clf.tta and cal["n"] == 1250 and "internal split" in cal["split"]
    if clf.meta["config"]["train_on_all"]:
        assert "same recipe" in cal["how"] and "trained without it" in cal["how"]
    assert 0.0 < cal["uncertain_below"] < 1.0 and cal["ece_after_cross_fitted"] < cal["ece_before"]
    assert set(cal["flagged_share_probes"]) == {"plain colour", "noise", "demo (synthetic generators)"}
    from ship_default_model import self_test_images

    pred = clf.predict(self_test_images())
    assert pred.uncertain is not None and pred.uncertain.dtype == bool
    assert ((pred.probs.max(1) < cal["uncertain_below"]) == pred.uncertain).all()
