"""Studies: the report's comparisons (and its failed approaches and class-4 future work), one command each.

A study is a grid of variants trained with ``fakeprint.train.train`` on the same data and evaluated on the
same split: the internal split (a seeded, stratified part of ``train.csv``, identical for every run since
``split_seed`` is fixed) unless the dataset has a ``validation.csv``. Each variant is a set of config
overrides on the grid's preset; a few variants are built from earlier ones rather than trained alone:

- ``average``: the mean of its members' softmax probabilities (the ensemble study's baseline);
- ``specialist``: a binary class-4-vs-rest model combined with its member (the class-4 study), see
  :func:`combine_specialist` for the rule.

Scales: ``small`` trains small or narrow models for a few epochs on a stratified subset of the training
part (``max_train_images``), about ten minutes a study on 2 CPU cores; ``full`` is the report's presets and
models at full length (for a GPU); ``tiny`` is for the tests. Grids are plain data below
(:data:`STUDIES`); ``docs/STUDIES.md`` documents them.

Output: ``<out>/runs/<variant>/seed<k>/`` run folders, ``study.md`` (the table), ``study.json`` (every
number), ``accuracy.png`` (mean accuracy per variant, error bars = standard deviation over seeds) and
``curves.png`` (validation accuracy and training loss per epoch of every trained run).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .checkpoint import atomic_write
from .config import load_config
from .csvio import write_csv
from .data.dataset import portable_path
from .errors import FakeprintError

SCALES = ("small", "full", "tiny")
WEAK_CLASS = 4


@dataclass(frozen=True)
class Variant:
    """One row of a study's table. ``overrides`` go on top of the grid's preset and base overrides."""

    id: str                                   # folder name under runs/
    label: str                                # the table's name for it
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None                 # None: the grid's preset
    kind: str = "train"                       # train | average | specialist
    members: tuple[str, ...] = ()             # ids of earlier variants this one builds on


@dataclass(frozen=True)
class Grid:
    preset: str | None
    base: dict[str, Any]
    variants: tuple[Variant, ...]
    note: str = ""

    def trainings(self) -> int:
        """Training runs per seed (``average`` variants train nothing)."""
        return sum(v.kind != "average" for v in self.variants)


# ------------------------------------------------------------------------------------------ the grids

# What every run of a scale shares. ``small``: a short warm-up + linear-decay schedule on a stratified subset of the
# training part, evaluated every epoch on the full internal split, one CPU thread per process (on a shared
# 2-core machine two threads run 5-10x slower as soon as another process is busy; on an idle machine
# ``--set threads=2`` is about 1.5x faster). ``tiny``: one epoch, for the tests.
SCALE_BASE: dict[str, dict[str, Any]] = {
    "full": {},
    "small": {"batch_size": 32, "early_stop": 0, "optimizer": "adam", "lr": 2e-3, "scheduler": "warmup_linear",
              "warmup_epochs": 0.5, "threads": 1, "progress": False},
    "tiny": {"epochs": 1, "batch_size": 16, "early_stop": 0, "scheduler": "none", "eval_batch_size": 64,
             "threads": 1, "progress": False, "workers": 1},
}
# The model of recipe studies (augmentation, optimizer, class4) below ``full``.
RECIPE_MODEL: dict[str, dict[str, Any]] = {
    "small": {"model": "fpnet_tiny"},
    "tiny": {"model": "fpnet_tiny", "model_args": {"width": 4}},
}
# (training images, epochs) per run at ``small``, chosen so that each grid takes about ten minutes on a
# 2-core CPU (measured one-thread training speeds: fpnet_tiny ~180 images/s, skipconcnn_narrow ~75,
# effnet_se ~50, threecnn_narrow ~480; evaluation of the 1,250-image internal split a few seconds).
SMALL_BUDGET = {"augmentation": (4000, 6), "residual": (3000, 5), "ensemble": (3000, 5), "optimizer": (2500, 6),
                "failed": (2500, 4), "class4": (2500, 6)}
# Report-style class weights for ``weighted_ce``: class 4 counts double.
CLASS4_WEIGHTS = [1.0, 1.0, 1.0, 1.0, 2.0]
# Images of the training part on which the specialist's threshold is tuned (a seeded random subset).
SPECIALIST_TUNE_IMAGES = 3000


def _base(study: str, scale: str, recipe: bool) -> dict[str, Any]:
    base = dict(SCALE_BASE[scale])
    if recipe and scale in RECIPE_MODEL:
        base |= RECIPE_MODEL[scale]
    if scale == "small":
        base["max_train_images"], base["epochs"] = SMALL_BUDGET[study]
    return base


def augmentation_grid(scale: str) -> Grid:
    """None / geometric (flip, rotation) / geometric + photometric (colour jitter 0.2)."""
    geo = {"hflip": True, "rotation": 15.0}
    return Grid("threecnn", _base("augmentation", scale, recipe=True), (
        Variant("none", "none", {"hflip": False, "vflip": False, "rotation": 0.0, "color_jitter": 0.0}),
        Variant("geometric", "geometric (flip, rotation 15)", geo | {"color_jitter": 0.0}),
        Variant("photometric", "geometric + photometric (colour jitter 0.2)", geo | {"color_jitter": 0.2}),
    ))


def residual_grid(scale: str) -> Grid:
    """SkipConCNN with and without its skip connection, and ThreeCNN (narrow stand-ins below full)."""
    if scale == "full":
        return Grid("skipconcnn", {}, (
            Variant("skipconcnn", "SkipConCNN"),
            Variant("noskip", "SkipConCNN without skip", {"model": "skipconcnn_noskip"}),
            Variant("threecnn", "ThreeCNN", preset="threecnn"),
        ))
    args = {"model_args": {"width": 4}} if scale == "tiny" else {}
    return Grid("threecnn", _base("residual", scale, recipe=False), (
        Variant("skipconcnn", "SkipConCNN (narrow, width 8)" if not args else "SkipConCNN (narrow)",
                {"model": "skipconcnn_narrow"} | args),
        Variant("noskip", "SkipConCNN without skip (narrow)", {"model": "skipconcnn_narrow_noskip"} | args),
        Variant("threecnn", "ThreeCNN (narrow, width 8)" if not args else "ThreeCNN (narrow)",
                {"model": "threecnn_narrow"} | args),
    ), note="narrow stand-ins: the report's topologies with every width scaled down (models/failed.py)")


def ensemble_grid(scale: str) -> Grid:
    """EnsembleCNN vs its two members vs plain probability averaging of the members."""
    members = ("skipconcnn", "threecnn")
    if scale == "full":
        return Grid("ensemblecnn", {}, (
            Variant("skipconcnn", "SkipConCNN", preset="skipconcnn"),
            Variant("threecnn", "ThreeCNN", preset="threecnn"),
            Variant("average", "probability averaging", kind="average", members=members),
            Variant("ensemblecnn", "EnsembleCNN", members=members),
        ))
    narrow = ["skipconcnn_narrow", "threecnn_narrow"]  # the ensemble builds its members at default width
    head = {"model": "ensemblecnn", "model_args": {"members": narrow}, "label_smoothing": 0.1, "batch_size": 8}
    return Grid("threecnn", _base("ensemble", scale, recipe=False), (
        Variant("skipconcnn", "SkipConCNN (narrow)", {"model": narrow[0]}),
        Variant("threecnn", "ThreeCNN (narrow)", {"model": narrow[1]}),
        Variant("average", "probability averaging", kind="average", members=members),
        Variant("ensemblecnn", "EnsembleCNN", head | ({"epochs": 2} if scale == "small" else {}),
                members=members),
    ), note="narrow stand-ins of the members (width 8); the ensemble head is the report's")


def optimizer_grid(scale: str) -> Grid:
    """Adam vs AdamW, label smoothing 0 vs 0.1, ReduceLROnPlateau patience/factor settings."""
    if scale == "full":
        base, slow, fast = {}, (15, 0.8), (5, 0.5)   # ThreeCNN's and SkipConCNN's plateau settings
    else:
        base = _base("optimizer", scale, recipe=True) | {"scheduler": "plateau", "warmup_epochs": 0.0}
        slow, fast = (2, 0.8), (0, 0.5)             # the same contrast, scaled to a 6-epoch run
    base = base | {"plateau_patience": slow[0], "plateau_factor": slow[1]}
    return Grid("threecnn", base, (
        Variant("adam", f"Adam, plateau patience {slow[0]} factor {slow[1]} (baseline)"),
        Variant("adamw", "AdamW (same weight decay)", {"optimizer": "adamw"}),
        Variant("adamw_wd", "AdamW, weight decay 0.05", {"optimizer": "adamw", "weight_decay": 0.05}),
        Variant("smoothing", "label smoothing 0.1", {"label_smoothing": 0.1}),
        Variant("plateau", f"plateau patience {fast[0]} factor {fast[1]}",
                {"plateau_patience": fast[0], "plateau_factor": fast[1]}),
    ))


def failed_grid(scale: str) -> Grid:
    """The report's unsuccessful models, with ThreeCNN as the reference."""
    if scale == "full":
        search = [(o1, o2, k) for o1 in (32, 64) for o2 in (64, 128) for k in (3, 5)]
        return Grid("threecnn", {}, (
            Variant("threecnn", "ThreeCNN (reference)"),
            Variant("effnet_se", "EfficientNet-like + SE + multi-scale attention", {"model": "effnet_se"}),
            *[Variant(f"twoconv_{o1}_{o2}_{k}", f"TwoConv {o1}, {o2}, kernel {k}",
                      {"model": "twoconv", "model_args": {"out1": o1, "out2": o2, "kernel": k}})
              for o1, o2, k in search],
            Variant("fiveconv", "FiveConv", {"model": "fiveconv"}),
        ))
    w = 8 if scale == "small" else 4
    return Grid("threecnn", _base("failed", scale, recipe=False), (
        Variant("threecnn", "ThreeCNN (narrow, reference)", {"model": "threecnn_narrow", "model_args": {"width": w}}),
        Variant("effnet_se", "EfficientNet-like + SE + multi-scale attention",
                {"model": "effnet_se", "model_args": {"width": w}}),
        *[Variant(f"twoconv_{2 * w}_{4 * w}_{k}", f"TwoConv {2 * w}, {4 * w}, kernel {k}",
                  {"model": "twoconv", "model_args": {"out1": 2 * w, "out2": 4 * w, "kernel": k}}) for k in (3, 5)],
        Variant("fiveconv", "FiveConv", {"model": "fiveconv", "model_args": {"width": w}}),
    ), note="every width scaled down (TwoConv's report search space is 32/64, 64/128, 3/5 at full scale)")


def class4_grid(scale: str) -> Grid:
    """Class-4 remedies (the report's future work), each against the plain baseline."""
    base = {} if scale == "full" else _base("class4", scale, recipe=True)
    return Grid("threecnn", base | {"loss": "ce", "sampler": "shuffle", "label_smoothing": 0.0}, (
        Variant("baseline", "baseline (cross-entropy)"),
        Variant("weighted_ce", f"class-weighted CE {CLASS4_WEIGHTS}",
                {"loss": "weighted_ce", "class_weights": CLASS4_WEIGHTS}),
        Variant("focal", "focal loss (gamma 2)", {"loss": "focal", "focal_gamma": 2.0}),
        Variant("balanced", "class-balanced sampling", {"sampler": "balanced"}),
        Variant("specialist", "baseline + class-4 specialist", {"sampler": "balanced"}, kind="specialist",
                members=("baseline",)),
    ))


STUDIES: dict[str, Callable[[str], Grid]] = {
    "augmentation": augmentation_grid,
    "residual": residual_grid,
    "ensemble": ensemble_grid,
    "optimizer": optimizer_grid,
    "failed": failed_grid,
    "class4": class4_grid,
}


def get_grid(name: str, scale: str) -> Grid:
    if name not in STUDIES:
        raise FakeprintError(f"unknown study {name!r} (studies: {', '.join(STUDIES)})")
    if scale not in SCALES:
        raise FakeprintError(f"unknown scale {scale!r} (scales: small, full)")
    return STUDIES[name](scale)


def variant_config(grid: Grid, variant: Variant, seed: int, extra: dict[str, Any] | None = None) -> dict:
    """The resolved config of one run: preset, grid base, variant overrides, seed, then ``extra``."""
    overrides = grid.base | variant.overrides | {"seed": seed} | (extra or {})
    return load_config(variant.preset or grid.preset, overrides)


# --------------------------------------------------------------------------------------------- runner

def run_study(name: str, data: str | Path, scale: str = "small", out: str | Path | None = None, seeds: int = 1,
              extra: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) study ``name`` on ``data``; writes study.md/.json and the plots; returns the results.

    Finished runs (``summary.json`` present, same config) are reused, so an interrupted study continues
    where it stopped. ``extra`` overrides every run's config (e.g. ``{"device": "cuda"}``).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    data = Path(data)
    if not (data / "train.csv").is_file():
        raise FakeprintError(f"{data / 'train.csv'}: file not found (a study needs a dataset in the report's layout)")
    if seeds < 1:
        raise FakeprintError(f"--seeds must be at least 1, got {seeds}")
    grid = get_grid(name, scale)
    out = Path(out or f"runs/study-{name}-{scale}")
    out.mkdir(parents=True, exist_ok=True)
    # resolve every config up front: a bad key fails before any training starts
    configs = {(v.id, s): variant_config(grid, v, s, extra) for v in grid.variants for s in range(seeds)
               if v.kind != "average"}
    n_runs = grid.trainings() * seeds
    log(f"study {name} ({scale}): {len(grid.variants)} variants x {seeds} seed(s) = {n_runs} training run(s); "
        f"results in {out}")
    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {v.id: [] for v in grid.variants}
    by_id = {v.id: v for v in grid.variants}
    done = reused = 0
    for v in grid.variants:
        for s in range(seeds):
            run_dir = out / "runs" / v.id / f"seed{s}"
            members = [results[m][s] for m in v.members]
            if v.kind != "average":
                done += 1
                reused += (run_dir / "summary.json").is_file()
                log(f"[{done}/{n_runs}] {v.label} (seed {s}) -> {run_dir}")
            if v.kind == "train":
                cfg = configs[(v.id, s)]
                if v.members:  # an ensemble of earlier variants' best checkpoints
                    cfg["base_checkpoints"] = [m["run"] for m in members]
                results[v.id].append(train_variant(data, cfg, run_dir))
            elif v.kind == "average":
                results[v.id].append(average_members(data, members, [by_id[m].label for m in v.members]))
            elif v.kind == "specialist":
                results[v.id].append(train_specialist(data, configs[(v.id, s)], run_dir, members[0], out, s))
            else:
                raise FakeprintError(f"study {name}: unknown variant kind {v.kind!r}")
    wall = time.perf_counter() - t0
    report = _summarise(name, scale, data, grid, results, seeds, wall, extra)
    report |= {"training_runs": n_runs, "reused_runs": reused}
    write_outputs(out, report)
    log(f"study {name} ({scale}) finished in {wall / 60:.1f} min: {out / 'study.md'}")
    return report


def train_variant(data: Path, cfg: dict, run_dir: Path) -> dict[str, Any]:
    """Train one run (or reuse/continue it) and read back its evaluation on the held-out split."""
    from .train import train

    summary_path = run_dir / "summary.json"
    saved = run_dir / "config.yaml"
    if saved.is_file():
        # keys added to fakeprint since that run started take their defaults (as --resume does)
        old = load_config(None, yaml.safe_load(saved.read_text()) or {})
        if old != cfg:
            changed = sorted(k for k in cfg if old.get(k) != cfg[k])
            raise FakeprintError(f"{run_dir}: an earlier run with another config is there (differs in "
                                 f"{', '.join(changed) or 'keys'}); delete it or choose another --out")
    if not summary_path.is_file():
        # an interrupted run (epochs recorded, no summary) is continued; train() says so if it cannot be
        train(data, cfg, run_dir, resume=(run_dir / "metrics.csv").is_file())
    return read_run(run_dir)


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run's numbers: best checkpoint's metrics on the held-out split, training time, split."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise FakeprintError(f"{run_dir}: no finished run there ({e})") from None
    recall = [metrics["per_class"][str(c)]["recall"] for c in range(len(metrics["per_class"]))]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {"run": portable_path(run_dir), "seed": cfg["seed"],
            "steered": cfg.get("scheduler") == "plateau" or bool(cfg.get("early_stop")),
            "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "class4_recall": recall[WEAK_CLASS],
            "recall": recall, "confusion_matrix": metrics["confusion_matrix"], "n": metrics["n"],
            "train_time_s": summary["train_time_s"], "own_train_time_s": summary["train_time_s"],
            "epochs_run": summary["epochs_run"], "split": summary["split"]}


def _eval_split_name(data: Path) -> str:
    return "validation" if (Path(data) / "validation.csv").is_file() else "internal"


def _probs(run: str | Path, images: np.ndarray) -> np.ndarray:
    from .predict import load

    return load(run).predict(images).probs


def _metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    from .metrics import summary

    m = summary(y_true, y_pred)
    recall = [m["per_class"][str(c)]["recall"] for c in range(len(m["per_class"]))]
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "class4_recall": recall[WEAK_CLASS],
            "recall": recall, "confusion_matrix": m["confusion_matrix"], "n": m["n"]}


def average_members(data: Path, members: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Evaluate the mean of the members' softmax probabilities on the held-out split (nothing trained)."""
    from .evaluate import load_eval_split

    split = load_eval_split(data, _eval_split_name(data), Path(members[0]["run"]), progress=False)
    probs = np.mean([_probs(m["run"], split.images) for m in members], axis=0)
    return {"run": None, "seed": members[0]["seed"], "members": [m["run"] for m in members],
            **_metrics(split.labels, probs.argmax(1)), "own_train_time_s": 0.0,
            "train_time_s": sum(m["train_time_s"] for m in members), "epochs_run": None,
            "split": members[0]["split"], "detail": "mean of " + " and ".join(labels) + " probabilities"}


# ------------------------------------------------------------------------------- class-4 specialist

def dataset_view(root: Path, source: Path, splits: dict[str, tuple[list[str], list[int], str]]) -> Path:
    """Write a dataset folder ``root`` that reuses ``source``'s images: for each split name, a CSV of
    ``(ids, labels)`` and a symlink ``root/<split>`` to ``source/<folder>``. Returns ``root``.

    (The loader finds ``<image_id>.<ext>`` in ``<root>/<split>/``, so a view needs no image copies; its
    decoded cache is its own, in ``root/.fakeprint-cache`` unless ``cache_dir`` says otherwise.)
    """
    root.mkdir(parents=True, exist_ok=True)
    for split, (ids, labels, folder) in splits.items():
        write_csv(root / f"{split}.csv", ["image_id", "label"], ([i, int(lab)] for i, lab in zip(ids, labels,
                                                                                                strict=True)))
        link, target = root / split, (Path(source) / folder).resolve()
        if link.is_symlink() and Path(os.readlink(link)) != target:
            link.unlink()
        if not link.is_symlink():
            if link.exists():
                raise FakeprintError(f"{link}: exists and is not a link to {target}")
            link.symlink_to(target, target_is_directory=True)
    return root


def _split_parts(data: Path, run_dir: Path) -> tuple[dict[str, list], dict[str, list]]:
    """(training part, held-out part) of a run as ``{"ids": [...], "labels": [...], "folder": ...}``."""
    from .data.dataset import read_csv

    def table(split: str) -> dict[str, list]:
        t, problems = read_csv(data / f"{split}.csv", need_label=True)
        if problems:
            raise FakeprintError(str(problems[0]))
        return {"ids": t.ids, "labels": t.labels, "folder": split}

    if _eval_split_name(data) == "validation":
        return table("train"), table("validation")
    from .train import read_split_csv

    parts = read_split_csv(run_dir / "split.csv")  # a "selection" part, if any, is neither
    return tuple({"ids": parts.get(s, ([], []))[0], "labels": parts.get(s, ([], []))[1], "folder": "train"}
                 for s in ("train", "internal"))


def specialist_probability(probs: np.ndarray) -> np.ndarray:
    """P(class 4) of a class-4-vs-rest model trained with labels 4 (class 4) and 0 (rest), renormalised
    over those two outputs."""
    return probs[:, WEAK_CLASS] / np.maximum(probs[:, WEAK_CLASS] + probs[:, 0], 1e-12)


def combine_specialist(main_probs: np.ndarray, p4: np.ndarray, threshold: float) -> np.ndarray:
    """The combination rule: predict class 4 where the specialist's P(class 4) > ``threshold``, else the
    main model's prediction (the specialist only ever adds class-4 predictions)."""
    return np.where(p4 > threshold, WEAK_CLASS, main_probs.argmax(1))


def tune_threshold(main_probs: np.ndarray, p4: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The threshold in {0.05, 0.10, ..., 0.95, 1.0 (never override)} with the best accuracy of the
    combined prediction on ``labels``; ties go to the higher threshold. Returns (threshold, accuracy)."""
    best = (1.0, float((main_probs.argmax(1) == labels).mean()))
    for t in np.round(np.arange(0.95, 0.0, -0.05), 2):
        acc = float((combine_specialist(main_probs, p4, float(t)) == labels).mean())
        if acc > best[1]:
            best = (float(t), acc)
    return best


def train_specialist(data: Path, cfg: dict, run_dir: Path, main: dict[str, Any], out: Path,
                     seed: int) -> dict[str, Any]:
    """Train a class-4-vs-rest model on exactly the main run's training part, tune the combination
    threshold on the training part, and evaluate the combination on the held-out split."""
    from .data.cache import load_split
    from .evaluate import load_eval_split

    train_part, held = _split_parts(data, Path(main["run"]))

    def binary(part: dict[str, list]) -> tuple[list[str], list[int], str]:
        return part["ids"], [WEAK_CLASS if y == WEAK_CLASS else 0 for y in part["labels"]], part["folder"]

    view = dataset_view(out / "data-class4-vs-rest", data, {"train": binary(train_part), "validation": binary(held)})
    spec = train_variant(view, cfg, run_dir)

    held_split = load_eval_split(data, _eval_split_name(data), Path(main["run"]), cache_dir=cfg["cache_dir"],
                                 progress=False)
    full = load_split(data, "train", cache_dir=cfg["cache_dir"], progress=False)
    index = {image_id: i for i, image_id in enumerate(full.ids)}
    tune_idx = np.array([index[i] for i in train_part["ids"]], dtype=np.int64)
    rng = np.random.default_rng(seed)
    if len(tune_idx) > SPECIALIST_TUNE_IMAGES:
        tune_idx = np.sort(rng.choice(tune_idx, SPECIALIST_TUNE_IMAGES, replace=False))
    tune = full.subset(tune_idx)
    threshold, tune_acc = tune_threshold(_probs(main["run"], tune.images),
                                         specialist_probability(_probs(run_dir, tune.images)), tune.labels)
    main_probs = _probs(main["run"], held_split.images)
    p4 = specialist_probability(_probs(run_dir, held_split.images))
    pred = combine_specialist(main_probs, p4, threshold)
    return {"run": portable_path(run_dir), "seed": seed, "members": [main["run"]], **_metrics(held_split.labels, pred),
            "own_train_time_s": spec["train_time_s"], "train_time_s": spec["train_time_s"] + main["train_time_s"],
            "epochs_run": spec["epochs_run"], "split": main["split"], "threshold": threshold,
            "tune_accuracy": tune_acc, "tune_images": len(tune_idx),
            "specialist_binary_accuracy": spec["accuracy"],
            "detail": f"predict 4 where the specialist's P(4) > {threshold:g} (tuned on {len(tune_idx)} "
                      f"training-part images), else the baseline's prediction"}


# ----------------------------------------------------------------------------------------- reporting

def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _summarise(name: str, scale: str, data: Path, grid: Grid, results: dict[str, list[dict]], seeds: int,
               wall: float, extra: dict | None) -> dict[str, Any]:
    variants = []
    for v in grid.variants:
        runs = results[v.id]
        agg = {k: dict(zip(("mean", "std"), _stats([r[k] for r in runs]), strict=True))
               for k in ("accuracy", "macro_f1", "class4_recall", "train_time_s")}
        variants.append({"id": v.id, "label": v.label, "kind": v.kind, "preset": v.preset or grid.preset,
                         "overrides": v.overrides, "members": list(v.members), "runs": runs} | agg)
    first = next(r for rs in results.values() for r in rs)
    from .data.dataset import dataset_identity

    return {"study": name, "scale": scale, "data": dataset_identity(data), "split": first["split"],
            "n_eval": first["n"], "seeds": seeds, "wall_time_s": wall, "note": grid.note,
            "preset": grid.preset, "base": grid.base,
            "extra_overrides": extra or {}, "variants": variants}


def _fmt(mean: float, std: float, seeds: int, scale: float = 1.0, digits: int = 2) -> str:
    text = f"{mean * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if seeds > 1 else "")


def study_markdown(report: dict[str, Any]) -> str:
    """The study's table and notes as Markdown."""
    seeds = report["seeds"]
    internal = "internal split" in report["split"]
    desc = report["split"].split(": ", 1)[-1]                # "1250 images (10% of train.csv, ...)"
    where = (f"the **internal split** ({desc.replace(' (', ': ', 1).removesuffix(')')})"
             if internal else f"the official validation split ({report['n_eval']} images)")
    reused = report.get("reused_runs", 0)
    again = f" ({reused} of {report['training_runs']} runs reused from an earlier invocation)" if reused else ""
    spread = f"mean ± standard deviation over {seeds} seeds" if seeds > 1 else "one seed"
    lines = [
        f"# Study: {report['study']} ({report['scale']})",
        "",
        f"Evaluated on {where}, at each run's **last epoch** (no epoch is selected on that split)"
        f"{_steering_note(report)}. "
        f"{spread.capitalize()}. Training time: seconds in the training loop, including the members a "
        f"combined variant needs. Whole study: {report['wall_time_s'] / 60:.1f} min{again}.",
        "",
        "| variant | accuracy (%) | macro F1 | class-4 recall | training time (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for v in report["variants"]:
        lines.append(f"| {v['label']} | {_fmt(v['accuracy']['mean'], v['accuracy']['std'], seeds, 100)} | "
                     f"{_fmt(v['macro_f1']['mean'], v['macro_f1']['std'], seeds, 1, 4)} | "
                     f"{_fmt(v['class4_recall']['mean'], v['class4_recall']['std'], seeds, 1, 3)} | "
                     f"{_fmt(v['train_time_s']['mean'], v['train_time_s']['std'], seeds, 1, 0)} |")
    base = ", ".join(f"`{k}={_yaml(val)}`" for k, val in report["base"].items()) or "nothing else"
    lines += ["", f"Every run: preset `{report['preset']}` (unless a variant names another), then {base}, "
              "then the variant's own overrides:", ""]
    for v in report["variants"]:
        if v["kind"] == "average":
            what = "mean of the softmax probabilities of " + " and ".join(v["members"])
        else:
            own = [f"preset `{v['preset']}`"] if v["preset"] != report["preset"] else []
            own += [f"`{k}={_yaml(val)}`" for k, val in v["overrides"].items()]
            what = ", ".join(own) or "no overrides"
            if v["kind"] == "specialist":
                what += (f"; a class-4-vs-rest model (labels 4 / 0) on {v['members'][0]}'s training part, "
                         "combined: " + "; ".join(r["detail"] for r in v["runs"]))
            elif v["members"]:
                what += "; frozen members: " + " and ".join(v["members"])
        lines.append(f"- **{v['label']}**: {what}")
    if report["note"]:
        lines += ["", f"Note: {report['note']}."]
    return "\n".join(lines) + "\n"


def _steering_note(report: dict[str, Any]) -> str:
    """Say so where runs of the study let the evaluation split steer their training."""
    uses = [v["label"] for v in report["variants"] if v["kind"] != "average" and any(
        r.get("steered") for r in v["runs"])]
    if not uses:
        return ""
    return ("; these runs let that split steer a plateau scheduler or early stopping, so their figures are "
            "optimistic: " + ", ".join(uses))


def _yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def write_outputs(out: Path, report: dict[str, Any]) -> None:
    """study.json, study.md, accuracy.png and curves.png in ``out``."""
    atomic_write(out / "study.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out / "study.md", study_markdown(report).encode())
    plot_accuracy(report, out / "accuracy.png")
    plot_study_curves(report, out / "curves.png")


def plot_accuracy(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = report["variants"]
    mean = [v["accuracy"]["mean"] * 100 for v in vs]
    std = [v["accuracy"]["std"] * 100 for v in vs]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(vs) + 2), 4), dpi=110)
    ax.bar(range(len(vs)), mean, yerr=std if report["seeds"] > 1 else None, capsize=4, color="tab:blue")
    for i, m in enumerate(mean):
        ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(vs)))
    ax.set_xticklabels([v["label"] for v in vs], rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    lo = min(mean) - max(std + [0]) - 5
    ax.set_ylim(max(0.0, lo), min(100.0, max(mean) + max(std + [0]) + 3))
    seeds = f"mean ± std over {report['seeds']} seeds" if report["seeds"] > 1 else "one seed"
    ax.set_title(f"study {report['study']} ({report['scale']}): {seeds}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_study_curves(report: dict[str, Any], path: Path) -> None:
    """Validation accuracy and training loss per epoch of every trained run (one colour per variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(report["variants"]):
        for j, r in enumerate(v["runs"]):
            if not r.get("run") or not (Path(r["run"]) / "metrics.csv").is_file():
                continue
            with open(Path(r["run"]) / "metrics.csv", newline="") as f:
                rows = list(csv.DictReader(f))
            ep = [int(x["epoch"]) for x in rows]
            label = (v["label"] + (" (specialist, binary)" if v["kind"] == "specialist" else "")) if j == 0 else None
            style = dict(color=colours[i % len(colours)], alpha=1.0 if j == 0 else 0.45, marker=".")
            a.plot(ep, [float(x["val_acc"]) * 100 for x in rows], label=label, **style)
            b.plot(ep, [float(x["train_loss"]) for x in rows], **style)
    a.set_xlabel("epoch")
    a.set_ylabel("validation accuracy (%)")
    b.set_xlabel("epoch")
    b.set_ylabel("training loss")
    a.legend(fontsize=7)
    fig.suptitle(f"study {report['study']} ({report['scale']}): learning curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
