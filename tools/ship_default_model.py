"""Copy a run's best checkpoint into the package as the shipped default model.

    python tools/ship_default_model.py RUN [--metrics RUN/eval-internal/metrics.json]

Writes ``src/fakeprint/weights/default.safetensors`` and ``default.json``: the run's metadata, plus the
internal-split metrics given, and a self-test (the probabilities the model gives to a few generated
images) that ``tests/test_default_model.py`` checks after loading the shipped file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from fakeprint.checkpoint import atomic_write, resolve_checkpoint
from fakeprint.data.demo import render
from fakeprint.predict import load

DEST = Path(__file__).resolve().parent.parent / "src" / "fakeprint" / "weights"
SELF_TEST_SEEDS = (0, 1, 2, 3, 4)


def self_test_images() -> np.ndarray:
    return np.stack([render(seed % 5, np.random.default_rng(seed)) for seed in SELF_TEST_SEEDS])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--metrics", help="metrics.json of an evaluation on the internal split")
    ap.add_argument("--note", default="", help="free text for the metadata (how it was trained)")
    args = ap.parse_args()
    src = resolve_checkpoint(args.run)
    meta = json.loads(src.with_suffix(".json").read_text())
    if args.metrics:
        m = json.loads(Path(args.metrics).read_text())
        meta["internal_split_metrics"] = {k: m[k] for k in ("accuracy", "macro_f1", "n", "per_class", "confusion_matrix")}
    meta["shipped_from"] = str(src)
    meta["note"] = args.note
    clf = load(src)
    probs = clf.predict(self_test_images()).probs
    meta["self_test"] = {"seeds": list(SELF_TEST_SEEDS), "probs": probs.round(6).tolist()}
    DEST.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, DEST / "default.safetensors")
    atomic_write(DEST / "default.json", (json.dumps(meta, indent=2) + "\n").encode())
    size = (DEST / "default.safetensors").stat().st_size
    print(f"shipped {src} -> {DEST}/default.safetensors ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
