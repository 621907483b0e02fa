"""The files of an ONNX export: ``MODEL.onnx`` and its metadata ``MODEL.onnx.json`` written together (both or
neither), the checksum of the checkpoint it came from, and the versions it was made with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.core.versions import versions

INPUT_NAME = "images"  # the uint8 N x 100 x 100 x 3 input of every graph fakeprint exports


def metadata_path(onnx_path: str | Path) -> Path:
    """``MODEL.onnx`` -> ``MODEL.onnx.json``."""
    p = Path(onnx_path)
    return p.with_name(p.name + ".json")


def checked_export_args(out: str | Path, n_images: int) -> Path:
    """The ONNX file to write (its name must end in .onnx) once the parity batch is known to be non-empty."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise FakeprintError(f"{out}: the ONNX file name must end in .onnx")
    if n_images < 1:
        raise FakeprintError("the parity check needs at least one image")
    return out


def write_export(out: Path, data: bytes, info: dict[str, Any]) -> Path:
    """Write the model ``data`` to ``out`` and ``info`` beside it, each atomically; the model is removed again when
    its metadata cannot be written. Returns the metadata's path."""
    atomic_write(out, data)
    meta_out = metadata_path(out)
    try:
        atomic_write(meta_out, (json.dumps(info, indent=2, default=str) + "\n").encode())
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return meta_out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_versions() -> dict[str, str]:
    """fakeprint's, torch's, ... versions and onnxruntime's (``missing`` where it is not installed)."""
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except ImportError:
        ort = "missing"
    return versions() | {"onnxruntime": ort}
