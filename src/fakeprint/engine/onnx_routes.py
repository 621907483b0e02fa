"""The runtime side of a routed ONNX graph (``engine.onnx_routed`` writes it): its metadata's ``route`` checked,
and its predictions with the flags PyTorch gives (``engine.predict.route_reasons``).
``engine.onnx.OnnxClassifier`` uses these for a model whose metadata has a ``route``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fakeprint.core.errors import CheckpointError
from fakeprint.engine.onnx_files import INPUT_NAME
from fakeprint.engine.predict import flat_images, route_of, route_reasons
from fakeprint.engine.predictions import FLAT_IMAGE, LOW_CONFIDENCE, Predictions, reason_bits
from fakeprint.models.metadata import check_metadata_fields
from fakeprint.models.router import beyond


def check_route(route: Any, p: Path) -> None:
    """A routed graph's ``route`` (``engine.onnx_routed``): its threshold, its own bar and two members'
    calibrations, each usable as it says (``CheckpointError`` naming the field)."""
    def fail(field: str, what: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{p}: field 'route.{field}' {what}, got {value!r}"[:300])

    if not isinstance(route, dict):
        raise CheckpointError(f"{p}: field 'route' must be a mapping")
    t = route.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t < 1.0:
        raise fail("threshold", "must be a number between 0 and 1", t)
    u = route.get("uncertain_below")
    if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 <= u <= 1.0):
        raise fail("uncertain_below", "must be a probability from 0 to 1 (or null)", u)
    far = route.get("far_above")
    if far is not None and (isinstance(far, bool) or not isinstance(far, (int, float)) or not np.isfinite(far)
                            or far < 0):
        raise fail("far_above", "must be a non-negative number (or null)", far)
    members = route.get("members")
    if not isinstance(members, list) or len(members) != 2 or not all(isinstance(m, dict) for m in members):
        raise fail("members", "must list the two members", members)
    for i, m in enumerate(members):
        check_metadata_fields({"calibration": m.get("calibration")}, f"{p}: route.members[{i}]")
    if route.get("tta_in_graph") is not True:
        raise fail("tta_in_graph", "must be true (the graph does its members' test-time augmentation)",
                   route.get("tta_in_graph"))


def routed_predictions(session: Any, route: dict[str, Any], classes: list[str], arr: np.ndarray,
                       batch_size: int) -> Predictions:
    """The graph's probabilities and ``file_perturbed`` for N x 100 x 100 x 3 uint8 images, flagged as PyTorch
    flags them: each member's own bar for its answers (flat inputs always), the route's own for the second's, and
    images whose typicality is above ``route.far_above`` (graphs exported before it have neither: not far)."""
    far_above = route.get("far_above")
    names = ["probs", "file_perturbed"] + (["typicality"] if far_above is not None else [])
    outs = [session.run(names, {INPUT_NAME: np.ascontiguousarray(arr[s:s + batch_size])})
            for s in range(0, len(arr), batch_size)]
    probs = np.concatenate([np.zeros((0, len(classes)), np.float32)] + [o[0].astype(np.float32) for o in outs])
    p = np.concatenate([np.zeros(0, np.float32)] + [o[1].astype(np.float32) for o in outs])
    far = None
    if far_above is not None:
        typ = np.concatenate([np.zeros(0, np.float32)] + [o[2].astype(np.float32) for o in outs])
        far = beyond(typ, far_above)
    second = route_of(p, route["threshold"]) == 1
    cals = [m.get("calibration") for m in route["members"]]
    reasons = None
    if all(cals):
        top = probs.max(1) if len(probs) else np.zeros(0, np.float32)
        bar = np.where(second, float(cals[1]["uncertain_below"]), float(cals[0]["uncertain_below"]))
        own = reason_bits(top < bar, LOW_CONFIDENCE) | reason_bits(flat_images(arr), FLAT_IMAGE)
        reasons = route_reasons(own, second, top, route.get("uncertain_below"), far)
    labels = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    return Predictions(labels, probs, classes, file_perturbed=p, reasons=reasons)
