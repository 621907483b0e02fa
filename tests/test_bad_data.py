"""The bad-data matrix: each bad input is either handled correctly (converted, resized) or refused with a
message naming the file and row; `on_bad_image=skip` skips and reports every skipped file."""


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fakeprint.core.errors import DataError
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import check_dataset, read_csv


def _dataset(root, images: dict, labels: dict | None = None, csv_text: str | None = None):
    """Write train.csv and train/ with the given {filename: writer} images."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    for name, write in images.items():
        write(root / "train" / name)
    if csv_text is None:
        labels = labels or {}
        rows = [f"{name.rsplit('.', 1)[0]},{labels.get(name, i % 5)}" for i, name in enumerate(images)]
        csv_text = "image_id,label\n" + "\n".join(rows) + "\n"
    (root / "train.csv").write_text(csv_text, newline="")
    return root


def rgb(size=(100, 100), colour=(10, 200, 30)):
    return lambda p: Image.new("RGB", size, colour).save(p)


GOOD = {f"ok{i}.png": rgb(colour=(i * 20, 50, 90)) for i in range(5)}


# ---------------------------------------------------------------- images that are converted, not refused

def test_modes_and_sizes_are_converted(tmp_path):
    def gray(p):
        Image.new("L", (100, 100), 77).save(p)

    def rgba(p):
        Image.new("RGBA", (100, 100), (200, 100, 50, 255)).save(p)

    def palette(p):
        im = Image.new("P", (100, 100), 1)
        im.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
        im.save(p)

    def sixteen(p):
        Image.fromarray(np.full((100, 100), 65535, dtype=np.uint16)).save(p)

    def small(p):
        Image.new("RGB", (50, 80), (9, 9, 9)).save(p)

    def jpeg(p):
        Image.new("RGB", (100, 100), (128, 128, 128)).save(p, quality=95)

    def webp(p):
        Image.new("RGB", (100, 100), (1, 2, 3)).save(p, lossless=True)

    imgs = {"gray.png": gray, "rgba.png": rgba, "pal.png": palette, "sixteen.png": sixteen, "small.png": small,
            "j.jpg": jpeg, "w.webp": webp}
    root = _dataset(tmp_path, imgs)
    data = load_split(root, "train", progress=False)
    by_id = dict(zip(data.ids, data.images, strict=True))
    assert data.images.shape == (7, 100, 100, 3) and data.images.dtype == np.uint8
    assert (by_id["gray"] == 77).all()
    assert (by_id["rgba"] == [200, 100, 50]).all()
    assert (by_id["pal"] == [12, 34, 56]).all()
    assert (by_id["sixteen"] == 255).all()
    assert (by_id["small"] == 9).all()
    assert np.abs(by_id["j"].astype(int) - 128).max() <= 2
    assert (by_id["w"] == [1, 2, 3]).all()


def test_bom_crlf_and_extra_columns_are_read(tmp_path):
    text = "\ufeffimage_id,label,source\r\n" + "".join(f"ok{i},{i},x\r\n" for i in range(5))
    root = _dataset(tmp_path, GOOD, csv_text=text)
    data = load_split(root, "train", progress=False)
    assert data.ids == [f"ok{i}" for i in range(5)] and data.labels.tolist() == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- images that are refused

def _truncated(p):
    Image.new("RGB", (100, 100), (1, 2, 3)).save(p)
    Image.effect_noise((100, 100), 50).convert("RGB").save(p)
    p.write_bytes(p.read_bytes()[:200])


BAD_IMAGES = {
    "truncated PNG": (_truncated, "unreadable image"),
    "zero-byte file": (lambda p: p.write_bytes(b""), "not an image"),
    "text named .png": (lambda p: p.write_text("hello, I am text"), "not an image"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_is_refused_naming_the_file(tmp_path, case):
    write, message = BAD_IMAGES[case]
    root = _dataset(tmp_path, GOOD | {"bad.png": write})
    with pytest.raises(DataError, match=rf"bad\.png: {message}"):
        load_split(root, "train", progress=False)
    _, problems = check_dataset(root)
    assert any(p.file.endswith("bad.png") and message in p.message for p in problems)


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_skip_mode_skips_and_reports_each_bad_image(tmp_path, case):
    write, message = BAD_IMAGES[case]
    root = _dataset(tmp_path, GOOD | {"bad.png": write})
    data = load_split(root, "train", on_bad_image="skip", progress=False)
    assert data.ids == [f"ok{i}" for i in range(5)] and len(data.images) == 5
    assert len(data.skipped) == 1 and data.skipped[0].file.endswith("bad.png") and message in data.skipped[0].message
    again = load_split(root, "train", on_bad_image="skip", progress=False)  # from the cache: still reported
    assert again.ids == data.ids and [str(p) for p in again.skipped] == [str(p) for p in data.skipped]


def test_missing_image_is_refused_or_skipped(tmp_path):
    root = _dataset(tmp_path, GOOD, csv_text="image_id,label\n" + "".join(f"ok{i},0\n" for i in range(5)) + "gone,1\n")
    with pytest.raises(DataError, match=r"train\.csv, row 7: image 'gone' not found"):
        load_split(root, "train", progress=False)
    data = load_split(root, "train", on_bad_image="skip", progress=False)
    assert "gone" not in data.ids and any("gone" in str(p) for p in data.skipped)


CSV_CASES = {
    "no header": ("ok0,0\nok1,1\n", "row 1: missing column 'image_id' (the file seems to have no header line)"),
    "non-integer label": ("image_id,label\nok0,zero\n", "row 2: label 'zero' is not an integer"),
    "float label": ("image_id,label\nok0,1.5\n", "row 2: label '1.5' is not an integer"),
    "label out of range": ("image_id,label\nok0,5\n", "row 2: label 5 out of range 0..4"),
    "negative label": ("image_id,label\nok0,-1\n", "row 2: label -1 out of range 0..4"),
    "duplicate id": ("image_id,label\nok0,0\nok1,1\nok0,2\n", "row 4: duplicate image_id 'ok0' (first at row 2)"),
    "parent path": ("image_id,label\n../secret,0\n", "row 2: image_id '../secret' contains a path separator or '..'"),
    "absolute path": ("image_id,label\n/etc/passwd,0\n", "row 2: image_id '/etc/passwd' contains a path separator"),
    "backslash": ("image_id,label\na\\b,0\n", "row 2: image_id 'a\\\\b' contains a path separator"),
    "dot-dot": ("image_id,label\n..,0\n", "row 2: image_id '..' contains a path separator"),
    "empty CSV": ("", "empty CSV: no header and no rows"),
    "header only": ("image_id,label\n", "empty CSV: a header but no rows"),
    "missing label column": ("image_id\nok0\n", "row 1: missing column 'label'"),
}


@pytest.mark.parametrize("case", CSV_CASES)
def test_csv_problems_name_the_file_and_row(tmp_path, case):
    text, message = CSV_CASES[case]
    root = _dataset(tmp_path, GOOD, csv_text=text)
    (tmp_path / "secret.png").write_bytes(b"outside the data folder")
    with pytest.raises(DataError) as err:
        load_split(root, "train", on_bad_image="skip", progress=False)  # CSV problems are never skipped
    assert "train.csv" in str(err.value) and message in str(err.value), str(err.value)


def test_cli_skip_option_trains_and_lists_skipped_files(cli, tiny_data, tmp_path):
    first = (tiny_data / "train.csv").read_text().splitlines()[1].split(",")[0]
    (tiny_data / "train" / f"{first}.png").write_text("garbage")
    args = ["train", "--data", str(tiny_data), "--config", "demo", "--set", "epochs=1", "--set", "progress=false",
            "--set", "threads=1", "--out"]
    refused = cli(*args, str(tmp_path / "a"))
    assert refused.returncode == 2 and f"{first}.png: not an image" in refused.stderr
    proc = cli(*args, str(tmp_path / "b"), "--on-bad-image", "skip")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad image(s)" in proc.stderr and f"{first}.png" in proc.stderr


# ----------------------------------------------------------------------------- property-based: the CSV reader

ids_st = st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,11}", fullmatch=True), min_size=1, max_size=30,
                  unique=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=ids_st, data=st.data(), newline=st.sampled_from(["\n", "\r\n"]), bom=st.booleans(),
       extra=st.booleans())
def test_any_well_formed_csv_reads_back_exactly(tmp_path, ids, data, newline, bom, extra):
    labels = data.draw(st.lists(st.integers(0, 4), min_size=len(ids), max_size=len(ids)))
    header = "image_id,label" + (",note" if extra else "")
    rows = [f"{i},{lab}" + (",x" if extra else "") for i, lab in zip(ids, labels, strict=True)]
    text = ("\ufeff" if bom else "") + newline.join([header, *rows]) + newline
    path = tmp_path / "train.csv"
    path.write_bytes(text.encode())
    table, problems = read_csv(path, need_label=True)
    assert problems == []
    assert table.ids == ids and table.labels == labels


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_reader(tmp_path, raw):
    path = tmp_path / "train.csv"
    path.write_bytes(raw)
    table, problems = read_csv(path, need_label=True)
    assert all(str(path) in str(p) for p in problems)
    assert len(table.ids) == len(table.labels) and all(0 <= lab <= 4 for lab in table.labels)
    assert problems or table.ids  # either something read, or a reason why not


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(good=ids_st, bad=st.text(min_size=0, max_size=10), prefix=st.sampled_from(["=", "+", "-", "@"]),
       at=st.integers(0, 30))
def test_an_id_a_spreadsheet_would_run_is_refused_naming_its_row(tmp_path, good, bad, prefix, at):
    """Whatever the other rows, an id that starts like a formula is a problem naming its row, and only it."""
    ids = list(good)
    at = min(at, len(ids))
    formula = prefix + "".join(c for c in bad if c.isprintable() and c not in ',"\r\n/\\.')
    ids.insert(at, formula)
    path = tmp_path / "train.csv"
    path.write_text("image_id,label\n" + "".join(f"{i},1\n" for i in ids))
    table, problems = read_csv(path, need_label=True)
    assert table.ids == good
    assert [p.row for p in problems] == [at + 2] and "formula" in problems[0].message


def test_csv_output_survives_hostile_ids(cli, tmp_path):
    """Ids with commas and quotes stay one field in every CSV fakeprint writes (ids a spreadsheet would run as
    formulas are refused when read: tests/test_attack_fixes.py)."""
    import csv as csvmod

    from fakeprint.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "d", n_train=30, n_val=0, n_test=6, seed=3)
    hostile = ['a,b', 'say "hi"', "x=1", "a+b", "plain", "mail@cmd"]
    from conftest import rename_test_ids

    rename_test_ids(root, hostile)
    proc = cli("data", "check", str(root))
    assert proc.returncode == 0 and "formula" not in proc.stderr, proc.stderr
    run = tmp_path / "run"
    from conftest import FAST_TRAIN

    proc = cli("train", "--data", str(root), *FAST_TRAIN, "--set", "epochs=1", "--out", str(run))
    assert proc.returncode == 0, proc.stderr
    sub = tmp_path / "sub.csv"
    proc = cli("predict", str(run), "--data", str(root), "--out", str(sub), "--probs", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stderr
    with open(sub, newline="") as f:
        rows = list(csvmod.DictReader(f))
    assert [r["image_id"] for r in rows] == hostile and all(r["label"] in "01234" for r in rows)
    with open(tmp_path / "p.csv", newline="") as f:
        assert [r["image"] for r in csvmod.DictReader(f)] == hostile


@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    """A small PNG of 13,500 x 13,500 pixels: over PIL's decompression-bomb limit (2 x 89.5 M pixels)."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (13_500, 13_500)).save(path, optimize=True)
    assert path.stat().st_size < 5_000_000
    return path


def test_decompression_bombs_are_a_one_line_error_everywhere(cli, bomb_png, tmp_path):
    import fakeprint
    from fakeprint.core.errors import FakeprintError

    proc = cli("predict", str(bomb_png))
    assert proc.returncode == 2 and "decompression bomb" in proc.stderr and str(bomb_png) in proc.stderr
    assert "Traceback" not in proc.stderr
    from conftest_service import make_checkpoint

    with pytest.raises(FakeprintError, match="decompression bomb"):
        fakeprint.load(make_checkpoint(tmp_path)).predict([str(bomb_png)])
    from fakeprint.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "d", n_train=10, n_val=0, n_test=0, seed=2)
    victim = next((root / "train").iterdir())
    victim.unlink()
    (root / "train" / (victim.stem + ".png")).write_bytes(bomb_png.read_bytes())
    proc = cli("data", "check", str(root))
    assert proc.returncode == 1 and "decompression bomb" in proc.stderr and "Traceback" not in proc.stderr
    # --on-bad-image skip covers it: the bomb is left out and named, the other images train
    proc = cli("train", "--data", str(root), "--config", "demo", "--set", "epochs=1", "--set", "val_fraction=0.3",
               "--set", "batch_size=4", "--on-bad-image", "skip", "--out", str(tmp_path / "run"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad image" in proc.stderr and victim.stem in proc.stderr and "decompression bomb" in proc.stderr


def test_links_out_of_the_dataset_are_refused_unless_allowed(cli, tmp_path):
    import os

    from fakeprint.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "d", n_train=10, n_val=0, n_test=0, seed=3)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    victim = sorted((root / "train").iterdir())[0]
    victim.rename(outside / victim.name)
    os.symlink(outside / victim.name, victim)  # train/x.png -> a file outside the dataset
    inside = sorted((root / "train").iterdir())[1]
    (root / "shared").mkdir()
    inside.rename(root / "shared" / inside.name)
    os.symlink(root / "shared" / inside.name, inside)  # a link that stays inside the dataset: fine
    proc = cli("data", "check", str(root))
    assert proc.returncode == 1 and "outside the dataset folder" in proc.stderr and victim.name in proc.stderr
    assert inside.name not in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("train", "--data", str(root), "--config", "demo", "--set", "epochs=1", "--on-bad-image", "skip",
               "--out", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 2 and "outside the dataset folder" in proc.stderr  # never skipped in silence
    proc = cli("--follow-external-links", "data", "check", str(root))
    assert proc.returncode == 0, proc.stderr


def test_float_images_in_unit_range_are_scaled_and_fifos_are_refused(cli, tmp_path):
    import os

    from fakeprint.data.dataset import decode_image

    a = np.linspace(0.0, 1.0, 100 * 100, dtype=np.float32).reshape(100, 100)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tiff")
    out = decode_image(tmp_path / "f.tiff")
    assert out.max() >= 250 and out.min() <= 5  # not black
    from fakeprint.data.demo import make_demo_dataset

    root = make_demo_dataset(tmp_path / "d", n_train=10, n_val=0, n_test=0, seed=2)
    victim = next((root / "train").iterdir())
    victim.unlink()
    os.mkfifo(root / "train" / (victim.stem + ".png"))
    proc = cli("data", "check", str(root), timeout=60)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr
    proc = cli("train", "--data", str(root), "--config", "demo", "--set", "epochs=1", "--out", str(tmp_path / "r"),
               timeout=60)
    assert proc.returncode == 2 and "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
