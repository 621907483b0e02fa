"""Decode a split once into a uint8 array (N x 100 x 100 x 3) and memory-map it on every later use.

The manifest beside the array records every source file's name, size and modification time, and a hash
of the array itself: a changed, added or removed image makes the cache stale, and a cache whose bytes
do not match its hash is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fakeprint.core.errors import DataError
from fakeprint.core.io import atomic_write
from fakeprint.data.dataset import IMAGE_SIZE, Problem, decode_image, resolve_split

CACHE_VERSION = 3  # 2: EXIF orientation applied when decoding; 3: area/bicubic resizing of other sizes


@dataclass
class SplitData:
    """A decoded split: ``images`` is N x H x W x 3 uint8 (often a read-only memory map)."""

    name: str
    root: Path
    ids: list[str]
    labels: np.ndarray | None
    images: np.ndarray
    skipped: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, idx: np.ndarray, name: str | None = None) -> SplitData:
        idx = np.asarray(idx)
        return SplitData(
            name or self.name,
            self.root,
            [self.ids[i] for i in idx],
            None if self.labels is None else self.labels[idx],
            self.images[idx],
            self.skipped,
        )


def default_cache_dir(root: Path) -> Path:
    """``<root>/.fakeprint-cache`` where writable, else a per-dataset folder under ``~/.cache/fakeprint``."""
    env = os.environ.get("FAKEPRINT_CACHE")
    if env:
        return Path(env) / _root_key(root)
    here = Path(root) / ".fakeprint-cache"
    if os.access(root, os.W_OK) or (here.is_dir() and os.access(here, os.W_OK)):
        return here
    return Path.home() / ".cache" / "fakeprint" / _root_key(root)


def _root_key(root: Path) -> str:
    resolved = str(Path(root).resolve())
    return Path(resolved).name + "-" + hashlib.blake2b(resolved.encode(), digest_size=6).hexdigest()


_VERIFIED: dict[tuple, str] = {}


def _cache_hash(path: Path) -> str:
    """``_file_hash`` of a cache file, computed once per process for each version of it (path, inode, size,
    modification time): a study that loads the same split for every run does not hash 375 MB each time. A file
    modified in the last two seconds is always hashed: file times are coarse, so a change made just after the
    last hash could keep the same time (git's "racy" case)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    digest = _file_hash(path)
    if time.time_ns() - st.st_mtime_ns > 2_000_000_000:
        _VERIFIED[key] = digest
    return digest


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sources(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def _decode_one(path: Path) -> np.ndarray | str:
    """The decoded image, or the reason it could not be decoded (without the path)."""
    try:
        return decode_image(path, IMAGE_SIZE)
    except DataError as e:
        return str(e).removeprefix(f"{path}: ")


def _decode_all(paths: list[Path], workers: int, progress: bool, label: str) -> list[np.ndarray | str]:
    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(paths), desc=f"decoding {label}", unit="img", disable=not progress, leave=False)
    if workers == 1 or len(paths) < 256:
        return [_decode_one(p) for p in tqdm(paths, **bar)]
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        return list(tqdm(pool.imap(_decode_one, paths, chunksize=64), **bar))


def load_split(
    root: Path,
    split: str,
    cache_dir: Path | None = None,
    workers: int = 0,
    on_bad_image: str = "error",
    progress: bool = True,
) -> SplitData:
    """Load a split as uint8 images, from its cache when fresh, else by decoding (and caching) it.

    ``on_bad_image``: ``error`` refuses a split with any missing or unreadable image, naming each one;
    ``skip`` leaves them out and lists them in ``SplitData.skipped``.
    """
    root = Path(root)
    files, problems = resolve_split(root, split)
    fatal = [p for p in problems if "not found in" not in p.message] if on_bad_image == "skip" else problems
    if fatal:
        raise DataError(_summarise(f"{split} split of {root}", fatal))
    skipped = [p for p in problems if p not in fatal]

    cache = Path(cache_dir) / _root_key(root) if cache_dir else default_cache_dir(root)
    npy, manifest_path = cache / f"{split}.npy", cache / f"{split}.json"
    sources = _sources(files.paths)
    manifest = _read_manifest(manifest_path)
    if (
        manifest is not None
        and manifest.get("version") == CACHE_VERSION
        and manifest.get("sources") == sources
        and manifest.get("ids") == files.ids
        and npy.is_file()
        and manifest.get("on_bad_image") == on_bad_image
        and manifest.get("hash") == _cache_hash(npy)
    ):
        images = np.load(npy, mmap_mode="r")
        bad = set(manifest.get("bad", []))
        skipped += [Problem(str(files.paths[i]), msg) for i, msg in manifest.get("bad_messages", [])]
        return _assemble(files, images, bad, skipped)

    decoded = _decode_all(files.paths, workers, progress, f"{split} ({len(files.paths)} images)")
    bad_messages = [(i, d) for i, d in enumerate(decoded) if isinstance(d, str)]
    if bad_messages and on_bad_image == "error":
        found = [Problem(str(files.paths[i]), m) for i, m in bad_messages]
        raise DataError(_summarise(f"{split} split of {root}", found))
    good = [d if not isinstance(d, str) else np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for d in decoded]
    images = np.stack(good) if good else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    try:
        atomic_write(npy, lambda f: np.save(f, images))
        meta = {
            "version": CACHE_VERSION,
            "split": split,
            "root": str(root.resolve()),
            "ids": files.ids,
            "sources": sources,
            "shape": list(images.shape),
            "on_bad_image": on_bad_image,
            "bad": [i for i, _ in bad_messages],
            "bad_messages": bad_messages,
            "hash": _file_hash(npy),
        }
        atomic_write(manifest_path, json.dumps(meta).encode())
    except OSError as e:
        print(f"warning: could not write the decoded cache in {cache} ({e.strerror}); continuing without it",
              file=sys.stderr)
    skipped += [Problem(str(files.paths[i]), m) for i, m in bad_messages]
    return _assemble(files, images, {i for i, _ in bad_messages}, skipped)


def _assemble(files, images: np.ndarray, bad: set[int], skipped: list[Problem]) -> SplitData:
    labels = None if files.labels is None else np.asarray(files.labels, dtype=np.int64)
    data = SplitData(files.name, files.root, list(files.ids), labels, images, skipped)
    if bad:
        keep = np.array([i for i in range(len(files.ids)) if i not in bad], dtype=np.int64)
        data = data.subset(keep)
        data.skipped = skipped
    return data


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _summarise(what: str, problems: list[Problem], limit: int = 20) -> str:
    lines = [f"{len(problems)} problem(s) in the {what}:"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more (run `fakeprint data check` for the full list)")
    return "\n".join(lines)
