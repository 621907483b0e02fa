"""ONNX export with its parity check, and the onnxruntime backend (issue 6, item 2)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fakeprint
from conftest_service import CLASSES, encode, make_checkpoint, one_thread, random_images  # noqa: F401
from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.engine import onnx as export_mod
from fakeprint.engine.onnx import OnnxClassifier, UInt8Classifier, load_backend, load_onnx
from fakeprint.interfaces.cli import main
from fakeprint.models import count_parameters, create_model, list_models

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("export"), sharpen=8.0, metrics={"val_acc": 0.875})


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    assert main(["export", str(run), "--onnx", str(out)]) == 0
    return out


def test_export_writes_the_model_and_its_metadata(run, exported, capsys):
    meta = json.loads((exported.parent / "model.onnx.json").read_text())
    weights = run / "best.safetensors"
    assert meta["format"] == "fakeprint-onnx/1"
    assert meta["model"] == "fpnet_tiny" and meta["classes"] == CLASSES and meta["num_classes"] == 5
    assert meta["normalization"]["mode"] == "imagenet" and meta["normalization"]["in_graph"] is True
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["input"] == {"name": "images", "dtype": "uint8", "layout": "NHWC", "channels": "RGB",
                             "shape": ["batch", 100, 100, 3]}
    assert meta["source_checkpoint"]["path"] == str(weights.resolve())
    assert meta["source_checkpoint"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["metrics"] == {"val_acc": 0.875}
    assert meta["parity"]["max_abs_prob_diff"] < meta["parity"]["tolerance"] == 1e-4
    assert not (exported.parent / "model.json").exists()  # never the checkpoint-style name


def test_the_graph_takes_uint8_nhwc_with_a_dynamic_batch(exported):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model)
    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [100, 100, 3]
    assert [o.name for o in model.graph.output] == ["logits", "probs"]


def test_onnxruntime_agrees_with_pytorch_on_new_images(run, exported):
    clf = fakeprint.load(run)
    sess = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for n, seed in ((1, 11), (5, 12)):
        images = random_images(n, seed=seed)
        logits, probs = sess.run(None, {"images": images})
        ref = clf.predict(images).probs
        assert probs.shape == (n, 5) and logits.shape == (n, 5)
        assert np.abs(probs - ref).max() < 1e-4
        np.testing.assert_allclose(probs, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-6)


def _files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_a_failed_parity_check_writes_nothing(run, tmp_path, monkeypatch):
    real = export_mod.onnx_probs
    monkeypatch.setattr(export_mod, "onnx_probs", lambda *a, **k: real(*a, **k) + 2e-4)
    out = tmp_path / "model.onnx"
    with pytest.raises(FakeprintError, match=r"parity check failed.*differ from PyTorch by up to 0\.000[2-9].*nothing written"):
        export_mod.export_onnx(run, out)
    assert _files_in(tmp_path) == set()


def test_a_failed_parity_check_leaves_an_earlier_export_alone(run, exported, tmp_path, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(exported.read_bytes())
    (tmp_path / "model.onnx.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(export_mod, "onnx_probs", lambda session, images, batch_size=256: np.full((len(images), 5), 0.2))
    with pytest.raises(FakeprintError, match="parity check failed"):
        export_mod.export_onnx(run, out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_cli_reports_a_parity_failure_in_one_line(run, tmp_path, monkeypatch, capsys):
    real = export_mod.onnx_probs
    monkeypatch.setattr(export_mod, "onnx_probs", lambda *a, **k: real(*a, **k) * 0.5)
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fakeprint: error: ONNX parity check failed") and "\n" not in err
    assert _files_in(tmp_path) == set()


def test_the_tolerance_is_an_option(run, tmp_path, capsys):
    # a tolerance smaller than float32 rounding cannot be met: refused, clearly
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--tolerance", "1e-30"]) == 2
    assert "tolerance 1e-30" in capsys.readouterr().err
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx"), "--tolerance", "0"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["export", "{tmp}/missing", "--onnx", "{tmp}/m.onnx"], "checkpoint not found"),
    (["export", "{run}", "--onnx", "{tmp}/m.txt"], "must end in .onnx"),
    (["export", "{run}"], "--onnx MODEL.onnx"),
])
def test_cli_mistakes_are_one_line_errors(run, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.onnx*"))


def test_a_checkpoint_without_normalisation(tmp_path):
    run = make_checkpoint(tmp_path, norm="none", sharpen=8.0)
    out = tmp_path / "plain.onnx"
    result = export_mod.export_onnx(run, out, n_images=4)
    meta = json.loads((tmp_path / "plain.onnx.json").read_text())
    assert meta["normalization"]["mode"] == "none" and meta["normalization"]["std"] == [1.0, 1.0, 1.0]
    assert result.max_abs_diff < 1e-4
    images = random_images(3, seed=9)
    torch_probs = fakeprint.load(run).predict(images).probs
    assert np.abs(load_onnx(out).predict(images).probs - torch_probs).max() < 1e-4
    # and it differs from what ImageNet normalisation would give: the mode really is applied
    imagenet = UInt8Classifier(fakeprint.load(run).model, "imagenet")(torch.from_numpy(images))[1].detach().numpy()
    assert np.abs(imagenet - torch_probs).max() > 1e-3


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_with_parity(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = export_mod.parity_images(2 if count_parameters(model) > 3_000_000 else 4, seed=5)
    session = export_mod.onnx_session(export_mod.export_bytes(model))
    assert export_mod.check_parity(model, session, "imagenet", images) < 1e-4


def test_the_newest_statistics_export_with_parity():
    """The hybrid's default feature set is v2; the shipped models use v4 and v5, the newest preset v7 (v6's table
    lookup of the patterns' codes; v7's joint histograms, grid and wavelet)."""
    torch.manual_seed(0)
    model = create_model("hybrid", feature_set="v7", hidden=512, stat_layers=2).eval()
    images = export_mod.parity_images(3, seed=6)
    session = export_mod.onnx_session(export_mod.export_bytes(model))
    assert export_mod.check_parity(model, session, "imagenet", images) < 1e-4


@settings(max_examples=25, deadline=None)
@given(n_in=st.integers(1, 40), n_out=st.integers(1, 40), seed=st.integers(0, 1000))
def test_matrix_pooling_equals_adaptive_average_pooling(n_in, n_out, seed):
    n_out = min(n_out, n_in)
    x = torch.randn(2, 3, n_in, n_in + 3, generator=torch.Generator().manual_seed(seed))
    pool = export_mod._MatrixAdaptiveAvgPool2d((n_in, n_in + 3), (n_out, max(1, n_out - 1)))
    expected = torch.nn.functional.adaptive_avg_pool2d(x, (n_out, max(1, n_out - 1)))
    torch.testing.assert_close(pool(x), expected, atol=1e-5, rtol=1e-5)


def test_onnx_classifier_has_the_classifier_interface(run, exported, tmp_path):
    torch_clf, onnx_clf = fakeprint.load(run), load_onnx(exported)
    assert isinstance(onnx_clf, OnnxClassifier)
    assert onnx_clf.name == "fpnet_tiny" and onnx_clf.classes == CLASSES
    images = random_images(6, seed=21)
    path = tmp_path / "a.png"
    path.write_bytes(encode(images[0]))
    for items in (images, [str(path), images[1]], path):
        a, b = torch_clf.predict(items), onnx_clf.predict(items)
        assert np.abs(a.probs - b.probs).max() < 1e-4
        confident = np.sort(a.probs, 1)[:, -1] - np.sort(a.probs, 1)[:, -2] > 1e-3
        np.testing.assert_array_equal(a.labels[confident], b.labels[confident])
    assert np.abs(torch_clf.predict(images, tta=True).probs - onnx_clf.predict(images, tta=True).probs).max() < 1e-4
    np.testing.assert_allclose(onnx_clf.predict(images, batch_size=4).probs, onnx_clf.predict(images).probs, atol=1e-6)
    assert onnx_clf.predict([]).probs.shape == (0, 5)


def test_load_backend_chooses_by_file_and_option(run, exported):
    assert isinstance(load_backend(exported), OnnxClassifier)
    assert isinstance(load_backend(run), fakeprint.engine.predict.Classifier)
    in_memory = load_backend(run, "onnx")
    assert isinstance(in_memory, OnnxClassifier)
    images = random_images(3, seed=4)
    assert np.abs(in_memory.predict(images).probs - fakeprint.load(run).predict(images).probs).max() < 1e-4
    with pytest.raises(FakeprintError, match="is an ONNX model: use --backend onnx"):
        load_backend(exported, "torch")
    with pytest.raises(FakeprintError, match="unknown backend"):
        load_backend(run, "tensorrt")


def test_load_onnx_refuses_broken_files(exported, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_onnx(tmp_path / "none.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(exported.read_bytes())
    with pytest.raises(CheckpointError, match="metadata file missing"):
        load_onnx(lonely)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf")
    (tmp_path / "garbage.onnx.json").write_text((exported.parent / "model.onnx.json").read_text())
    with pytest.raises(CheckpointError, match="onnxruntime cannot load it"):
        load_onnx(garbage)
    (tmp_path / "lonely.onnx.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointError, match="not fakeprint ONNX metadata"):
        load_onnx(lonely)


@pytest.mark.parametrize("backend_args", [["--backend", "onnx"], []])
def test_cli_predict_with_the_onnx_backend(run, exported, tmp_path, capsys, backend_args):
    images = random_images(3, seed=8)
    paths = []
    for i, im in enumerate(images):
        paths.append(str(tmp_path / f"p{i}.png"))
        Path(paths[-1]).write_bytes(encode(im))
    assert main(["predict", str(exported), *paths, "--json", *backend_args]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)
    ref = fakeprint.load(run).predict(paths)
    probs = np.array([[g["probabilities"][c] for c in CLASSES] for g in got])
    assert [g["image"] for g in got] == paths
    assert np.abs(probs - ref.probs).max() < 1e-4
    # the torch checkpoint with --backend onnx: exported in memory, same answers
    assert main(["predict", str(run), *paths, "--backend", "onnx"]) == 0
    captured = capsys.readouterr()
    assert "onnx" in captured.err and len(captured.out.strip().splitlines()) == 3
