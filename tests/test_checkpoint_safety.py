"""Untrusted files: weights only from safetensors, metadata only from JSON, never unpickled."""

import json
import pickle
from pathlib import Path

import pytest
import torch

from fakeprint.core.errors import CheckpointError
from fakeprint.models import create_model
from fakeprint.models.checkpoint import load_checkpoint, load_resume_state, save_checkpoint


class Planted:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def good(tmp_path):
    save_checkpoint(tmp_path / "run" / "best", create_model("fpnet_tiny"), {"model": "fpnet_tiny", "num_classes": 5})
    return tmp_path / "run"


def test_round_trip(good):
    model, meta = load_checkpoint(good)
    ref = create_model("fpnet_tiny")
    assert meta["model"] == "fpnet_tiny" and set(model.state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_planted_pickle_is_refused_and_runs_no_code(good, tmp_path, how):
    marker = tmp_path / "pwned"
    with open(good / "best.safetensors", "wb") as f:
        if how == "pickle":
            pickle.dump({"w": Planted(marker)}, f)
        else:
            torch.save({"w": Planted(marker)}, f)
    with pytest.raises(CheckpointError, match="not a safetensors file; refusing"):
        load_checkpoint(good)
    assert not marker.exists()


def test_a_planted_pickle_as_resume_state_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Planted(marker)}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="refusing to load resume state"):
        load_resume_state(tmp_path / "state.pt")
    assert not marker.exists()


def test_the_cli_refuses_a_planted_checkpoint_cleanly(cli, good, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": Planted(marker)}, good / "best.safetensors")
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (100, 100)).save(image)
    proc = cli("predict", str(good), str(image))
    assert proc.returncode == 2 and "refusing" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("change,message", [
    ({"model": "resnet9000"}, "unknown model 'resnet9000'"),
    ({"num_classes": "five"}, "bad num_classes"),
    ({"format": "other/1"}, "not a fakeprint checkpoint"),
    ({"model": "threecnn"}, "weights do not fit model 'threecnn'"),
    ({"num_classes": 7}, "shape mismatch"),
])
def test_metadata_is_validated_before_use(good, change, message):
    meta_path = good / "best.json"
    meta = json.loads(meta_path.read_text()) | change
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(good)


def test_missing_or_broken_metadata(good):
    (good / "best.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(good)
    (good / "best.json").unlink()
    with pytest.raises(CheckpointError, match="metadata file missing"):
        load_checkpoint(good)


def test_truncated_weights_are_refused(good):
    raw = (good / "best.safetensors").read_bytes()
    (good / "best.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="corrupt safetensors"):
        load_checkpoint(good)


def test_atomic_write_leaves_no_temporary_files(good):
    assert sorted(p.name for p in good.iterdir()) == ["best.json", "best.safetensors"]


def test_written_files_are_readable_by_others(good):
    assert (good / "best.json").stat().st_mode & 0o044 == 0o044


@pytest.mark.parametrize("change, words", [
    ({"classes": ["0", "1"]}, "'classes' must list 5"),
    ({"num_classes": 2_000_000}, "bad num_classes"),
    ({"num_classes": 10**12}, "bad num_classes"),
    ({"num_classes": True}, "bad num_classes"),
    ({"model_args": {"width": -3}}, "does not build"),
    ({"model_args": {"width": 100_000}}, "do not fit"),
    ({"normalization": {"mode": "sepia"}}, "normalization.mode"),
    ({"num_classes": 4, "classes": ["a", "b", "c", "d"]}, "do not fit"),
])
def test_checkpoint_metadata_is_checked_before_any_model_is_built(tmp_path, monkeypatch, change, words):
    """Absurd metadata is a one-line error naming the file, found before any model is built in memory (only
    a model on the "meta" device, which allocates nothing, may be built to read its shapes)."""
    import json

    import fakeprint.models.checkpoint as ck
    from conftest_service import make_checkpoint

    run = make_checkpoint(tmp_path)
    meta_path = run / "best.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | change))
    real_builds = []
    original = ck.create_model

    def spy(*args, **kwargs):
        if torch.get_default_device().type != "meta":
            real_builds.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ck, "create_model", spy)
    with pytest.raises(CheckpointError, match=words) as e:
        ck.load_checkpoint(run)
    assert str(run) in str(e.value) and real_builds == []
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"num_classes": 5, "classes": list("01234"),
                                                                          "model_args": {}, "normalization": {}}))
    ck.load_checkpoint(run)  # the same file with sane metadata loads, through one real build
    assert len(real_builds) == 1
