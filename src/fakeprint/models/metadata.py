"""The fields of a checkpoint's (or an exported model's) JSON metadata that consumers act on, checked when it is
read: type, range and finiteness, each refusal one line naming the file and the field. A checkpoint that passes
cannot give NaN probabilities, flip its answers or make the service fail on every request."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.features.preprocess import tta_mode

MAX_TEMPERATURE = 1000.0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fail(where: Path | str, field: str, why: str, value: Any) -> CheckpointError:
    shown = repr(value)
    return CheckpointError(f"{where}: metadata field {field!r} {why}, got {shown[:80]}")


def check_metadata_fields(meta: dict[str, Any], where: Path | str) -> None:
    """Refuse metadata whose ``normalization``, ``tta``, ``calibration``, ``image_size``, ``epoch``, ``held_out``,
    ``metrics`` or ``config`` could not be used as they say (``CheckpointError`` naming the field)."""
    norm = meta.get("normalization", {})
    if not isinstance(norm, dict):
        raise _fail(where, "normalization", "must be a mapping", norm)
    if norm.get("mode", "imagenet") not in ("imagenet", "none"):
        raise _fail(where, "normalization.mode", "must be imagenet or none", norm.get("mode"))
    for key in ("mean", "std"):
        v = norm.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == 3 and all(_number(x) for x in v)
                                  and (key == "mean" or all(x > 0 for x in v))):
            raise _fail(where, f"normalization.{key}", "must be three finite numbers" +
                        (", each above 0" if key == "std" else ""), v)
    if "tta" in meta:
        try:
            tta_mode(meta["tta"])
        except FakeprintError:
            raise _fail(where, "tta", "must be none, flip or dihedral (or true/false)", meta["tta"]) from None
    _check_calibration(meta.get("calibration"), where)
    for key, low in (("image_size", 1), ("epoch", 0)):
        v = meta.get(key)
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise _fail(where, key, f"must be an integer of at least {low}", v)
    for key in ("held_out", "metrics", "config"):
        v = meta.get(key)
        if v is not None and not isinstance(v, dict):
            raise _fail(where, key, "must be a mapping", v)
    acc = (meta.get("held_out") or {}).get("accuracy")
    if acc is not None and not (_number(acc) and 0 <= acc <= 1):
        raise _fail(where, "held_out.accuracy", "must be a number from 0 to 1", acc)


def _check_calibration(cal: Any, where: Path | str) -> None:
    if cal is None or cal == {}:
        return
    if not isinstance(cal, dict):
        raise _fail(where, "calibration", "must be a mapping", cal)
    t = cal.get("temperature")
    if not (_number(t) and 0 < t <= MAX_TEMPERATURE):
        raise _fail(where, "calibration.temperature", f"must be a finite number above 0 (at most {MAX_TEMPERATURE:g})", t)
    u = cal.get("uncertain_below")
    if not (_number(u) and 0 <= u <= 1):
        raise _fail(where, "calibration.uncertain_below", "must be a probability from 0 to 1", u)
