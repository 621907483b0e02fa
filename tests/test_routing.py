"""A routed ensemble (issue 38): a file detector sends images it calls pristine to one model and the others to
another; every image's statistics are computed once; bad route files and arguments get one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fakeprint
from conftest_service import make_checkpoint
from fakeprint.core.errors import CheckpointError
from fakeprint.data.cache import load_split
from fakeprint.data.demo import make_demo_dataset
from fakeprint.data.splits import write_split_csv
from fakeprint.engine.predict import RoutedClassifier
from fakeprint.engine.routing import fit_router
from fakeprint.features.perturb import perturbed_images
from fakeprint.features.stat_ops import shared_statistics
from fakeprint.features.statistics import StatFeatures


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    base = tmp_path_factory.mktemp("route")
    data = make_demo_dataset(base / "data", n_train=200, n_val=20, n_test=1, seed=5)
    full = load_split(data, "train", progress=False)
    idx = np.arange(len(full.ids))
    runs = []
    for seed in (1, 2):
        run = make_checkpoint(base / f"r{seed}", model="hybrid", seed=seed, sharpen=4.0, tta="flip")
        write_split_csv(run / "split.csv", full.ids, full.labels, idx[:160], idx[160:])  # the last 40 held out
        runs.append(run)
    out = base / "pair.ensemble.json"
    route = fit_router(str(runs[0]), str(runs[1]), data, out, images=120, seed=0)
    return base, data, runs, out, route, full


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
