"""An ensemble as a file: ``NAME.ensemble.json`` names its members and holds the calibration of their averaged
probabilities (``fakeprint calibrate A B C --data DIR --out NAME.ensemble.json``), so that the ensemble can be
loaded, served and scored as one model, with an ``uncertain`` flag that means what a single model's does.

    {"format": "fakeprint-ensemble/1", "members": ["accurate", "default", "fast"], "calibration": {...}}

A member is a shipped model's name, or a checkpoint path: relative paths are read from the file's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fakeprint.core.errors import CheckpointError
from fakeprint.core.io import atomic_write
from fakeprint.core.versions import __version__
from fakeprint.models.checkpoint import SHIPPED_NAMES, read_json_metadata
from fakeprint.models.metadata import check_metadata_fields

FORMAT = "fakeprint-ensemble/1"
SUFFIX = ".ensemble.json"


def is_ensemble_path(path: Any) -> bool:
    return isinstance(path, (str, Path)) and str(path).endswith(SUFFIX)


def read_ensemble(path: str | Path) -> tuple[list[str], dict[str, Any] | None]:
    """The members (paths resolved against the file's folder; shipped names as they are) and the calibration."""
    path = Path(path)
    meta = read_json_metadata(path, FORMAT, f"an ensemble is one {SUFFIX} file", "a fakeprint ensemble")
    members = meta.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise CheckpointError(f"{path}: field 'members' must list two or more models (names or paths), "
                              f"got {members!r}"[:300])
    check_metadata_fields({"calibration": meta.get("calibration")}, path)
    resolved = [m if m in SHIPPED_NAMES and not (path.parent / m).exists() else str(path.parent / m) for m in members]
    return resolved, meta.get("calibration") or None


def write_ensemble(path: str | Path, members: list[str], calibration: dict[str, Any] | None,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write ``path`` (atomically); member paths are stored relative to its folder where they can be."""
    path = Path(path)
    if not is_ensemble_path(path):
        raise CheckpointError(f"{path}: an ensemble file's name must end in {SUFFIX}")
    folder = path.parent.resolve()
    stored = []
    for m in members:
        p = Path(m)
        if m in SHIPPED_NAMES and not p.exists():
            stored.append(m)
            continue
        try:
            stored.append(str(p.resolve().relative_to(folder)))
        except ValueError:
            stored.append(str(p.resolve()))
    body = {"format": FORMAT, "members": stored, "calibration": calibration, "version": __version__} | (extra or {})
    atomic_write(path, (json.dumps(body, indent=2) + "\n").encode())
    return path
