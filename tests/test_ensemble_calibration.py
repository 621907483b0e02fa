"""An ensemble's calibration (issue 38: "the ensemble gets calibration"): ``fakeprint calibrate A B --out
NAME.ensemble.json`` fits a temperature and an uncertain threshold on the members' averaged probabilities; the
ensemble file then loads, predicts, scores and serves as one calibrated model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient

import fakeprint
from conftest_service import encode, make_checkpoint, pil_limit_restored, random_images  # noqa: F401
from fakeprint.core.errors import FakeprintError
from fakeprint.data.demo import make_demo_dataset
from fakeprint.engine.calibration import calibrate_ensemble
from fakeprint.engine.predict import EnsembleClassifier
from fakeprint.interfaces.serve import build_service, create_app
from fakeprint.models.ensemble_file import read_ensemble, write_ensemble


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    base = tmp_path_factory.mktemp("enscal")
    data = make_demo_dataset(base / "data", n_train=10, n_val=40, n_test=1, seed=3)
    a = make_checkpoint(base / "a", seed=1, sharpen=6.0)
    b = make_checkpoint(base / "b", model="threecnn", seed=2, sharpen=6.0)
    return base, data, a, b


def test_the_ensemble_file_holds_members_and_a_calibration_that_predict_applies(two):
    base, data, a, b = two
    out = base / "pair.ensemble.json"
    cal = calibrate_ensemble([str(a), str(b)], data, out, split="validation")
    saved = json.loads(out.read_text())
    assert saved["format"] == "fakeprint-ensemble/1" and saved["members"] == ["a/m", "b/m"]  # relative to the file
    assert saved["calibration"]["temperature"] == pytest.approx(cal["temperature"]) and "flagged_share_probes" in cal
    ens = fakeprint.load(out)
    plain = fakeprint.load([a, b])
    assert isinstance(ens, EnsembleClassifier) and ens.meta["calibration"]["uncertain_below"] == cal["uncertain_below"]
    x = random_images(12, seed=4)
    got, raw = ens.predict(x), plain.predict(x)
    assert got.uncertain is not None and plain.predict(x).uncertain is None
    scaled = raw.probs.astype(np.float64) ** (1 / cal["temperature"])
    scaled /= scaled.sum(1, keepdims=True)
    np.testing.assert_allclose(got.probs, scaled, atol=1e-5)  # softmax(log p / T)
    assert (got.labels == raw.labels).all()
    assert (got.uncertain == (got.probs.max(1) < cal["uncertain_below"])).all()
    blank = np.full((1, 100, 100, 3), 200, np.uint8)  # flat: flagged whatever the score
    assert ens.predict(blank).uncertain[0]


def test_the_cli_calibrates_an_ensemble_and_evaluate_and_serve_take_its_file(two, cli):
    base, data, a, b = two
    out = base / "cli.ensemble.json"
    proc = cli("calibrate", str(a), str(b), "--data", str(data), "--split", "validation", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["members_calibrated"] == [False, False] and out.exists()
    proc = cli("evaluate", str(out), "--data", str(data), "--split", "validation", "--out", str(base / "ev"))
    assert proc.returncode == 0, proc.stderr
    with TestClient(create_app(build_service(str(out)))) as c:
        info = c.get("/v1/model").json()
        r = c.post("/v1/predict", files={"files": ("a.png", encode(random_images(1)[0]), "image/png")})
    assert info["calibration"]["temperature"] > 0 and len(info["members"]) == 2 and info["source"] == out.name
    assert r.status_code == 200 and isinstance(r.json()["results"][0]["uncertain"], bool)


def test_ensemble_calibration_refuses_what_it_cannot_do(two, cli, tmp_path):
    base, data, a, b = two
    proc = cli("calibrate", str(a), str(b), "--data", str(data), "--split", "validation")
    assert proc.returncode == 2 and "--out NAME.ensemble.json" in proc.stderr
    proc = cli("calibrate", str(a), "--data", str(data), "--split", "validation", "--out", str(tmp_path / "x.ensemble.json"))
    assert proc.returncode == 2 and "two or more models" in proc.stderr
    with pytest.raises(FakeprintError, match="must end in .ensemble.json"):
        write_ensemble(tmp_path / "x.json", [str(a), str(b)], None)
    bad = tmp_path / "bad.ensemble.json"
    for body, field in (({"format": "fakeprint-ensemble/1", "members": [str(a)]}, "members"),
                        ({"format": "fakeprint-ensemble/1", "members": [str(a), str(b)],
                          "calibration": {"temperature": -1, "uncertain_below": 0.5}}, "calibration.temperature"),
                        ({"format": "other", "members": []}, "format")):
        bad.write_text(json.dumps(body))
        with pytest.raises(FakeprintError, match=field):
            read_ensemble(bad)
        proc = cli("predict", str(bad), str(tmp_path / "none.png"))
        assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr
