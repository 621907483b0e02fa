"""One way to name things: the shipped model is `default` everywhere, commands never write into the
installed package, and `evaluate` takes an ONNX model like `predict` and `serve` do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest_service import make_checkpoint
from fakeprint.engine.predict import default_model_path
from fakeprint.models.checkpoint import output_dir, resolve_checkpoint

needs_default = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fakeprint", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


@needs_default
def test_default_names_the_shipped_model_and_results_stay_out_of_the_package(tiny_data, tmp_path):
    from fakeprint.models.checkpoint import shipped_model_path

    assert resolve_checkpoint("default") == shipped_model_path("default")  # the checkpoint, routed's pristine member
    package = default_model_path().parent
    before = sorted(p.name for p in package.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    proc = _cli("evaluate", "default", "--data", str(tiny_data), "--split", "validation", cwd=work)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((work / "eval-validation-default" / "metrics.json").read_text())
    assert metrics["n"] == 50 and metrics["tta"] == "flip"  # the shipped model's own TTA, applied by default
    assert sorted(p.name for p in package.iterdir()) == before
    assert output_dir(shipped_model_path("default"), "x") == Path.cwd() / "x-default"

    if shipped_model_path("fast") is not None:  # another shipped model, by its own name
        assert resolve_checkpoint("fast") == shipped_model_path("fast")
        assert output_dir(shipped_model_path("fast"), "x") == Path.cwd() / "x-fast"
    if shipped_model_path("accurate") is not None:  # the most accurate shipped model: a file of its own
        assert resolve_checkpoint("accurate") == shipped_model_path("accurate") != shipped_model_path("default")


def test_a_file_named_default_in_the_working_directory_wins(tmp_path):
    run = make_checkpoint(tmp_path)
    os.symlink(run, tmp_path / "default")
    here = Path.cwd()
    try:
        os.chdir(tmp_path)
        assert resolve_checkpoint("default") == Path("default") / "best.safetensors"
    finally:
        os.chdir(here)


def test_evaluate_takes_an_onnx_model(tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    run = make_checkpoint(tmp_path, sharpen=6.0)
    onnx = tmp_path / "m.onnx"
    proc = _cli("export", str(run), "--onnx", str(onnx), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    a = _cli("evaluate", str(onnx), "--data", str(tiny_data), "--split", "validation", "--out", "a", cwd=tmp_path)
    b = _cli("evaluate", str(run), "--data", str(tiny_data), "--split", "validation", "--out", "b", cwd=tmp_path)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert ma["confusion_matrix"] == mb["confusion_matrix"] and ma["n"] == 50


def test_predict_flags_that_do_not_apply_are_errors_and_folders_are_expanded(cli, tmp_path):
    from conftest_service import encode, random_images

    run = make_checkpoint(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(random_images(3, seed=9)):
        (folder / f"i{i}.png").write_bytes(encode(im))
    (folder / "notes.txt").write_text("not an image")
    one = str(folder / "i0.png")
    for extra, words in ((["--split", "test"], "--split applies with --data"), (["--out", "x.csv"], "--out is the"),
                         (["--top-k", "0"], "--top-k")):
        proc = cli("predict", str(run), one, *extra)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = cli("predict", str(run), "--data", str(tmp_path), "--json")
    assert proc.returncode == 2 and "--json applies to image files" in proc.stderr
    proc = cli("predict", str(run), str(folder), "--json", "--top-k", "2", "--probs", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [Path(r["image"]).name for r in rows] == ["i0.png", "i1.png", "i2.png"]
    assert all(len(r["top"]) == 2 and r["top"][0]["label"] == r["label"] for r in rows)
    import csv

    with open(tmp_path / "p.csv", newline="") as f:
        probs = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in probs] == ["i0.png", "i1.png", "i2.png"]
    assert abs(sum(float(probs[0][f"p_{c}"]) for c in "01234") - 1) < 1e-4
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = cli("predict", str(run), str(empty))
    assert proc.returncode == 2 and "no image files" in proc.stderr


def test_evaluate_and_analyze_share_their_split_default(tiny_data, tmp_path):
    from fakeprint.engine.evaluate import default_split

    run = make_checkpoint(tmp_path)
    assert default_split(run) == "validation"  # no split.csv: nothing was held out by the run
    (run / "split.csv").write_text("image_id,label,subset\na,0,train\nb,1,internal\n")
    assert default_split(run) == "internal"
    (run / "split.csv").write_text("image_id,label,subset\na,0,train\n")
    assert default_split(run) == "validation"


def test_resume_refuses_new_settings_and_presets_are_listed(cli, tmp_path):
    proc = cli("train", "--resume", str(tmp_path / "run"), "--set", "lr=1")
    assert proc.returncode == 2 and "--set lr cannot be changed on --resume" in proc.stderr
    assert "max_minutes" in proc.stderr  # what may change is named
    proc = cli("train", "--list-presets")
    product, _, campaign = proc.stdout.strip().partition("\n\n")
    presets, experiments = product.splitlines(), campaign.splitlines()[1:]
    assert proc.returncode == 0 and "campaign" in campaign.splitlines()[0]
    for lines in (presets, experiments):
        assert [ln.split()[0] for ln in lines] == sorted(ln.split()[0] for ln in lines)
        assert all(len(ln.split()) > 3 for ln in lines)
    assert {"threecnn", "default", "accurate", "fast", "stats_fast", "demo"} <= {ln.split()[0] for ln in presets}
    assert "experiments/fpnet_cpu" in {ln.split()[0] for ln in experiments}


def test_evaluate_json_and_the_resize_warning(cli, tiny_data, tmp_path):
    from PIL import Image

    run = make_checkpoint(tmp_path)
    proc = cli("evaluate", str(run), "--data", str(tiny_data), "--split", "validation", "--json",
               "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["n"] == 50 and len(m["confusion_matrix"]) == 5 and m["split"] == "validation"
    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (100, 100), (200, 30, 30)).save(tmp_path / "ok.png")
    proc = cli("predict", str(run), str(tmp_path / "big.png"), str(tmp_path / "ok.png"))
    assert proc.returncode == 0 and "warning: resized to 100x100" in proc.stderr
    assert "big.png (300x200)" in proc.stderr and "ok.png" not in proc.stderr.split("warning:")[1].split("\n")[0]


def test_committed_results_name_no_machine_paths():
    """Results files name datasets by folder name and content hash, and runs by paths relative to the project:
    no absolute path of the machine that made them."""
    import re
    from pathlib import Path

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    found = {f.name: m.group(0) for f in sorted(results.glob("*.json"))
             if (m := re.search(r'"(/work|/home|/root|/tmp|/Users)/[^"]*"', f.read_text()))}
    assert not found, found


def test_one_place_chooses_the_backend():
    from fakeprint.core.errors import FakeprintError
    from fakeprint.engine.onnx import resolve_backend

    assert resolve_backend("m.onnx") == "onnx" and resolve_backend("m.onnx", "onnx") == "onnx"
    assert resolve_backend("runs/x") == "torch" and resolve_backend(None, "onnx") == "onnx"
    with pytest.raises(FakeprintError, match="ONNX model"):
        resolve_backend("m.onnx", "torch")
    with pytest.raises(FakeprintError, match="unknown backend"):
        resolve_backend("runs/x", "tensorrt")


def test_one_preprocessing_module():
    """Inference, Grad-CAM, export and the service take preprocessing from ``fakeprint.features.preprocess``, never from
    the training augmentation (an import-linter contract in pyproject.toml says the same for CI)."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src" / "fakeprint"
    for name in ("engine/runtime.py", "reports/gradcam.py", "engine/onnx.py", "engine/predict.py", "engine/evaluate.py",
                 "interfaces/serve/app.py", "interfaces/serve/uploads.py"):
        text = (src / name).read_text()
        assert "import" in text and not re.search(r"augment import|import augment", text), name
    from fakeprint.features import augment, preprocess

    assert not hasattr(augment, "tta_views") and callable(preprocess.tta_views)  # one home for the test-time views


def test_a_checkpoint_without_its_run_folder_finds_its_internal_split_again(cli, tiny_train_only, tmp_path):
    """A shipped model has no split.csv beside it: `evaluate --split internal` recomputes the split from
    train.csv and the run's config, checked against the digest its metadata records; a different train.csv is
    refused, and without a digest the missing split.csv is named."""
    from fakeprint.data.cache import load_split
    from fakeprint.data.dataset import stratified_split
    from fakeprint.data.splits import internal_ids_digest
    from fakeprint.engine.config import load_config

    cfg = load_config(None, {"val_fraction": 0.2, "split_seed": 3})
    full = load_split(tiny_train_only, "train", progress=False)
    _, va = stratified_split(full.labels, 0.2, 3)
    digest = internal_ids_digest([full.ids[i] for i in va])
    run = make_checkpoint(tmp_path, held_out={"internal_ids_sha256": digest}, extra_meta={"config": cfg})
    assert not (run / "split.csv").exists()
    proc = cli("evaluate", str(run), "--data", str(tiny_train_only), "--json", "--out", str(tmp_path / "e"))
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["split"] == "internal" and m["n"] == len(va)  # the default split: the one its figure names

    rows = (tiny_train_only / "train.csv").read_text().splitlines()
    (tiny_train_only / "train.csv").write_text("\n".join([rows[0], *rows[1:][::-1]]) + "\n")  # another order
    proc = cli("evaluate", str(run), "--data", str(tiny_train_only), "--split", "internal", "--out", str(tmp_path / "f"))
    assert proc.returncode == 2 and "not the one the model's figure was measured on" in proc.stderr

    bare = make_checkpoint(tmp_path / "bare", extra_meta={"config": cfg})
    proc = cli("evaluate", str(bare), "--data", str(tiny_train_only), "--split", "internal", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2 and "split.csv: not found" in proc.stderr and "Traceback" not in proc.stderr
