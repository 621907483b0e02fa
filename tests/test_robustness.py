"""The robustness suite: perturbations are real files from real encoders, read back through fakeprint's decode
path; the report scores each one, and its clean row is exactly what `evaluate` says."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest_service import make_checkpoint, random_images
from fakeprint.core.errors import FakeprintError
from fakeprint.data.dataset import decode_bytes, decode_image
from fakeprint.data.demo import make_demo_dataset
from fakeprint.engine.evaluate import evaluate_checkpoint
from fakeprint.features.perturb import SUITES, parse, perturb_file, perturbed_images, strength, suite
from fakeprint.studies.robustness import run_robustness


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty"), ("gif", "unknown kind 'gif'"), ("jpeg:q=0", "q=0 is outside 1..100"),
    ("jpeg:q=high", "'high' is not a number"), ("jpeg:sub=411", "sub='411' is not one of"),
    ("resize:filter=cubic", "filter='cubic'"), ("blur:radius=1", "'radius=1' is not key=value with a key of blur"),
    ("jpeg:q=90+", "unknown kind ''"), ("crop:f=0", "outside"),
])
def test_a_bad_spec_is_one_error_naming_it(spec, message):
    with pytest.raises(FakeprintError, match="perturbation") as e:
        parse(spec)
    assert message in str(e.value) and repr(spec) in str(e.value)


def test_the_named_suites_parse_and_a_list_of_specs_is_checked():
    for name, specs in SUITES.items():
        assert suite(name) == list(specs) and all(parse(s) for s in specs)
    assert suite("jpeg:q=80; webp:q=70") == ["jpeg:q=80", "webp:q=70"]
    with pytest.raises(FakeprintError, match="nope"):
        suite("jpeg:q=80;nope")


def test_encoders_are_real_and_honour_their_settings():
    image = random_images(1)[0]
    for sub, want in (("420", 2), ("444", 0), ("422", 1)):
        data = perturb_file(image, f"jpeg:q=75,sub={sub}")
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and JpegImagePlugin.get_sampling(im) == want
    assert perturb_file(image, "webp:q=80")[8:12] == b"WEBP"
    assert perturb_file(image, "jpeg:q=95") != perturb_file(image, "jpeg:q=50")
    double = perturb_file(image, "jpeg2:q=90,q2=60")
    assert double[:2] == b"\xff\xd8" and double != perturb_file(image, "jpeg:q=90")


def test_geometric_steps_give_files_of_their_size_and_the_last_encoder_wins():
    image = random_images(1)[0]
    sizes = {"resize:s=0.75": (75, 75), "resize:size=200,filter=nearest": (200, 200), "crop:f=0.9": (90, 90),
             "crop:f=0.7+resize:s=2": (140, 140)}
    for spec, size in sizes.items():
        with Image.open(io.BytesIO(perturb_file(image, spec))) as im:
            assert im.format == "PNG" and im.size == size, spec
    with Image.open(io.BytesIO(perturb_file(image, "resize:s=0.5+jpeg:q=85"))) as im:
        assert im.format == "JPEG" and im.size == (50, 50)


def test_none_is_lossless_noise_is_seeded_and_decoding_bytes_is_decoding_the_file(tmp_path):
    image = random_images(1)[0]
    assert np.array_equal(decode_bytes(perturb_file(image, "none")), image)
    assert perturb_file(image, "noise:sigma=5", seed=1) == perturb_file(image, "noise:sigma=5", seed=1)
    assert perturb_file(image, "noise:sigma=5", seed=1) != perturb_file(image, "noise:sigma=5", seed=2)
    data = perturb_file(image, "resize:s=0.75+webp:q=70")
    (tmp_path / "x.webp").write_bytes(data)
    assert np.array_equal(decode_bytes(data), decode_image(tmp_path / "x.webp"))
    batch = perturbed_images(random_images(3), "jpeg:q=60", seed=4)
    assert batch.shape == (3, 100, 100, 3) and np.array_equal(batch, perturbed_images(random_images(3), "jpeg:q=60",
                                                                                        seed=4))


def test_strength_names_the_family_and_its_dial():
    assert strength("jpeg:q=75,sub=444") == ("jpeg (444)", 75.0)
    assert strength("resize:s=0.75,filter=lanczos") == ("resize (lanczos)", 0.75)
    assert strength("resize:size=200") == ("resize (bicubic)", 2.0)
    assert strength("crop:f=0.9+webp:q=80") == ("chain", 0.0)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    base = tmp_path_factory.mktemp("robust")
    data = make_demo_dataset(base / "data", n_train=10, n_val=40, n_test=1, seed=5)
    ckpt = make_checkpoint(base / "ck") / "best.safetensors"
    specs = "none;jpeg:q=50;resize:s=0.5;crop:f=0.8+webp:q=60"
    report = run_robustness([str(ckpt)], data, "validation", specs, base / "out", progress=False)
    return data, ckpt, report, base / "out"


def test_the_report_scores_every_perturbation_and_its_clean_row_is_evaluates(scored):
    data, ckpt, report, out = scored
    assert [r["spec"] for r in report["results"]] == ["none", "jpeg:q=50", "resize:s=0.5", "crop:f=0.8+webp:q=60"]
    clean = evaluate_checkpoint(ckpt, data, "validation")
    assert report["results"][0]["accuracy"] == pytest.approx(clean["accuracy"])
    for r in report["results"]:
        assert r["n"] == 40 and 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1 and r["uncertain"] is None
    saved = json.loads((out / "robustness.json").read_text())
    assert saved["results"] == report["results"] and saved["split"] == "validation"
    md = (out / "robustness.md").read_text()
    assert "`crop:f=0.8+webp:q=60`" in md and "TTA" in md and "epoch" in md
    assert (out / "robustness.png").stat().st_size > 1000


def test_the_command_runs_the_suite_and_refuses_a_bad_spec_before_loading_anything(cli, scored, tmp_path):
    data, ckpt, _, _ = scored
    proc = cli("robustness", str(ckpt), "--data", str(data), "--split", "validation", "--suite", "jpeg:q=80;webp:q",
               "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "perturbation 'webp:q'" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("robustness", str(ckpt), "--data", str(data), "--split", "validation", "--suite", "blur:r=1",
               "--out", str(tmp_path / "r"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["spec"] == "blur:r=1" and (tmp_path / "r" / "robustness.md").exists()


def test_a_blank_or_one_pixel_image_is_flagged_uncertain(tmp_path):
    """A 1 x 1 black PNG or a blank page is no generator's output: a calibrated model flags it, whatever it says."""
    import fakeprint

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (300, 200), (250, 250, 250)).save(tmp_path / "blank.png")
    Image.new("RGB", (64, 64), (217, 163, 130)).save(tmp_path / "beige.png")  # flat, but not grey
    pred = fakeprint.load("default").predict([tmp_path / "dot.png", tmp_path / "blank.png", tmp_path / "beige.png"])
    assert pred.uncertain is not None and pred.uncertain.all()
    noisy = fakeprint.load("default").predict(random_images(4))
    assert noisy.uncertain is not None and len(noisy.uncertain) == 4  # judged by the score, not flat


def test_other_sizes_are_resampled_by_area_when_shrinking_and_bicubically_when_growing(tmp_path):
    from fakeprint.data.dataset import resize_filter

    assert resize_filter((200, 200)) == Image.Resampling.BOX and resize_filter((100, 300)) == Image.Resampling.BOX
    assert resize_filter((75, 75)) == Image.Resampling.BICUBIC and resize_filter((90, 300)) == Image.Resampling.BICUBIC
    big = np.kron(random_images(1)[0], np.ones((2, 2, 1), np.uint8))  # every pixel as a 2 x 2 block
    Image.fromarray(big).save(tmp_path / "big.png")
    assert np.array_equal(decode_image(tmp_path / "big.png"), random_images(1)[0])  # the area average undoes it


def test_calibration_under_perturbations_bounds_clean_flags_and_catches_wrong_answers():
    from fakeprint.engine.calibration import calibrate_perturbed

    rng = np.random.default_rng(0)
    n = 400
    labels = rng.integers(0, 5, n)

    def logits(wrong_share: float, margin: float) -> np.ndarray:
        z = rng.normal(0, 1, (n, 5))
        wrong = rng.random(n) < wrong_share
        target = np.where(wrong, (labels + 1) % 5, labels)
        z[np.arange(n), target] += np.where(wrong, 0.8, margin)  # wrong answers are the less confident ones
        return z

    cal = calibrate_perturbed(logits(0.05, 5.0), labels, {"jpeg:q=50": logits(0.4, 3.0), "blur:r=1": logits(0.5, 2.5)},
                              max_clean_flagged=0.1)
    assert cal["temperature"] > 0 and 0 < cal["uncertain_below"] < 1 and cal["quantile"] == 0.1
    assert cal["clean_flagged_cross_fitted"] <= 0.15
    assert cal["wrong_flagged_under_perturbations_cross_fitted"] >= 0.6
    assert cal["perturbations"] == ["jpeg:q=50", "blur:r=1"] and cal["fitted_on"] == "clean and perturbed copies"
    with pytest.raises(FakeprintError, match="at least 20"):
        calibrate_perturbed(logits(0.1, 3)[:10], labels[:10], {"x": logits(0.1, 3)[:10]})


def test_the_calibrate_command_fits_on_perturbed_copies(cli, scored, tmp_path):
    import shutil

    data, ckpt, _, _ = scored
    mine = tmp_path / "c.safetensors"
    shutil.copy(ckpt, mine)
    shutil.copy(ckpt.with_suffix(".json"), mine.with_suffix(".json"))
    proc = cli("calibrate", str(mine), "--data", str(data), "--split", "validation", "--perturbed", "jpeg:q=40;nope")
    assert proc.returncode == 2 and "perturbation 'nope'" in proc.stderr
    proc = cli("calibrate", str(mine), "--data", str(data), "--split", "validation", "--perturbed",
               "jpeg:q=40;blur:r=1.5", "--max-clean-flagged", "0.2")
    assert proc.returncode == 0, proc.stderr
    cal = json.loads(mine.with_suffix(".json").read_text())["calibration"]
    assert cal["perturbations"] == ["jpeg:q=40", "blur:r=1.5"] and cal["quantile"] == 0.2
    assert "wrong_flagged_under_perturbations_cross_fitted" in cal and "flagged_share_probes" in cal
