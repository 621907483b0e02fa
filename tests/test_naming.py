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
from fakeprint.checkpoint import output_dir, resolve_checkpoint
from fakeprint.predict import default_model_path

needs_default = pytest.mark.skipif(default_model_path() is None, reason="no default model shipped in this checkout")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "fakeprint", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


@needs_default
def test_default_names_the_shipped_model_and_results_stay_out_of_the_package(tiny_data, tmp_path):
    assert resolve_checkpoint("default") == default_model_path()
    package = default_model_path().parent
    before = sorted(p.name for p in package.iterdir())
    work = tmp_path / "work"
    work.mkdir()
    proc = _cli("evaluate", "default", "--data", str(tiny_data), "--split", "validation", cwd=work)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((work / "eval-validation-default" / "metrics.json").read_text())
    assert metrics["n"] == 50 and metrics["tta"] == "flip"  # the shipped model's own TTA, applied by default
    assert sorted(p.name for p in package.iterdir()) == before
    assert output_dir(default_model_path(), "x") == Path.cwd() / "x-default"


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
