"""A routed model as one ONNX graph (issue 38): `fakeprint export ROUTED.ensemble.json --onnx R.onnx` gives the
routed model's answers, its file detector's probabilities and its flags, as PyTorch does, on both routes; the service
serves it with each member's Grad-CAM; what it cannot do gets one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fakeprint
from conftest_service import encode, make_routed
from fakeprint.core.errors import CheckpointError, FakeprintError
from fakeprint.engine.onnx import load_onnx
from fakeprint.features.perturb import perturbed_images


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fakeprint.interfaces.cli import main

    base = tmp_path_factory.mktemp("route-onnx")
    data, runs, out, route, full = make_routed(base)
    onnx = base / "pair.onnx"
    assert main(["export", str(out), "--onnx", str(onnx)]) == 0
    x = np.concatenate([full.images[160:176], perturbed_images(full.images[176:192], "jpeg:q=60")])
    return out, onnx, x, runs


def test_the_graph_answers_as_the_routed_model_does_on_both_routes(exported):
    out, onnx, x, runs = exported
    torch_clf, onnx_clf = fakeprint.load(out), load_onnx(onnx)
    ref, got = torch_clf.predict(x), onnx_clf.predict(x, batch_size=5)
    routes = torch_clf.routes(ref.file_perturbed)
    assert 0 < routes.sum() < len(x)  # both members answer some
    assert (onnx_clf.routes(got.file_perturbed) == routes).all()
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-4)
    np.testing.assert_allclose(got.file_perturbed, ref.file_perturbed, atol=1e-5)
    assert (got.labels == ref.labels).all() and got.uncertain is None and ref.uncertain is None  # uncalibrated
    meta = json.loads((onnx.parent / "pair.onnx.json").read_text())
    assert meta["route"]["tta_in_graph"] is True and meta["parity"]["routes_checked"] == [0, 1]
    assert [m["tta"] for m in meta["route"]["members"]] == ["flip", "flip"]
    with pytest.raises(FakeprintError, match="inside its graph"):
        onnx_clf.predict(x[:2], tta="none")


def test_the_graph_flags_as_the_routed_model_does(exported):
    """Each member's calibration and the route's own bar, read from the metadata, flag what PyTorch flags."""
    out, onnx, x, runs = exported
    torch_clf, onnx_clf = fakeprint.load(out), load_onnx(onnx)
    ref = torch_clf.predict(x)
    bars = np.quantile(ref.probs.max(1), [0.3, 0.5, 0.7])  # bars that flag some answers and not others
    torch_clf.uncertain_below = onnx_clf.route["uncertain_below"] = float(bars[2])
    for i, bar in enumerate(bars[:2]):
        cal = {"temperature": 1.0, "uncertain_below": float(bar)}  # temperature 1: the graph's logits unchanged
        torch_clf.members[i].meta["calibration"] = onnx_clf.route["members"][i]["calibration"] = cal
    ref, got = torch_clf.predict(x), onnx_clf.predict(x)
    assert ref.uncertain is not None and 0 < ref.uncertain.sum() < len(x)
    assert (got.uncertain == ref.uncertain).all() and (got.reasons == ref.reasons).all()
    flat = np.full((1, 100, 100, 3), 128, np.uint8)  # one flat colour: flagged, whatever the score
    assert onnx_clf.predict(flat).uncertain[0] and torch_clf.predict(flat).uncertain[0]
    # inputs far from the training images (the detector's typicality, an output of the graph): flagged in both
    assert onnx_clf.route["far_above"] == pytest.approx(float(torch_clf.detector.far_above[0]))
    noise = np.random.default_rng(0).integers(0, 256, (4, 100, 100, 3), dtype=np.uint8)
    assert torch_clf.file_signals(noise)[1].all()
    assert onnx_clf.predict(noise).uncertain.all() and torch_clf.predict(noise).uncertain.all()
    assert all("far_from_training" in clf.predict(noise).why(i) for clf in (onnx_clf, torch_clf) for i in range(4))
    onnx_clf.route["far_above"] = torch_clf.detector.far_above[0] = 1e30  # nothing far: the same flags as before
    assert (onnx_clf.predict(x).uncertain == torch_clf.predict(x).uncertain).all()
    assert (onnx_clf.predict(x).reasons == torch_clf.predict(x).reasons).all()  # and for the same reasons


def test_the_service_serves_the_graph_with_each_members_grad_cam(exported):
    from fastapi.testclient import TestClient

    from fakeprint.interfaces.serve import build_service, create_app

    out, onnx, x, runs = exported
    service = build_service(onnx)
    assert service.backend == "onnx" and service.cam is not None
    routes = load_onnx(onnx).routes(load_onnx(onnx).predict(x).file_perturbed)
    pick = [int(np.flatnonzero(routes == 0)[0]), int(np.flatnonzero(routes == 1)[0])]
    with TestClient(create_app(service)) as c:
        info = c.get("/v1/model").json()
        payload = [("files", (f"{i}.png", encode(x[i]), "image/png")) for i in pick]
        rows = c.post("/v1/predict", params={"cam": 1}, files=payload).json()["results"]
    assert info["name"].startswith("routed(") and info["gradcam"]["available"] is True
    names = [info["route"]["pristine"], info["route"]["perturbed"]]
    assert [row["cam"]["member"] for row in rows] == names and all(0 <= r["file_perturbed"] <= 1 for r in rows)


def test_what_cannot_be_exported_or_loaded_is_one_clear_line(exported, tmp_path, cli):
    out, onnx, x, runs = exported
    avg = tmp_path / "avg.ensemble.json"
    avg.write_text(json.dumps({"format": "fakeprint-ensemble/1", "members": [str(r) for r in runs],
                               "calibration": None}))
    proc = cli("export", str(avg), "--onnx", str(tmp_path / "avg.onnx"))
    assert proc.returncode == 2 and "averaged ensemble" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "avg.onnx").exists()
    meta = json.loads((onnx.parent / "pair.onnx.json").read_text())
    for change, field in (({"threshold": 2}, "route.threshold"), ({"members": []}, "route.members"),
                          ({"tta_in_graph": False}, "route.tta_in_graph")):
        bad = tmp_path / f"bad{len(field)}.onnx"
        bad.write_bytes(onnx.read_bytes())
        (tmp_path / f"{bad.name}.json").write_text(json.dumps(meta | {"route": meta["route"] | change}))
        with pytest.raises(CheckpointError, match=field):
            load_onnx(bad)
