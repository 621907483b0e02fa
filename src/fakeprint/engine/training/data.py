"""The splits a training run sees: train, held-out (the official validation split or an internal split),
and an optional selection split.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fakeprint.core.errors import FakeprintError
from fakeprint.data.cache import SplitData, load_split
from fakeprint.data.dataset import stratified_split
from fakeprint.data.splits import write_split_csv
from fakeprint.engine.training.setup import Dist, barrier


def prepare_data(root: Path, cfg: dict, d: Dist, run_dir: Path | None
                 ) -> tuple[SplitData, SplitData | None, str, SplitData | None]:
    """Train and validation splits: the dataset's own ``validation.csv`` if present, else a seeded
    stratified internal split of train (recorded as ``split.csv`` in the run folder). With ``train_on_all``
    (and no ``validation.csv``) every image is trained on and there is no validation split (None). With
    ``selection_fraction`` > 0, a stratified share of the training part becomes the selection split (the last
    value returned, else None): it steers the schedule and early stopping, so the held-out split only reports."""
    root = Path(root)
    kw = dict(cache_dir=cfg["cache_dir"], workers=cfg["workers"], on_bad_image=cfg["on_bad_image"],
              progress=cfg["progress"] and d.main)
    if not (root / "train.csv").is_file():
        raise FakeprintError(f"{root / 'train.csv'}: file not found (expected the report's layout: "
                             "train.csv + train/ folder; see `fakeprint data check`)")
    # rank 0 decodes (and caches) first; the others then read the fresh cache
    if d.main:
        full = load_split(root, "train", **kw)
    barrier(d)
    if not d.main:
        full = load_split(root, "train", **kw)
    if full.skipped and d.main:
        print(f"skipped {len(full.skipped)} bad image(s) in train:", file=sys.stderr)
        for p in full.skipped:
            print(f"  {p}", file=sys.stderr)
    official = (root / "validation.csv").is_file()
    if official:
        tr, va = np.arange(len(full)), np.zeros(0, dtype=np.int64)
        train, val = full, load_split(root, "validation", **kw)
        desc = "official validation split (validation.csv)"
    elif cfg["train_on_all"]:
        tr, va = np.arange(len(full)), np.zeros(0, dtype=np.int64)
        train, val = full, None
        desc = "no held-out split: train_on_all trains on every image of train.csv"
    else:
        tr, va = stratified_split(full.labels, cfg["val_fraction"], cfg["split_seed"])
        train, val = full.subset(tr, "train"), full.subset(va, "internal")
        desc = (f"internal split: {len(va)} images ({cfg['val_fraction']:.0%} of train.csv, stratified, "
                f"seed {cfg['split_seed']})")
    sel, selection = np.zeros(0, dtype=np.int64), None
    if float(cfg["selection_fraction"]) > 0 and val is not None:
        keep, pick = stratified_split(full.labels[tr], float(cfg["selection_fraction"]), cfg["split_seed"] + 2)
        tr, sel = tr[keep], tr[pick]
        train, selection = full.subset(tr, "train"), full.subset(sel, "selection")
        desc += f"; selection split: {len(sel)} images of the training part steer the schedule"
    if not official and run_dir is not None and d.main:
        write_split_csv(run_dir / "split.csv", full.ids, full.labels, tr, va, sel)
    if cfg["max_train_images"] and cfg["max_train_images"] < len(train):
        keep, _ = stratified_split(train.labels, 1 - cfg["max_train_images"] / len(train), cfg["split_seed"] + 1)
        train = train.subset(keep, "train")
    return train, val, desc, selection
