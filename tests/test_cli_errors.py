"""Every bad input of `fakeprint data check` and `train` gets a clear message naming the file or row,
a non-zero exit and no traceback."""

import pytest

from conftest import FAST_TRAIN


def _assert_clean_failure(proc, *needles):
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"


def test_check_of_a_good_dataset_passes(cli, tiny_data):
    proc = cli("data", "check", str(tiny_data))
    assert proc.returncode == 0, proc.stderr
    assert "train: 100 images" in proc.stdout and "0: 20" in proc.stdout and "100x100 (100)" in proc.stdout
    assert "no problems found" in proc.stdout


def _first_id(root, split="train"):
    return (root / f"{split}.csv").read_text().splitlines()[1].split(",")[0]


def test_missing_image_names_the_row(cli, tiny_data):
    image_id = _first_id(tiny_data)
    (tiny_data / "train" / f"{image_id}.png").unlink()
    _assert_clean_failure(cli("data", "check", str(tiny_data)), "train.csv, row 2", image_id, "not found")


def test_unreadable_image_names_the_file(cli, tiny_data):
    image_id = _first_id(tiny_data)
    (tiny_data / "train" / f"{image_id}.png").write_bytes(b"this is not a png")
    _assert_clean_failure(cli("data", "check", str(tiny_data)), f"{image_id}.png", "not an image")


@pytest.mark.parametrize("label,message", [("7", "label 7 out of range 0..4"), ("cat", "label 'cat' is not an integer"),
                                           ("", "label '' is not an integer")])
def test_bad_label_names_the_row(cli, tiny_data, label, message):
    lines = (tiny_data / "train.csv").read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + "," + label
    (tiny_data / "train.csv").write_text("\n".join(lines) + "\n")
    _assert_clean_failure(cli("data", "check", str(tiny_data)), "train.csv, row 4", message)


def test_duplicate_id_names_both_rows(cli, tiny_data):
    lines = (tiny_data / "train.csv").read_text().splitlines()
    lines.append(lines[1])
    (tiny_data / "train.csv").write_text("\n".join(lines) + "\n")
    _assert_clean_failure(cli("data", "check", str(tiny_data)), f"row {len(lines)}", "duplicate image_id", "first at row 2")


def test_empty_csv(cli, tiny_data):
    (tiny_data / "validation.csv").write_text("")
    _assert_clean_failure(cli("data", "check", str(tiny_data)), "validation.csv", "empty CSV")


def test_header_only_csv(cli, tiny_data):
    (tiny_data / "validation.csv").write_text("image_id,label\n")
    _assert_clean_failure(cli("data", "check", str(tiny_data)), "validation.csv", "a header but no rows")


def test_missing_column(cli, tiny_data):
    text = (tiny_data / "train.csv").read_text().replace("image_id,label", "image_id,klass", 1)
    (tiny_data / "train.csv").write_text(text)
    _assert_clean_failure(cli("data", "check", str(tiny_data)), "train.csv, row 1", "missing column 'label'")


def test_missing_dataset_folder(cli, tmp_path):
    _assert_clean_failure(cli("data", "check", str(tmp_path / "nope")), "nope", "not found")


def test_train_on_a_broken_dataset_refuses_before_training(cli, tiny_data, tmp_path):
    image_id = _first_id(tiny_data)
    (tiny_data / "train" / f"{image_id}.png").unlink()
    proc = cli("train", "--data", str(tiny_data), *FAST_TRAIN, "--out", str(tmp_path / "run"))
    _assert_clean_failure(proc, "train.csv, row 2", image_id)
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_train_with_a_bad_override_names_the_key(cli, tiny_data, tmp_path):
    proc = cli("train", "--data", str(tiny_data), "--config", "threecnn", "--set", "epoch=3", "--out", str(tmp_path / "r"))
    _assert_clean_failure(proc, "unknown config key 'epoch'")


def test_evaluate_a_missing_checkpoint(cli, tiny_data, tmp_path):
    _assert_clean_failure(cli("evaluate", str(tmp_path / "nope"), "--data", str(tiny_data)), "checkpoint not found")


def test_predict_a_file_that_is_not_an_image(cli, tmp_path):
    from fakeprint.models import create_model
    from fakeprint.models.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "run" / "best", create_model("fpnet_tiny"), {"model": "fpnet_tiny", "num_classes": 5})
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    _assert_clean_failure(cli("predict", str(tmp_path / "run"), str(bad)), "notes.png", "not an image")
