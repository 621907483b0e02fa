"""The models shipped inside the package (``default``, ``accurate``, ``fast``) load by name and predict as they did
when they were shipped; ``default`` also with no path at all."""

import sys
from pathlib import Path

import numpy as np
import pytest

import fakeprint
from fakeprint.engine.predict import default_model_path
from fakeprint.models.checkpoint import SHIPPED_NAMES, shipped_model_path

pytestmark = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
SHIPPED = [n for n in SHIPPED_NAMES if shipped_model_path(n) is not None]
each_shipped = pytest.mark.parametrize("name", SHIPPED)


@each_shipped
def test_shipped_models_are_small_and_load_by_name(name):
    path = shipped_model_path(name)
    assert path.stat().st_size <= 15 * 1024 * 1024
    clf = fakeprint.load(name)
    assert clf.meta["num_classes"] == 5 and clf.path == path
    assert fakeprint.load().path == default_model_path()


def test_the_models_are_shipped_and_accurate_names_the_most_accurate():
    assert SHIPPED == ["default", "accurate", "fast", "robust"]
    assert len({shipped_model_path(n) for n in SHIPPED}) == 4
    figures = {n: fakeprint.load(n).meta["held_out"]["accuracy"] for n in SHIPPED}
    assert figures["accurate"] == max(figures.values())


def test_the_default_has_the_highest_class_4_recall_shipped():
    """Since round 12 the default has a deeper statistics head (two hidden layers): its class-4 recall, the report's
    weak spot, is the highest of the shipped models (``accurate``, with more statistics since round 13, is 0.8 points
    more accurate overall, 0.016 lower on class 4), and at least the issue's 0.88."""
    recall = {n: fakeprint.load(n).meta["held_out"]["recall"][4] for n in SHIPPED}
    assert recall["default"] == max(recall.values()) and recall["default"] >= 0.88


@each_shipped
def test_shipped_models_claim_only_a_held_out_figure(name):
    """Its figure is one on images a model never trained on, labelled; no figure on its own training images."""
    meta = fakeprint.load(name).meta
    held = meta["held_out"]
    assert held["n"] == 1250 and 0.2 < held["accuracy"] < 1.0 and held["how"] and held["selection"] == "last epoch"
    assert "internal split" in held["split"]
    if meta["config"]["train_on_all"]:  # trained on the internal split itself: no figure of its own may be shown
        assert not meta["metrics"] and "same recipe" in held["how"]
    else:  # its own figure: `fakeprint evaluate NAME --data DIR` finds the split again and reproduces it
        assert len(held["internal_ids_sha256"]) == 64 and "never trained on" in held["how"]
    assert fakeprint.load(name).tta == held["tta"] == meta["self_test"]["tta"]


@each_shipped
def test_shipped_models_reproduce_their_self_test_on_generated_images(name):
    from ship_default_model import self_test_images

    clf = fakeprint.load(name)
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
    assert "routed.ensemble.json" in proc.stderr  # the shipped default: routed (docs/results.md)


def test_load_without_a_name_is_routed_and_the_checkpoint_default_where_routed_is_not_shipped(monkeypatch):
    """``fakeprint.load()`` answers files of unknown history: ``default`` for files that look pristine, ``robust``
    for the others; a package that ships no routed ensemble falls back to the checkpoint ``default``."""
    import fakeprint.engine.predict as predict_mod
    from fakeprint.engine.predict import RoutedClassifier

    clf = fakeprint.load()
    assert isinstance(clf, RoutedClassifier) and default_model_path().name == "routed.ensemble.json"
    assert [m.path for m in clf.members] == [shipped_model_path("default"), shipped_model_path("robust")]
    monkeypatch.setattr(predict_mod, "shipped_ensemble_path", lambda name: None)
    assert default_model_path() == shipped_model_path("default") == fakeprint.load().path


@each_shipped
def test_shipped_models_are_calibrated_on_images_they_never_saw_and_flag_uncertain_predictions(name):
    """Temperature and uncertain threshold come from the internal split of the model's own run, or for a model
    trained on every image from a held-out run of its own recipe (same test-time augmentation); every
    prediction carries the flag."""
    clf = fakeprint.load(name)
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


def test_the_shipped_models_by_name_on_the_command_line(cli, tmp_path):
    from PIL import Image

    from fakeprint.data.demo import render

    path = tmp_path / "gen.png"
    Image.fromarray(render(1, np.random.default_rng(3))).save(path)
    proc = cli("predict", "accurate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "accurate.safetensors" in proc.stderr and "hybrid" in proc.stderr  # feature set v5 since round 13
    proc = cli("predict", "fast", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "fast.safetensors" in proc.stderr and "threecnn" in proc.stderr
    proc = cli("predict", "nosuchmodel", str(path))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr


SHIPPED_PRESETS = {"default": "default", "accurate": "accurate", "fast": "fast", "robust": "robust"}  # by name


@pytest.mark.parametrize(("name", "preset"), SHIPPED_PRESETS.items())
def test_shipped_models_were_trained_with_their_presets(name, preset):
    """The model card names a preset for each shipped model: its metadata's config is that preset (apart from
    settings that only say how the run was executed), and its figure is its own, on the held-out split."""
    from fakeprint.engine.config import DEFAULTS, load_config

    meta = fakeprint.load(name).meta
    execution = {"threads", "workers", "progress", "max_minutes", "device"}
    # a setting added after the model was trained is absent from its metadata: it trained with its default
    trained = {k: meta["config"].get(k, DEFAULTS[k]) for k in DEFAULTS if k not in execution}
    assert trained == {k: v for k, v in load_config(preset).items() if k not in execution}
    assert meta["held_out"]["selection"] == "last epoch" and meta["held_out"]["tta"] == meta["tta"] == "flip"
    assert meta["held_out"]["how"] == "this model, on images it never trained on"


def test_the_preset_list_names_the_shipped_models_recipes():
    """``fakeprint train --list-presets`` says which preset each shipped model was trained with, and no other preset
    claims to be a shipped model's recipe (the list once called the CNN alone "the default model's recipe" two
    defaults later)."""
    import re

    from fakeprint.engine.config import preset_names, preset_summary

    for preset in preset_names():
        claims = set(re.findall(r"`?(\w+)`? model's recipe", preset_summary(preset)))
        assert claims == {n for n, p in SHIPPED_PRESETS.items() if p == preset}, preset
        assert "shipped default" not in preset_summary(preset).lower(), preset


def test_the_model_list_calls_no_family_shipped_that_is_not():
    """``fakeprint models`` describes each registered model in one line; one that says "shipped" must be the
    family of a model shipped now (the list called ``fpnet_s2d`` "the shipped model" eight rounds after it was
    replaced)."""
    from fakeprint.engine.config import load_config
    from fakeprint.models.registry import describe, list_models

    families = {load_config(p)["model"] for p in SHIPPED_PRESETS.values()}
    for name in list_models():
        description = describe(name)
        if "shipped" in description.lower() and "shipped until" not in description.lower():
            assert name in families, (name, description)
