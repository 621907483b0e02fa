"""An ensemble as a file: ``NAME.ensemble.json`` names its members and holds the calibration of their averaged
probabilities (``fakeprint calibrate A B C --data DIR --out NAME.ensemble.json``), so that the ensemble can be
loaded, served and scored as one model, with an ``uncertain`` flag that means what a single model's does.

    {"format": "fakeprint-ensemble/1", "members": ["accurate", "default", "fast"], "calibration": {...}}

A member is a shipped model's name, or a checkpoint path: relative paths are read from the file's folder.

A routed ensemble (``fakeprint route PRISTINE PERTURBED --data DIR --out NAME.ensemble.json``) has two members and a
``route``: each image goes to the first member when its file detector (``models.router``, the safetensors file
``route.detector``) calls it pristine (probability of a perturbed file below ``route.threshold``), else to the second.
``route.uncertain_below`` (``fakeprint calibrate NAME.ensemble.json --data DIR``, optional): an image sent to the
second member is also flagged ``uncertain`` when its top probability is below it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from fakeprint.core.errors import CheckpointError
from fakeprint.core.io import atomic_write
from fakeprint.core.versions import __version__
from fakeprint.models.checkpoint import SHIPPED_NAMES, read_json_metadata
from fakeprint.models.metadata import check_metadata_fields

FORMAT = "fakeprint-ensemble/1"
SUFFIX = ".ensemble.json"


# ensembles shipped inside the package (``weights/NAME.ensemble.json``), by the name every command accepts: ``routed``
# (``default`` for pristine files, ``robust`` for re-encoded, resized or blurred ones; docs/ROBUSTNESS.md)
SHIPPED_ENSEMBLES = ("routed",)


def shipped_ensemble_path(name: str) -> Path | None:
    path = Path(str(resources.files("fakeprint") / "weights" / f"{name}{SUFFIX}"))
    return path if path.is_file() else None


def _file(path: str | Path) -> Path:
    """An ensemble file's path: a shipped ensemble's name (unless a file of that name is here) or the path itself."""
    if str(path) in SHIPPED_ENSEMBLES and not Path(path).exists():
        shipped = shipped_ensemble_path(str(path))
        if shipped is None:
            raise CheckpointError(f"{str(path)!r}: no such ensemble is shipped in this installation")
        return shipped
    return Path(path)


def is_ensemble_path(path: Any) -> bool:
    return isinstance(path, (str, Path)) and (str(path).endswith(SUFFIX) or (
        str(path) in SHIPPED_ENSEMBLES and not Path(path).exists()))


def read_ensemble(path: str | Path) -> tuple[list[str], dict[str, Any] | None]:
    """The members (paths resolved against the file's folder; shipped names as they are) and the calibration."""
    members, calibration, _ = read_ensemble_file(path)
    return members, calibration


def read_ensemble_file(path: str | Path) -> tuple[list[str], dict[str, Any] | None, dict[str, Any] | None]:
    """The members and the calibration (as ``read_ensemble``) and the ``route`` (its detector's path resolved
    against the file's folder; None: the members are averaged), from one reading of the file."""
    path = _file(path)
    meta = read_json_metadata(path, FORMAT, f"an ensemble is one {SUFFIX} file", "a fakeprint ensemble")
    members = meta.get("members")
    if not isinstance(members, list) or len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise CheckpointError(f"{path}: field 'members' must list two or more models (names or paths), "
                              f"got {members!r}"[:300])
    check_metadata_fields({"calibration": meta.get("calibration")}, path)
    resolved = [m if m in SHIPPED_NAMES and not (path.parent / m).exists() else str(path.parent / m) for m in members]
    return resolved, meta.get("calibration") or None, _route(meta, path)


def _route(meta: dict[str, Any], path: Path) -> dict[str, Any] | None:
    route = meta.get("route")
    if route is None:
        return None
    if not isinstance(route, dict) or not isinstance(route.get("detector"), str):
        raise CheckpointError(f"{path}: field 'route' must hold 'detector' (a .safetensors file) and 'threshold'")
    t = route.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
        raise CheckpointError(f"{path}: field 'route.threshold' must be a number between 0 and 1, got {t!r}")
    if len(meta["members"]) != 2:
        raise CheckpointError(f"{path}: a routed ensemble has two members (pristine files, perturbed files)")
    u = route.get("uncertain_below")
    if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 <= u <= 1.0):
        raise CheckpointError(f"{path}: field 'route.uncertain_below' must be a number between 0 and 1, got {u!r}")
    return route | {"detector": str(path.parent / route["detector"]), "threshold": float(t),
                    "uncertain_below": None if u is None else float(u)}


def update_route(path: str | Path, fields: dict[str, Any]) -> Path:
    """Merge ``fields`` into a routed ensemble file's ``route`` (atomically; every other field kept as it is)."""
    path = _file(path)
    read_ensemble_file(path)  # a broken file is refused before anything is written
    meta = json.loads(path.read_text())
    if meta.get("route") is None:
        raise CheckpointError(f"{path}: not a routed ensemble (no 'route'); fit one with fakeprint route")
    meta["route"] = meta["route"] | fields
    _route(meta, path)  # the merged route checked before it replaces the file
    atomic_write(path, (json.dumps(meta, indent=2) + "\n").encode())
    return path


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
