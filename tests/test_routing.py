"""A routed ensemble (issue 38): a file detector sends images it calls pristine to one model and the others to
another; every image's statistics are computed once; bad route files and arguments get one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fakeprint
from conftest_service import make_routed
from fakeprint.core.errors import CheckpointError
from fakeprint.engine.predict import RoutedClassifier
from fakeprint.features.perturb import perturbed_images
from fakeprint.features.stat_ops import shared_statistics
from fakeprint.features.statistics import StatFeatures


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    base = tmp_path_factory.mktemp("route")
    return (base, *make_routed(base))


def test_fitting_writes_a_detector_that_tells_re_encoded_files_apart(routed):
    base, data, runs, out, route, full = routed
    saved = json.loads(out.read_text())
    assert saved["members"] == ["r1/m", "r2/m"] and saved["route"]["detector"] == "pair.router.safetensors"
    assert (base / "pair.router.safetensors").is_file()
    m = route["measured"]
    assert m["images"] == 120 and m["held_out_images"] == 30
    clf = fakeprint.load(out)
    assert isinstance(clf, RoutedClassifier) and clf.threshold == 0.5
    held = full.images[160:]  # never fitted on: the members' internal split
    p_clean = clf.predict(held).file_perturbed
    p_jpeg = clf.predict(perturbed_images(held, "jpeg:q=75")).file_perturbed
    assert p_clean.shape == (40,) and ((p_clean >= 0) & (p_clean <= 1)).all()
    assert p_jpeg.mean() > p_clean.mean() + 0.3  # a JPEG save is what the detector learned to see


def test_each_image_gets_its_members_answer_and_its_statistics_once(routed, monkeypatch):
    base, data, runs, out, route, full = routed
    clf = fakeprint.load(out)
    a, b = fakeprint.load(runs[0]), fakeprint.load(runs[1])
    x = np.concatenate([full.images[160:180], perturbed_images(full.images[180:200], "jpeg:q=60")])
    computed = []
    real = StatFeatures._forward_and_mirror
    monkeypatch.setattr(StatFeatures, "_forward_and_mirror", lambda self, t: computed.append(len(t)) or real(self, t))
    got = clf.predict(x, batch_size=16)
    assert sum(computed) == len(x)  # the detector's; each member took its rows from there
    monkeypatch.undo()
    second = got.file_perturbed >= clf.threshold
    assert 0 < second.sum() < len(x)  # both members answer some
    np.testing.assert_allclose(got.probs[~second], a.predict(x[~second]).probs, atol=1e-5)
    np.testing.assert_allclose(got.probs[second], b.predict(x[second]).probs, atol=1e-5)
    assert got.uncertain is None  # the members are not calibrated: nothing is known
    assert "file_perturbed" in got.as_dicts()[0]


def test_shared_statistics_serve_any_subset_of_rows_already_computed():
    sf = StatFeatures("v1", "none")
    x = torch.rand(12, 3, 100, 100)
    with shared_statistics():
        whole = torch.cat([sf.forward_and_mirror(c)[0] for c in x.split(5)])
        calls = []
        sf._forward_and_mirror = lambda t: calls.append(t) or (torch.zeros(len(t), sf.dim),) * 2
        pick = torch.tensor([11, 0, 6, 5])
        part = sf.forward_and_mirror(x[pick])[0]
        assert not calls and torch.equal(part, whole[pick])
        sf.forward_and_mirror(torch.cat([x[:2], torch.rand(1, 3, 100, 100)]))  # a row not seen: computed
        assert len(calls) == 1


def test_bad_route_files_and_arguments_name_what_is_wrong(routed, tmp_path, cli):
    base, data, runs, out, route, full = routed
    body = json.loads(out.read_text())
    for change, field in (({"threshold": 1.5}, "route.threshold"), ({"detector": "gone.safetensors"}, "missing")):
        bad = base / f"bad{len(field)}.ensemble.json"
        bad.write_text(json.dumps(body | {"route": body["route"] | change}))
        with pytest.raises(CheckpointError, match=field):
            fakeprint.load(bad)
    (base / "junk.router.safetensors").write_bytes(b"not safetensors")
    bad = base / "junk.ensemble.json"
    bad.write_text(json.dumps(body | {"route": body["route"] | {"detector": "junk.router.safetensors"}}))
    with pytest.raises(CheckpointError, match="junk.router.safetensors"):
        fakeprint.load(bad)
    proc = cli("route", str(runs[0]), str(runs[1]), "--data", str(data), "--out", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "NAME.ensemble.json" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("route", str(runs[0]), str(runs[1]), "--data", str(data), "--out", str(tmp_path / "x.ensemble.json"),
               "--threshold", "0")
    assert proc.returncode == 2 and "--threshold" in proc.stderr


def test_the_shipped_routed_ensemble_loads_by_name():
    clf = fakeprint.load("routed")
    assert isinstance(clf, RoutedClassifier) and [m.name for m in clf.members] == ["hybrid", "hybrid"]
    blank = np.full((2, 100, 100, 3), 128, np.uint8)
    got = clf.predict(blank)
    assert got.uncertain is not None and got.uncertain.all()  # flat inputs: both members are calibrated


def test_predict_and_serve_take_the_shipped_routed_ensemble_by_name(cli, tmp_path):
    from fastapi.testclient import TestClient

    from conftest_service import encode, random_images
    from fakeprint.interfaces.serve import build_service, create_app

    img = tmp_path / "a.png"
    img.write_bytes(encode(random_images(1, seed=3)[0]))
    proc = cli("predict", "routed", str(img), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["label"] in {"0", "1", "2", "3", "4"}
    with TestClient(create_app(build_service("routed"))) as c:
        info = c.get("/v1/model").json()
        r = c.post("/v1/predict", files={"files": ("a.png", img.read_bytes(), "image/png")})
    assert r.status_code == 200 and isinstance(r.json()["results"][0]["uncertain"], bool)
    assert 0.0 <= r.json()["results"][0]["file_perturbed"] <= 1.0
    assert info["name"].startswith("routed(") and len(info["members"]) == 2
    assert info["route"] == {"threshold": 0.5, "pristine": "default", "perturbed": "robust"}
    # uniform noise is far from every training image: flagged, and each interface says why
    noise = tmp_path / "noise.png"
    noise.write_bytes(encode(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)))
    proc = cli("predict", "routed", str(noise), "--json")
    row = json.loads(proc.stdout)[0]
    assert row["uncertain"] is True and "far_from_training" in row["uncertain_reasons"]
    proc = cli("predict", "routed", str(noise))
    assert proc.returncode == 0 and "\tuncertain (" in proc.stdout and "far_from_training" in proc.stdout
    with TestClient(create_app(build_service("routed"))) as c:
        res = c.post("/v1/predict", files={"files": ("n.png", noise.read_bytes(), "image/png")}).json()["results"][0]
    assert res["uncertain"] is True and "far_from_training" in res["uncertain_reasons"]
    assert isinstance(r.json()["results"][0]["uncertain_reasons"], list)
    with TestClient(create_app(build_service("default"))) as c:
        assert c.get("/v1/model").json()["route"] is None
        js = c.get("/static/app.js").text
    assert "r.file_perturbed" in js and "route.threshold" in js  # the page says which kind of file, which member
    assert "r.uncertain_reasons" in js and "far_from_training" in js  # and why an answer is uncertain


def test_a_routed_model_is_explained_by_the_member_that_answered_each_image(routed):
    """Grad-CAM of a routed model: each image's map is its answering member's map for the class answered, and the
    service says which member that was (the route decides it; the detector is not what answers)."""
    from fastapi.testclient import TestClient

    from conftest_service import encode
    from fakeprint.interfaces.serve import build_service, create_app
    from fakeprint.reports.gradcam import GradCAM, RoutedGradCAM

    base, data, runs, out, route, full = routed
    x = np.concatenate([full.images[160:164], perturbed_images(full.images[164:168], "jpeg:q=60")])
    service = build_service(str(out))
    clf = service.classifier
    assert isinstance(service.cam, RoutedGradCAM) and len(service.cam.cams) == 2
    got = clf.predict(x)
    routes = clf.routes(got.file_perturbed)
    assert 0 < routes.sum() < len(x)  # both members answer some of these
    res = service.cam(x, classes=got.labels, routes=routes)
    for which, run in enumerate(runs):
        idx = np.flatnonzero(routes == which)
        own = GradCAM(fakeprint.load(run).model)(x[idx], classes=got.labels[idx])
        np.testing.assert_allclose(res.maps[idx], own.maps, atol=1e-5)
    assert (res.members == routes).all() and (res.classes == got.labels).all()
    with pytest.raises(ValueError, match="routes"):
        service.cam(x, routes=np.full(len(x), 2))
    with TestClient(create_app(service)) as c:
        info = c.get("/v1/model").json()
        payload = [("files", (f"{i}.png", encode(img), "image/png")) for i, img in enumerate(x[2:6])]
        rows = c.post("/v1/predict", params={"cam": 1}, files=payload).json()["results"]
    names = [info["route"]["pristine"], info["route"]["perturbed"]]  # what the page names the answering member by
    assert info["gradcam"]["available"] is True and service.cam.names == names
    for row, which in zip(rows, routes[2:6], strict=True):
        assert row["cam"]["member"] == names[which] and row["cam"]["target"] == row["label"]
    no_cam = build_service(str(out), cam=False)
    assert no_cam.cam is None and no_cam.cam_note == "disabled"


def test_a_routed_model_whose_member_is_an_ensemble_file_is_scored_on_the_split_every_checkpoint_held_out(routed):
    """An ensemble file may name another (two seeds averaged on the perturbed route): scoring finds the checkpoints
    behind both and the split each of them held out."""
    from fakeprint.engine.evaluate import load_scored
    from fakeprint.models.ensemble_file import write_ensemble

    base, data, runs, out, route, full = routed
    pair = base / "avg.ensemble.json"
    write_ensemble(pair, [str(runs[1]), str(runs[0])], None)
    nested = base / "nested.ensemble.json"
    body = json.loads(out.read_text())
    nested.write_text(json.dumps(body | {"members": [str(runs[0]), "avg.ensemble.json"]}))
    clf, ds = load_scored([nested], data, "internal", progress=False)
    assert isinstance(clf, RoutedClassifier) and len(ds.labels) == 40  # the 40 images every checkpoint held out
    got = clf.predict(ds.images)
    assert got.probs.shape == (40, 5) and got.file_perturbed.shape == (40,)


def _preds(top: list[float], wrong: list[bool], second: list[bool], own: list[bool] | None = None):
    """Predictions of two classes whose top probability, correctness (against label 0), route and own flag are given."""
    from fakeprint.engine.predict import Predictions

    top_a = np.asarray(top, np.float32)
    labels = np.asarray(wrong, np.int64)  # wrong: predicted 1, right: predicted 0
    probs = np.where(labels[:, None] == 1, np.c_[1 - top_a, top_a], np.c_[top_a, 1 - top_a]).astype(np.float32)
    return Predictions(labels, probs, ["0", "1"], np.asarray(own or [False] * len(top), bool),
                       np.where(np.asarray(second), 0.9, 0.1).astype(np.float32))


def test_the_route_threshold_is_the_lowest_that_flags_the_share_of_wrong_answers_asked_for():
    from fakeprint.engine.routing import route_threshold

    tops = [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99]
    wrong = [True] * 10
    labels = np.zeros(10, np.int64)
    u = route_threshold([_preds(tops, wrong, [True] * 10)], labels, 0.5, 0.7)
    assert 0.85 < u < 0.851  # seven of ten below it, the eighth (0.9) not
    u = route_threshold([_preds(tops[:5], wrong[:5], [True] * 5), _preds(tops[5:], wrong[5:], [True] * 5)],
                        labels[:5], 0.5, 0.7)
    assert 0.85 < u < 0.851  # the same answers in two perturbations
    own = [False] * 6 + [True] * 4  # the member already flags the four surest: three more are needed
    assert 0.65 < route_threshold([_preds(tops, wrong, [True] * 10, own)], labels, 0.5, 0.7) < 0.651
    assert route_threshold([_preds(tops, wrong, [True] * 10, [True] * 10)], labels, 0.5, 0.7) == 0.0
    # first-route wrong answers are never flagged by it: when they are too many, no threshold reaches the share
    assert route_threshold([_preds(tops, wrong, [False] * 5 + [True] * 5)], labels, 0.5, 0.7) == 1.0


def test_calibrating_a_route_writes_its_flag_and_flags_only_second_route_answers_below_it(routed, tmp_path, cli):
    import shutil

    from fakeprint.engine.calibration import calibrate_checkpoint

    base, data, runs, out, route, full = routed
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    for r in ("r1/m", "r2/m"):
        calibrate_checkpoint(copy / r, data)
    pair = copy / "pair.ensemble.json"
    proc = cli("calibrate", str(pair), "--data", str(data), "--perturbed", "jpeg:q=60;blur:r=1.0",
               "--wrong-flagged", "0.8")
    assert proc.returncode == 0, proc.stderr
    fit = json.loads(proc.stdout)
    saved = json.loads(pair.read_text())["route"]
    assert saved["uncertain_below"] == fit["uncertain_below"] and saved["uncertain_fit"]["n"] == 40
    assert saved["detector"] == "pair.router.safetensors" and saved["threshold"] == 0.5  # the rest kept
    assert set(fit["cross_fitted"]) == {"clean_flagged", "wrong_flagged_under_perturbations",
                                        "right_flagged_under_perturbations"}
    assert fit["in_sample"]["wrong_flagged_under_perturbations"] >= 0.8 or fit["uncertain_below"] == 1.0
    clf = fakeprint.load(pair)
    assert clf.uncertain_below == fit["uncertain_below"]
    x = np.concatenate([full.images[160:200], perturbed_images(full.images[160:200], "jpeg:q=60")])
    got = clf.predict(x)
    clf.uncertain_below = None
    own = clf.predict(x)
    second = got.file_perturbed >= clf.threshold
    extra = got.uncertain & ~own.uncertain
    assert not extra[~second].any()  # pristine-route answers keep their member's flag
    np.testing.assert_array_equal(extra[second], (got.probs.max(1) < fit["uncertain_below"])[second]
                                  & ~own.uncertain[second])
    np.testing.assert_array_equal(got.labels, own.labels)  # only the flag changes


def test_route_calibration_refuses_what_it_cannot_use(routed, tmp_path, cli):
    base, data, runs, out, route, full = routed
    proc = cli("calibrate", str(out), "--data", str(data), "--wrong-flagged", "1.5")
    assert proc.returncode == 2 and "--wrong-flagged" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("calibrate", str(out), "--data", str(data))  # the fixture's members are not calibrated
    assert proc.returncode == 2 and "calibrated first" in proc.stderr
    proc = cli("calibrate", str(out), "--data", str(data), "--out", str(tmp_path / "x.ensemble.json"))
    assert proc.returncode == 2 and "--out" in proc.stderr
    proc = cli("calibrate", str(runs[0]), "--data", str(data), "--wrong-flagged", "0.7")
    assert proc.returncode == 2 and "routed" in proc.stderr
    body = json.loads(out.read_text())
    bad = tmp_path / "bad.ensemble.json"
    for value in (2, "high", True):
        bad.write_text(json.dumps(body | {"route": body["route"] | {"detector": str(base / "pair.router.safetensors"),
                                                                   "uncertain_below": value}}))
        with pytest.raises(CheckpointError, match="route.uncertain_below"):
            fakeprint.load(bad)
