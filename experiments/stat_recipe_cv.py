"""Cross-validation of a statistics-only recipe (``statmlp``) on the internal split's training part.

``experiments/feature_probe.py`` compares feature sets with a fixed head; this compares recipes of the head itself, trained
as ``fakeprint train`` trains a statistics-only preset. The internal split (``val_fraction``, ``split_seed`` of the
config) is never loaded: its images are left out before anything is computed, so a recipe can be chosen here and then
scored once on the internal split. The statistics of every training-part image's views (its mirror; all eight flips
and quarter turns when a variant trains or tests on them) are computed once (``fakeprint.engine.training.statcache``) and optionally
kept in ``--features`` (a derived copy of the images: keep it out of the repository). Each fold trains the config's
head with ``train.train_one_epoch`` as ``fakeprint train`` does with ``stat_cache`` and the fold's seed (the same
batches, view draws, ``stat_mixup``, optimiser, schedule and EMA) and scores the held-out fold at the last epoch with
the variant's TTA. ``--variant NAME KEY=VALUE ...`` adds a recipe (config overrides, as ``--set``; the feature set
and the split are shared by all variants: change them with ``--set``); a recipe that cannot train on statistics
computed once (image augmentation beyond flips and quarter turns) is refused. ``stat_crops=K`` in a variant: the
statistics of K crops of each image (and their mirrors; positions drawn from seed 0) are computed once beside the
views, and only the variants that ask for crops train on them (each on its own K); folds are always scored on the
whole images. ``--only-folds 3,4`` trains just those folds (folds that a screening on the first three never saw).
Prints one JSON object: per variant and fold the accuracy and class-4 recall, their means, and the accuracy of all
variants' out-of-fold probabilities averaged.

    python experiments/stat_recipe_cv.py --data data/unibuc-deepfake --folds 5 --run-folds 3 --features /tmp/v6.pt \
        --variant base --variant hdrop5 model_args.dropout=0.5 --variant mixup02 stat_mixup=0.2 \
        --out benchmarks/results/stat_recipe_cv-cpu-2core-avx2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import DEFAULT_DATA, emit, environment, log  # noqa: E402
from fakeprint.core.errors import FakeprintError
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import dataset_identity, stratified_split
from fakeprint.data.loader import DeviceBatches
from fakeprint.engine.config import load_config
from fakeprint.engine.runtime import autocast_dtype
from fakeprint.engine.training import statcache
from fakeprint.engine.training.ema import EMA
from fakeprint.engine.training.loop import epoch_generator, train_one_epoch
from fakeprint.engine.training.losses import make_loss
from fakeprint.engine.training.setup import Dist, build_model, build_optimizer, build_scheduler


def training_part_statistics(data: str, cfg: dict, features: str | None, views: str = "flip", crops: int = 0
                             ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """N x V x D statistics (``statcache.statistics``' views, then ``crops`` crops of ``cfg['stat_crop_size']``
    pixels and their mirrors, positions drawn from seed 0) and labels of the training part (the internal split left
    out), cached in ``features``; kept eight-view statistics serve a two-view request (their first two rows)."""
    key = {"feature_set": cfg["model_args"].get("feature_set"), "val_fraction": float(cfg["val_fraction"]),
           "split_seed": int(cfg["split_seed"]), "normalize": cfg["normalize"],
           "dataset": dataset_identity(data)}  # another dataset in the same file: computed again, not reused
    if crops:
        key |= {"crops": crops, "crop_size": int(cfg["stat_crop_size"])}
    if features and Path(features).exists():
        saved = torch.load(features, weights_only=True)
        saved_views = saved["key"].get("views", "flip")
        if {k: saved["key"].get(k) for k in key} == key and (saved_views == views or saved_views == "dihedral"
                                                             and not crops):
            log(f"statistics read from {features}")
            return statcache.select_views(saved["rows"], views), saved["labels"], {"statistics_time_s": None, "from": Path(features).name}
        log(f"{features} holds other statistics ({saved['key']}): computing them again")
    full = load_split(Path(data), "train", progress=False)
    tr, _ = stratified_split(full.labels, float(cfg["val_fraction"]), int(cfg["split_seed"]))
    images = torch.from_numpy(full.images[tr])
    labels = torch.from_numpy(np.asarray(full.labels)[tr]).long()
    head = build_model(cfg, 5)
    t0 = time.perf_counter()
    rows = statcache.statistics(head, images, cfg["normalize"], views=views, progress=True, crops=crops,
                                crop_size=int(cfg["stat_crop_size"]), crop_seed=0)
    seconds = time.perf_counter() - t0
    if features:
        torch.save({"key": key | {"views": views}, "rows": rows, "labels": labels}, features)
    return rows, labels, {"statistics_time_s": round(seconds, 1)}


def train_fold(cfg: dict, rows: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """The head trained on ``rows`` (N x V x D) as ``fakeprint train`` trains it with ``stat_cache`` and this seed
    (the same batches, draws, step and schedule: ``train.train_one_epoch``); the EMA model when the config has one."""
    cfg = cfg | {"seed": seed, "progress": False}
    torch.manual_seed(seed)
    device, d = torch.device("cpu"), Dist()
    head = build_model(cfg, 5)
    model = statcache.OnStatistics(head)
    batches = DeviceBatches(rows, labels, int(cfg["batch_size"]), sampler=cfg["sampler"], drop_last=True, seed=seed)
    if len(batches) == 0:
        raise FakeprintError(f"batch_size {cfg['batch_size']} is larger than a fold's training part ({len(labels)})")
    opt = build_optimizer(cfg, model)
    sched, per_step = build_scheduler(cfg, opt, len(batches))
    loss_fn = make_loss(cfg, labels, 5, device)
    if sched is not None and not per_step:
        raise FakeprintError(f"scheduler {cfg['scheduler']!r} steps on a held-out figure; the folds need a fixed "
                             "schedule (warmup_linear, cosine or none)")
    ema = EMA(model, float(cfg["ema"]), bool(cfg["ema_warmup"])) if float(cfg["ema"]) > 0 else None
    amp_dtype = autocast_dtype(device, cfg["amp"])
    for epoch in range(int(cfg["epochs"])):
        batches.set_epoch(epoch)
        gen = epoch_generator(cfg, epoch, d, device)
        train_one_epoch(model, batches, opt, sched, per_step, loss_fn, cfg, device, amp_dtype, None, ema, gen, d,
                        desc="", on_statistics=True)
    return (ema.model if ema is not None else model).head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--config", default="statmlp_v6_h2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--run-folds", type=int, default=0, help="train only the first N folds (0: all)")
    ap.add_argument("--only-folds", help="train only these folds, by number from 0 (e.g. 3,4: folds a screening on "
                                         "the first three never saw)")
    ap.add_argument("--fold-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="training seed (fold k uses seed + k)")
    ap.add_argument("--features", help="a .pt file to keep the statistics in between runs (outside the repository)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every variant, the statistics' feature set included (repeatable)")
    ap.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                    help="a recipe: a name and config overrides (repeatable; default: the config as it is)")
    ap.add_argument("--save-probs", help="a folder for each variant's out-of-fold probabilities (<name>.pt)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variant or [["base"]]
    base = load_config(args.config, args.set)
    fixed = {"feature set": lambda c: c["model_args"].get("feature_set"), "normalize": lambda c: c["normalize"],
             "val_fraction": lambda c: c["val_fraction"], "split_seed": lambda c: c["split_seed"],
             "crop size": lambda c: c["stat_crop_size"]}
    names = [name for name, *_ in variants]
    if len(set(names)) < len(names):
        raise SystemExit(f"error: variant names must differ: {', '.join(names)}")
    cfgs = {name: load_config(args.config, [*args.set, *overrides]) for name, *overrides in variants}
    for name, cfg in cfgs.items():
        reason = statcache.unusable_reason(cfg, build_model(cfg, 5))
        if reason:
            raise SystemExit(f"error: variant {name!r} cannot be trained on statistics computed once: {reason}")
        for what, get in fixed.items():
            if get(cfg) != get(base):
                raise SystemExit(f"error: variant {name!r} changes the {what} ({get(base)} -> {get(cfg)}): the "
                                 "statistics and the internal split are shared by all variants; use --set")
    views = "dihedral" if any(statcache.views(c) == "dihedral" for c in cfgs.values()) else "flip"
    n_crops = max(statcache.crop_count(c) for c in cfgs.values())
    if n_crops and views != "flip":
        raise SystemExit("error: a variant with stat_crops needs every variant on flip views (no vflip, rot90 or "
                         "dihedral TTA): the crops' rows follow the image's two")
    rows, labels, stat_info = training_part_statistics(args.data, base, args.features, views, n_crops)
    skf = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.fold_seed)
    folds = list(skf.split(np.zeros(len(labels)), labels.numpy()))
    numbers = list(range(len(folds)))
    if args.only_folds:
        try:
            numbers = sorted({int(k) for k in args.only_folds.split(",")})
        except ValueError:
            raise SystemExit(f"error: --only-folds takes fold numbers separated by commas, got {args.only_folds!r}"
                             ) from None
        if not all(0 <= k < args.folds for k in numbers):
            raise SystemExit(f"error: --only-folds: the folds are numbered 0 to {args.folds - 1}, got {args.only_folds}")
    elif args.run_folds:
        numbers = numbers[:args.run_folds]
    folds = [folds[k] for k in numbers]
    result = {"environment": environment(torch.device("cpu")), "config": args.config,
              "data": dataset_identity(args.data),
              "split": "the internal split's training part only (the internal split not loaded), "
                       f"{args.folds}-fold stratified CV (fold seed {args.fold_seed}); last epoch, each variant's TTA",
              "training_part_images": len(labels), "set": args.set, **stat_info, "folds_run": len(folds),
              "fold_numbers": numbers, "variants": {}}
    probs = {}
    for name, *overrides in variants:
        cfg = cfgs[name]
        accs, rec4, times = [], [], []
        p = torch.zeros(len(labels), 5)
        own = statcache.select_views(rows, statcache.views(cfg))  # a flip-only variant: its two rows
        if statcache.crop_count(cfg):  # and its crops' rows
            own = torch.cat([own, rows[:, 2:2 + 2 * statcache.crop_count(cfg)]], 1)
        for k, (tr, va) in zip(numbers, folds, strict=True):
            t0 = time.perf_counter()
            head = train_fold(cfg, own[tr], labels[tr], args.seed + k)
            z = statcache.logits(head, own[va], cfg["tta"])
            times.append(time.perf_counter() - t0)
            p[va] = F.softmax(z, 1)
            pred = z.argmax(1)
            accs.append(float((pred == labels[va]).float().mean()))
            rec4.append(float((pred[labels[va] == 4] == 4).float().mean()))
            log(f"{name} fold {k}: {100 * accs[-1]:.2f}% class-4 recall {rec4[-1]:.3f} ({times[-1]:.0f} s)")
        probs[name] = p
        if args.save_probs:
            Path(args.save_probs).mkdir(parents=True, exist_ok=True)
            done = torch.from_numpy(np.concatenate([va for _, va in folds]))
            torch.save({"index": done, "probs": p[done], "labels": labels[done]}, Path(args.save_probs) / f"{name}.pt")
        result["variants"][name] = {"overrides": overrides, "tta": statcache.tta_mode(cfg["tta"]),
                                    "fold_accuracy": [round(a, 4) for a in accs],
                                    "mean_accuracy": round(float(np.mean(accs)), 4),
                                    "fold_class4_recall": [round(r, 4) for r in rec4],
                                    "mean_class4_recall": round(float(np.mean(rec4)), 4),
                                    "seconds_per_fold": round(float(np.mean(times)), 1)}
    if len(probs) > 1:
        idx = np.concatenate([va for _, va in folds])
        mean = torch.stack(list(probs.values())).mean(0)[idx]
        result["all_variants_averaged_accuracy"] = round(float((mean.argmax(1) == labels[idx]).float().mean()), 4)
    emit(result, args.out)


if __name__ == "__main__":
    try:
        main()
    except FakeprintError as e:  # a user's mistake (a missing dataset, a bad override): one line, no traceback
        raise SystemExit(f"error: {e}") from None
