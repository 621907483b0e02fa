"""The studies' grids as plain data: each study is a preset, base overrides per scale, and variants
(docs/STUDIES.md documents them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import load_config

SCALES = ("small", "full", "tiny")


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
