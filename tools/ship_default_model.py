"""Copy a run's checkpoint into the package as a shipped model (`default`, or `accurate` / `fast` with --name).

    python tools/ship_default_model.py RUN_OR_CHECKPOINT [--held-out OTHER_RUN --how TEXT] [--calibration-from RUN]
    python tools/ship_default_model.py default --calibration-from RUN   (new metadata for the shipped weights)
    python tools/ship_default_model.py RUN --name fast --data DIR         (another shipped model, its figure
                                                                          re-measured here)

Writes ``src/fakeprint/weights/NAME.safetensors`` and ``NAME.json``: the checkpoint's metadata and a
self-test (the probabilities the model gives to a few generated images) that
``tests/test_default_model.py`` checks after loading the shipped file.

The figure shipped with it (``held_out``) must be one on images the model never trained on. A checkpoint
trained with an internal split carries its own (its last epoch's); one trained on every image
(``train_on_all``) has none, and ``--held-out`` must name a run of the same recipe trained without the
internal split, whose last checkpoint's figure is shipped, labelled with ``--how``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from fakeprint.core.io import atomic_write
from fakeprint.data.demo import render
from fakeprint.engine.predict import load
from fakeprint.models.checkpoint import SHIPPED_NAMES, resolve_checkpoint

DEST = Path(__file__).resolve().parent.parent / "src" / "fakeprint" / "weights"
SELF_TEST_SEEDS = (0, 1, 2, 3, 4)


def self_test_images() -> np.ndarray:
    return np.stack([render(seed % 5, np.random.default_rng(seed)) for seed in SELF_TEST_SEEDS])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--name", default="default", choices=SHIPPED_NAMES,
                    help="which shipped model (default: default)")
    ap.add_argument("--data", help="re-measure the checkpoint's own held-out figure here, on this machine (fp32, the "
                    "checkpoint's test-time augmentation): the figure users will reproduce")
    ap.add_argument("--held-out", help="for a train_on_all model: a run of the same recipe with an internal split")
    ap.add_argument("--how", default="", help="with --held-out: how that run relates to the shipped model")
    ap.add_argument("--note", default=None, help="free text for the metadata (how it was trained)")
    ap.add_argument("--calibration-from", help="a run of the same recipe trained without the internal split, "
                    "calibrated on it (`fakeprint calibrate`): its temperature and uncertain threshold are shipped")
    args = ap.parse_args()
    src = resolve_checkpoint(args.run)
    meta = json.loads(src.with_suffix(".json").read_text())
    dest = DEST / f"{args.name}.safetensors"
    reship = src.resolve() == dest.resolve()  # new metadata for the shipped weights
    if args.held_out:
        other = json.loads(resolve_checkpoint(args.held_out).with_suffix(".json").read_text())
        if not other.get("held_out") or not args.how:
            sys.exit(f"{args.held_out}: no held-out figure in its checkpoint, or no --how given")
        meta["held_out"] = other["held_out"] | {"how": args.how}
    elif not meta.get("held_out"):
        sys.exit(f"{src}: no held-out figure (a train_on_all model?): give --held-out RUN --how TEXT")
    if not reship:
        meta["shipped_from"] = str(src)
    if args.note is not None or not reship:
        meta["note"] = args.note or ""
    if args.calibration_from:
        other_path = resolve_checkpoint(args.calibration_from)
        other = json.loads(other_path.with_suffix(".json").read_text())
        if not other.get("calibration") or other["calibration"].get("tta") != meta.get("tta"):
            sys.exit(f"{args.calibration_from}: no calibration with test-time augmentation {meta.get('tta')!r} "
                     "(run `fakeprint calibrate` on it first)")
        meta["calibration"] = other["calibration"] | {
            "how": "fitted on the internal split by a run of the same recipe trained without it "
                   f"({other_path.parent.name}); this model itself trained on those images"}
    clf = load(src)
    if args.data:
        if args.held_out or meta["config"].get("train_on_all"):
            sys.exit("--data re-measures the checkpoint's own held-out figure: not for a train_on_all model")
        from fakeprint.core.metrics import from_confusion, summary
        from fakeprint.engine.evaluate import load_eval_split

        held = load_eval_split(Path(args.data), "internal", src, progress=False)
        m = summary(held.labels, clf.predict(held.images).labels)  # calibration never changes the labels
        meta["held_out"] = meta["held_out"] | {
            "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "confusion_matrix": m["confusion_matrix"],
            "recall": from_confusion(m["confusion_matrix"])["recall"], "n": m["n"],
            "tta": clf.tta, "measured": "on the CPU in fp32 when shipped (tools/ship_default_model.py --data)"}
    if not meta["config"].get("train_on_all") and not args.held_out and (src.parent / "split.csv").is_file():
        from fakeprint.data.splits import internal_ids_digest, read_split_csv

        ids = read_split_csv(src.parent / "split.csv").get("internal", ([], []))[0]
        meta["held_out"]["internal_ids_sha256"] = internal_ids_digest(ids)  # `evaluate NAME --split internal`
    clf.meta = meta  # the self-test and the probe shares: with the calibration shipped
    if meta.get("calibration"):
        from fakeprint.engine.calibration import flagged_shares

        meta["calibration"]["flagged_share_probes"] = flagged_shares(clf)
    probs = clf.predict(self_test_images()).probs
    meta["self_test"] = {"seeds": list(SELF_TEST_SEEDS), "tta": clf.tta, "probs": probs.round(6).tolist()}
    DEST.mkdir(parents=True, exist_ok=True)
    if not reship:
        shutil.copyfile(src, dest)
    atomic_write(dest.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    size = dest.stat().st_size
    print(f"updated the metadata of {dest} ({size / 1e6:.1f} MB)" if reship else
          f"shipped {src} -> {dest} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
