"""The Python API: ``fakeprint.load(path).predict(images)`` (issue 6, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import fakeprint
from conftest_service import CLASSES, encode, make_checkpoint, one_thread, random_images  # noqa: F401
from fakeprint.core.errors import DataError, FakeprintError
from fakeprint.engine import predict as predict_mod
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD
from fakeprint.interfaces.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("api"), sharpen=8.0)


@pytest.fixture(scope="module")
def clf(run):
    return fakeprint.load(run)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return random_images(7, seed=3)


def reference_probs(model: torch.nn.Module, images: np.ndarray, flip: bool = False) -> np.ndarray:
    """Probabilities computed here, independently of fakeprint's preprocessing code."""
    x = images.astype(np.float64) / 255.0
    x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).float()
    with torch.no_grad():
        logits = model.eval()(x)
        if flip:
            logits = (logits + model(x.flip(3))) / 2
    return logits.softmax(1).numpy()


def test_load_accepts_every_spelling_of_a_checkpoint(run, images):
    probs = [fakeprint.load(p).predict(images).probs
             for p in (run, str(run), run / "best", run / "best.safetensors", run / "best.json")]
    for p in probs[1:]:
        np.testing.assert_array_equal(p, probs[0])


def test_load_reports_the_model_and_its_classes(clf, run):
    assert clf.name == "fpnet_tiny"
    assert clf.classes == CLASSES
    assert clf.path == run / "best.safetensors"  # the checkpoint file the run folder resolved to


def test_load_without_a_default_model_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(predict_mod, "default_model_path", lambda: None)
    with pytest.raises(FakeprintError, match="no default model.*pass a checkpoint path"):
        fakeprint.load()
    with pytest.raises(FakeprintError, match="no default model"):
        fakeprint.load(None)


def test_load_uses_the_shipped_default_model_when_there_is_one(monkeypatch, run, images):
    monkeypatch.setattr(predict_mod, "default_model_path", lambda: run / "best.safetensors")
    default = fakeprint.load()
    np.testing.assert_array_equal(default.predict(images).probs, fakeprint.load(run).predict(images).probs)


def test_load_of_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(FakeprintError, match="nope.*not found"):
        fakeprint.load(tmp_path / "nope")


def test_predictions_match_an_independent_reference(clf, images):
    pred = clf.predict(images)
    ref = reference_probs(clf.model, images)
    np.testing.assert_allclose(pred.probs, ref, atol=1e-5)
    np.testing.assert_array_equal(pred.labels, ref.argmax(1))
    assert pred.classes == CLASSES and len(pred) == len(images)
    assert pred.probs.shape == (7, 5) and pred.labels.dtype.kind == "i"


def test_prediction_runs_a_fused_copy_with_the_same_answers(run, images):
    """predict runs ``inference_model`` (BatchNorms folded, channels-last): the checkpoint's own network, whose
    running statistics are far from the identity, gives the same probabilities."""
    clf = fakeprint.load(run)
    bns = [m for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and any((bn.running_var - 1).abs().max() > 1e-2 for bn in bns)
    np.testing.assert_allclose(clf.predict(images).probs, reference_probs(clf.model, images), atol=1e-5)
    fast = clf.inference_model
    assert fast is not clf.model and fast is clf.inference_model  # built once
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.model.modules())  # the original is kept


def test_test_time_augmentation_averages_the_mirror(clf, images):
    np.testing.assert_allclose(clf.predict(images, tta=True).probs, reference_probs(clf.model, images, flip=True),
                               atol=1e-5)


def test_paths_pil_images_and_arrays_give_the_same_answer(clf, images, tmp_path):
    paths = []
    for i, im in enumerate(images[:3]):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(encode(im))
        paths.append(p)
    expected = clf.predict(images[:3]).probs
    variants = {
        "str paths": [str(p) for p in paths],
        "Path objects": paths,
        "PIL images": [Image.fromarray(a) for a in images[:3]],
        "list of arrays": list(images[:3]),
        "N x H x W x 3 array": images[:3],
        "mixed": [str(paths[0]), Image.fromarray(images[1]), images[2]],
    }
    for what, items in variants.items():
        np.testing.assert_array_equal(clf.predict(items).probs, expected, err_msg=what)
    # one image given on its own (not in a list) is one prediction
    for single in (str(paths[0]), paths[0], Image.fromarray(images[0]), images[0]):
        np.testing.assert_allclose(clf.predict(single).probs, expected[:1], atol=1e-6)  # batch of 1 vs 3


def test_other_modes_and_sizes_are_converted(clf):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (100, 100), dtype=np.uint8)
    as_rgb = np.repeat(gray[:, :, None], 3, axis=2)
    rgba = np.concatenate([as_rgb, np.full((100, 100, 1), 255, np.uint8)], axis=2)
    pred = clf.predict([gray, Image.fromarray(gray, "L"), as_rgb, rgba, Image.fromarray(rgba, "RGBA")])
    for row in pred.probs[1:]:
        np.testing.assert_allclose(row, pred.probs[0], atol=1e-6)
    big = rng.integers(0, 256, (37, 213, 3), dtype=np.uint8)
    palette = Image.fromarray(big).convert("P")
    pred = clf.predict([big, palette, Image.fromarray(big).convert("I;16")])
    assert pred.probs.shape == (3, 5)
    np.testing.assert_allclose(pred.probs.sum(1), 1, atol=1e-5)


def test_prediction_is_batched_internally(clf, images):
    calls: list[int] = []
    handle = clf.inference_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        small = clf.predict(images, batch_size=3)
        assert calls == [3, 3, 1]
        calls.clear()
        whole = clf.predict(images)
        assert calls == [7]
    finally:
        handle.remove()
    np.testing.assert_allclose(small.probs, whole.probs, atol=1e-6)


def test_the_network_sees_cache_sized_slices_with_the_same_answers(run, images):
    """On the CPU each batch goes through the network in slices (``inference.cpu_micro_batch``) that keep its
    activations in cache; the slicing changes nothing in the answers."""
    clf = fakeprint.load(run)
    whole = clf.predict(images, tta=True)
    clf.micro_batch = 2
    calls: list[int] = []
    handle = clf.inference_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        sliced = clf.predict(images, tta=True)
    finally:
        handle.remove()
    assert calls == [2, 2, 2, 1] * 2  # each of the two flip views
    np.testing.assert_allclose(sliced.probs, whole.probs, atol=1e-6)


def test_slice_size_follows_the_largest_activation_and_leaves_the_model_alone():
    from fakeprint.models.memory import CPU_SLICE_BYTES, cpu_micro_batch

    def net(width: int) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 5))

    wide, narrow = net(64), net(8)  # 64 x 100 x 100 floats = 2.56 MB an image; 8 channels: 320 KB
    wide.train()
    before = [t.clone() for t in wide.state_dict().values()]
    assert cpu_micro_batch(wide) == max(4, CPU_SLICE_BYTES // (64 * 100 * 100 * 4)) < cpu_micro_batch(narrow)
    assert cpu_micro_batch(narrow) == min(64, CPU_SLICE_BYTES // (8 * 100 * 100 * 4))
    assert wide.training and all(torch.equal(a, b) for a, b in zip(before, wide.state_dict().values(), strict=True))
    assert cpu_micro_batch(wide, (3, 20, 20)) == 64  # per image size: small images, whole slices of 64


def test_order_is_kept(clf, images):
    forward = clf.predict(images).probs
    backward = clf.predict(images[::-1].copy()).probs
    np.testing.assert_allclose(backward, forward[::-1], atol=1e-6)


def test_empty_input_gives_empty_predictions(clf):
    pred = clf.predict([])
    assert len(pred) == 0 and pred.probs.shape == (0, 5) and pred.as_dicts() == []


def test_as_dicts(clf, images):
    pred = clf.predict(images[:2])
    d = pred.as_dicts()
    assert [x["label_index"] for x in d] == pred.labels.tolist()  # one label type everywhere: name and index
    assert [x["label"] for x in d] == [CLASSES[i] for i in pred.labels]
    assert all(x["uncertain"] is None for x in d)  # an uncalibrated model claims nothing
    assert "fpnet_tiny" in repr(clf) and "tta=" in repr(clf)
    np.testing.assert_allclose(clf(images[:2]).probs, pred.probs)
    assert list(d[0]["probabilities"]) == CLASSES
    assert d[1]["probabilities"]["3"] == pytest.approx(float(pred.probs[1, 3]))
    json.dumps(d)  # plain JSON types


@pytest.mark.parametrize("bad, message", [
    (np.zeros((100, 100, 3), np.float32), "uint8"),
    (np.zeros((100, 100, 5), np.uint8), "shape"),
    (np.zeros((2, 3, 4, 100, 3), np.uint8), "shape"),
    (42, "expected a path, a PIL image or a uint8 array"),
])
def test_bad_inputs_are_clear_errors(clf, bad, message):
    with pytest.raises(FakeprintError, match=message):
        clf.predict([bad])


def test_missing_and_non_image_files_are_named(clf, tmp_path):
    with pytest.raises(DataError, match="missing.png.*not found"):
        clf.predict([tmp_path / "missing.png"])
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DataError, match="notes.png.*not an image"):
        clf.predict(str(tmp_path / "notes.png"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 160), w=st.integers(1, 160), channels=st.sampled_from([None, 3, 4]),
       seed=st.integers(0, 2**16))
def test_any_uint8_image_gives_a_distribution(clf, h, w, channels, seed):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels is None else (h, w, channels)
    pred = clf.predict([rng.integers(0, 256, shape, dtype=np.uint8)])
    assert pred.probs.shape == (1, 5)
    assert np.all(pred.probs >= 0) and pred.probs.sum() == pytest.approx(1, abs=1e-5)
    assert pred.labels[0] == pred.probs[0].argmax()


def test_cli_predict_json_agrees_with_the_api(run, clf, images, tmp_path, capsys):
    paths = []
    for i, im in enumerate(images[:2]):
        paths.append(tmp_path / f"c{i}.png")
        paths[-1].write_bytes(encode(im))
    assert main(["predict", str(run), *map(str, paths), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    pred = clf.predict(paths)
    assert [o["image"] for o in out] == [str(p) for p in paths]
    assert [o["label_index"] for o in out] == pred.labels.tolist()
    assert [o["label"] for o in out] == [CLASSES[i] for i in pred.labels] and all(len(o["top"]) == 5 for o in out)
    for o, row in zip(out, pred.probs, strict=True):
        np.testing.assert_allclose([o["probabilities"][c] for c in CLASSES], row, atol=1e-6)


def test_read_only_inputs_give_no_numpy_warning(tmp_path):
    """A memory-mapped cache or any read-only array is read as it is, without torch's "not writable" warning
    (in a fresh process: torch gives that warning once per process)."""
    import subprocess
    import sys

    from conftest_service import make_checkpoint

    run = make_checkpoint(tmp_path)
    code = ("import numpy as np, fakeprint; a = np.zeros((3, 100, 100, 3), np.uint8); a.setflags(write=False); "
            f"print(fakeprint.load({str(run)!r}).predict(a).probs.shape)")
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "(3, 5)" in proc.stdout, proc.stderr[-2000:]


def test_long_predictions_show_images_per_second_and_equal_one_call(tmp_path, capsys):
    from conftest_service import make_checkpoint, random_images
    from fakeprint.engine.predict import predict_with_progress

    clf = fakeprint.load(make_checkpoint(tmp_path))
    images = random_images(7)
    whole = clf.predict(images)
    chunked = predict_with_progress(clf, images, "testing", progress=True, chunk=3)
    assert np.array_equal(chunked.labels, whole.labels) and np.allclose(chunked.probs, whole.probs, atol=1e-6)
    err = capsys.readouterr().err
    assert "testing" in err and "img/s" in err  # a bar whose rate is in images per second
    quiet = predict_with_progress(clf, images, "quiet", progress=False, chunk=3)
    assert "quiet" not in capsys.readouterr().err and len(quiet) == 7


def test_several_checkpoints_are_an_ensemble_in_the_api_and_the_cli(run, clf, images, tmp_path, capsys):
    """load([a, b]) and `predict a b IMAGE` average the members' probabilities (each with its own TTA), as
    `fakeprint evaluate a b` does; no uncertain flag (the average is not calibrated); one member is that member."""
    other = make_checkpoint(tmp_path / "other", sharpen=2.0, seed=11)
    ens = fakeprint.load([run, other])
    assert isinstance(ens, predict_mod.EnsembleClassifier) and len(ens.members) == 2 and "fpnet_tiny" in repr(ens)
    second = fakeprint.load(other)
    want = (clf.predict(images).probs + second.predict(images).probs) / 2
    assert not np.allclose(clf.predict(images).probs, second.predict(images).probs)  # two different members
    got = ens.predict(images)
    np.testing.assert_allclose(got.probs, want, atol=1e-6)
    assert got.labels.tolist() == want.argmax(1).tolist() and got.uncertain is None
    np.testing.assert_allclose(ens(images).probs, got.probs)
    assert isinstance(fakeprint.load([run]), predict_mod.Classifier)
    with pytest.raises(FakeprintError, match="at least one"):
        fakeprint.load([])
    paths = []
    for i, im in enumerate(images[:3]):
        paths.append(tmp_path / f"e{i}.png")
        paths[-1].write_bytes(encode(im))
    for argv in (["predict", str(run), str(other)], ["predict", "--model", str(run), "--model", str(other)]):
        assert main([*argv, *map(str, paths), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert [o["image"] for o in out] == [str(p) for p in paths]  # the checkpoints were not taken for images
        for o, row in zip(out, ens.predict(paths).probs, strict=True):
            np.testing.assert_allclose([o["probabilities"][c] for c in CLASSES], row, atol=1e-6)
            assert o["uncertain"] is None
