"""The report's dataset layout: ``<split>.csv`` (``image_id[,label]``) beside a ``<split>/`` folder of images.

Reading is strict: every problem is collected with the file and row that caused it, and reported at
once, so that one run shows everything that is wrong rather than the first thing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fakeprint.core.csvio import looks_like_formula
from fakeprint.core.errors import DataError

IMAGE_SIZE = 100
NUM_CLASSES = 5
IMAGE_EXTS = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SPLITS = ("train", "validation", "test")
# A 100x100 dataset never needs more; this refuses decompression bombs without PIL's warning dance.
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, located by file (and row, where it comes from a CSV)."""

    file: str
    message: str
    row: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}, row {self.row}" if self.row is not None else self.file
        return f"{where}: {self.message}"


@dataclass
class CsvTable:
    path: Path
    ids: list[str]
    labels: list[int] | None
    rows: list[int]  # the 1-based line of each entry in the file, for messages


def _bad_id(image_id: str) -> str | None:
    if not image_id:
        return "empty image_id"
    if "/" in image_id or "\\" in image_id or image_id in (".", "..") or ".." in image_id.split("."):
        return f"image_id {image_id!r} contains a path separator or '..'"
    if "\x00" in image_id or any(ord(c) < 32 for c in image_id):
        return f"image_id {image_id!r} contains control characters"
    if looks_like_formula(image_id):
        return (f"image_id {image_id!r} starts with {image_id[0]!r}, which a spreadsheet runs as a formula (CSV "
                "injection): rename the image and its row")
    return None


def read_csv(path: Path, need_label: bool, num_classes: int = NUM_CLASSES) -> tuple[CsvTable, list[Problem]]:
    """Read ``image_id[,label]`` rows. Returns the table of good rows and the problems found."""
    path = Path(path)
    name = str(path)
    empty = CsvTable(path, [], [] if need_label else None, [])
    try:
        raw = path.read_bytes()
    except OSError as e:
        return empty, [Problem(name, f"cannot read: {e.strerror}")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return empty, [Problem(name, f"not UTF-8 text (byte {e.start})")]
    if "\x00" in text:
        return empty, [Problem(name, "not a text CSV (contains NUL bytes)")]
    try:
        return _parse_csv(path, text, need_label, num_classes)
    except csv.Error as e:
        return empty, [Problem(name, f"malformed CSV ({e})")]


def _parse_csv(path: Path, text: str, need_label: bool, num_classes: int) -> tuple[CsvTable, list[Problem]]:
    name = str(path)
    problems: list[Problem] = []
    empty = CsvTable(path, [], [] if need_label else None, [])
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    while header is not None and not any(h.strip() for h in header):
        header = next(reader, None)
    if header is None:
        return empty, [Problem(name, "empty CSV: no header and no rows")]
    cols = [h.strip().lower() for h in header]
    if "image_id" not in cols:
        hint = " (the file seems to have no header line)" if len(cols) >= 1 and cols[0] and "id" not in cols else ""
        return empty, [Problem(name, f"missing column 'image_id'{hint}; header is {','.join(header)!r}", row=1)]
    id_col = cols.index("image_id")
    label_col = cols.index("label") if "label" in cols else None
    if need_label and label_col is None:
        problems.append(Problem(name, f"missing column 'label'; header is {','.join(header)!r}", row=1))
    ids: list[str] = []
    labels: list[int] = []
    rows: list[int] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(c.strip() for c in row):
            continue
        if len(row) <= id_col:
            problems.append(Problem(name, f"too few fields ({len(row)})", row=line))
            continue
        image_id = row[id_col].strip()
        bad = _bad_id(image_id)
        if bad:
            problems.append(Problem(name, bad, row=line))
            continue
        if image_id in seen:
            problems.append(Problem(name, f"duplicate image_id {image_id!r} (first at row {seen[image_id]})", row=line))
            continue
        label = -1
        if need_label and label_col is not None:
            value = row[label_col].strip() if len(row) > label_col else ""
            try:
                label = int(value)
            except ValueError:
                problems.append(Problem(name, f"label {value!r} is not an integer", row=line))
                continue
            if not 0 <= label < num_classes:
                problems.append(Problem(name, f"label {label} out of range 0..{num_classes - 1}", row=line))
                continue
        seen[image_id] = line
        ids.append(image_id)
        labels.append(label)
        rows.append(line)
    if not ids and not problems:
        problems.append(Problem(name, "empty CSV: a header but no rows"))
    return CsvTable(path, ids, labels if need_label else None, rows), problems


LINKS_ENV = "FAKEPRINT_FOLLOW_EXTERNAL_LINKS"


def follow_external_links() -> bool:
    """Whether image files that are symbolic links to places outside the dataset folder are read (``fakeprint
    --follow-external-links``, or the environment variable ``FAKEPRINT_FOLLOW_EXTERNAL_LINKS=1``)."""
    return os.environ.get(LINKS_ENV, "") not in ("", "0")


def _outside(link: Path, roots: tuple[Path, ...]) -> Path | None:
    """The resolved target of ``link`` when it lies outside every one of ``roots`` (resolved), else None."""
    target = link.resolve()
    return None if any(target == r or r in target.parents for r in roots) else target


def index_images(folder: Path, root: Path | None = None) -> tuple[dict[str, Path | None], list[Problem]]:
    """Map image stem -> file for every image in ``folder`` (one directory listing, not one stat per id).

    An image that is a symbolic link leading outside both ``folder`` and the dataset ``root`` is refused (a
    problem naming it; its stem maps to None) unless ``follow_external_links()``: a dataset from elsewhere
    must not make fakeprint read, and report on, arbitrary files of this machine."""
    out: dict[str, Path | None] = {}
    problems: list[Problem] = []
    roots = tuple(Path(p).resolve() for p in (folder, root) if p is not None)
    check_links = not follow_external_links()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return {}, [Problem(str(folder), "image folder is missing")]
    except NotADirectoryError:
        return {}, [Problem(str(folder), "is not a folder")]
    for entry in entries:
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() not in IMAGE_EXTS:
            continue
        if stem in out:
            other = out[stem].name if out[stem] is not None else "a refused link"
            problems.append(Problem(str(Path(folder) / entry.name), f"two images for id {stem!r} (also {other})"))
            continue
        path = Path(folder) / entry.name
        if check_links and entry.is_symlink() and (target := _outside(path, roots)) is not None:
            problems.append(Problem(str(path), f"a symbolic link to {target}, outside the dataset folder: refused "
                                    "(fakeprint --follow-external-links reads such links)"))
            out[stem] = None
            continue
        out[stem] = path
    return out, problems


def decode_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode one image into ``size x size x 3`` uint8 RGB, converting mode and resizing when needed.

    Raises ``DataError`` naming the file when it is not a readable image.
    """
    _regular_file(path)
    return _decode(path, str(path), size)


def decode_bytes(data: bytes, name: str = "image", size: int = IMAGE_SIZE) -> np.ndarray:
    """``decode_image`` for the bytes of an image file (the same steps, the same result as from a path)."""
    return _decode(io.BytesIO(data), name, size)


def _decode(source, name: str, size: int) -> np.ndarray:
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_PIXELS:
                raise DataError(f"{name}: {im.width}x{im.height} pixels is too large (limit {MAX_PIXELS})")
            decode_reduced(im, size)
            im.load()
            return to_rgb_array(im, size)
    except DataError:
        raise
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: refused as a decompression bomb ({e})") from None
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{name}: not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{name}: unreadable image ({e})") from None


def _regular_file(path: Path) -> None:
    """Refuse what is not a regular file (a FIFO or a device would block or never end) before opening it."""
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: not a regular file (a FIFO, device or folder), refused")


def check_image_file(path: str | Path, inside: Path | None = None) -> None:
    """What every entry point checks before it opens an image file: a regular file (never a FIFO or a device,
    which would block), and, for a file found in the folder ``inside``, not a symbolic link that leads out of it
    (unless ``follow_external_links()``), as ``index_images`` refuses for a dataset."""
    path = Path(path)
    if inside is not None and not follow_external_links() and path.is_symlink():
        target = _outside(path, (Path(inside).resolve(),))
        if target is not None:
            raise DataError(f"{path}: a symbolic link to {target}, outside the folder {inside}: refused "
                            "(fakeprint --follow-external-links reads such links)")
    _regular_file(path)


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: its EXIF orientation applied (a phone photo is stored sideways with a
    tag that says so, and every image viewer turns it), as the image is read. Unreadable EXIF leaves it as stored."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF: nothing to apply
        return im
    if orientation in (None, 1):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - as above
        return im


def decode_reduced(im: Image.Image, size: int = IMAGE_SIZE) -> None:
    """Before ``im.load()``: let a large JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling), never
    below ``size`` on either side. The image is resized to ``size`` anyway; this makes a 4000x3000 photo cost
    what a 500x375 one does. Other formats have no reduced decoding and are left alone."""
    if im.format == "JPEG" and min(im.size) >= 2 * size:
        im.draft(None, (size, size))


def to_rgb_array(im: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any PIL image (L, LA, P, RGBA, 16-bit, float, CMYK) -> ``size x size x 3`` uint8 RGB, turned upright by its
    EXIF orientation (``upright``). Float images with values in [0, 1] are scaled as such (not read as 0-255, which
    would turn them black)."""
    im = upright(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = a.max(initial=0)
        hi = 65535.0 if im.mode.startswith("I;16") or top > 255 else 1.0 if im.mode == "F" and top <= 1.0 else 255.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = im.resize((size, size), resize_filter(im.size, size))
    return np.asarray(im, dtype=np.uint8)


def resize_filter(have: tuple[int, int], size: int = IMAGE_SIZE) -> Image.Resampling:
    """How an image that is not ``size`` x ``size`` is brought to it: the area average (``BOX``) when both sides
    shrink, bicubic otherwise. Measured with the shipped models on the internal split (experiments/resize_policy.py,
    benchmarks/results/resize_policy-cpu-2core.json): against the bilinear filter used before, ``default`` gains
    11 points on 75 x 75 copies (69.8% -> 81.0%), 9 on 150 x 150 (82.5% -> 91.7%), 9 on 200 x 200 and 4 on 90%
    crops; Lanczos is worse on the small copies and a centre crop of the large ones loses up to 37 points."""
    return Image.Resampling.BOX if min(have) >= size else Image.Resampling.BICUBIC


@dataclass
class SplitFiles:
    """A split resolved to files: ids, labels (None for test) and paths, in CSV order."""

    name: str
    root: Path
    ids: list[str]
    labels: list[int] | None
    paths: list[Path]


def resolve_split(root: Path, split: str) -> tuple[SplitFiles, list[Problem]]:
    """Match ``<split>.csv`` rows with ``<split>/`` files. Problems: CSV problems and missing images."""
    root = Path(root)
    csv_path = root / f"{split}.csv"
    if not csv_path.is_file():
        return SplitFiles(split, root, [], None, []), [Problem(str(csv_path), "file not found")]
    table, problems = read_csv(csv_path, need_label=split != "test")
    index, index_problems = index_images(root / split, root)
    problems += index_problems
    paths: list[Path] = []
    ids: list[str] = []
    labels: list[int] = []
    for i, image_id in enumerate(table.ids):
        path = index.get(image_id)
        if path is None and image_id in index:  # a refused link, already a problem of its own
            continue
        if path is None:
            if index or not index_problems:
                problems.append(
                    Problem(str(csv_path), f"image {image_id!r} not found in {root / split}/", row=table.rows[i])
                )
            continue
        ids.append(image_id)
        paths.append(path)
        if table.labels is not None:
            labels.append(table.labels[i])
    return SplitFiles(split, root, ids, labels if table.labels is not None else None, paths), problems


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split of indices: (train_idx, val_idx), each sorted. Same inputs, same split."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(max(n_val, 1), len(idx) - 1) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def check_dataset(root: Path, decode: bool = True) -> tuple[dict, list[Problem]]:
    """Inspect a dataset folder: layout, class counts, image sizes and modes, and every problem found."""
    root = Path(root)
    report: dict = {"root": str(root), "splits": {}, "warnings": []}
    problems: list[Problem] = []
    if not root.is_dir():
        return report, [Problem(str(root), "dataset folder not found")]
    present = [s for s in SPLITS if (root / f"{s}.csv").exists() or (root / s).is_dir()]
    if not present:
        return report, [Problem(str(root), "no train.csv, validation.csv or test.csv found")]
    for split in present:
        files, split_problems = resolve_split(root, split)
        problems += split_problems
        info: dict = {"images": len(files.ids)}

        if files.labels is not None:
            counts = Counter(files.labels)
            info["class_counts"] = {int(k): counts[k] for k in sorted(counts)}
        sizes: Counter = Counter()
        modes: Counter = Counter()
        formats: Counter = Counter()
        if decode:
            for path in files.paths:
                try:
                    _regular_file(path)
                    with Image.open(path) as im:
                        sizes[f"{im.width}x{im.height}"] += 1
                        modes[im.mode] += 1
                        formats[im.format or "?"] += 1
                        if im.width * im.height > MAX_PIXELS:
                            problems.append(Problem(str(path), f"{im.width}x{im.height} pixels is too large"))
                            continue
                        im.load()
                except DataError as e:
                    problems.append(Problem(str(path), str(e).removeprefix(f"{path}: ")))
                except Image.DecompressionBombError as e:
                    problems.append(Problem(str(path), f"refused as a decompression bomb ({e})"))
                except UnidentifiedImageError:
                    problems.append(Problem(str(path), "not an image (unrecognised format)"))
                except (OSError, ValueError, SyntaxError) as e:
                    problems.append(Problem(str(path), f"unreadable image ({e})"))
        info["sizes"] = dict(sizes.most_common())
        info["modes"] = dict(modes.most_common())
        info["formats"] = dict(formats.most_common())
        report["splits"][split] = info
    return report, problems


def portable_path(path: str | Path) -> str:
    """A path as results files show it: relative to the working directory when inside it, else as given
    (never resolved into this machine's absolute layout)."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def dataset_identity(root: str | Path) -> dict[str, str]:
    """How results files name a dataset: its folder name and a hash of its CSV files, never the absolute
    path of the machine that made them."""

    root = Path(root)
    h = hashlib.sha256()
    for name in ("train.csv", "validation.csv", "test.csv"):
        if (root / name).is_file():
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    return {"name": root.resolve().name, "csv_sha256": h.hexdigest()[:16]}
