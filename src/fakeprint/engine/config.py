"""Training configuration: one flat dict of plain values, presets in YAML, overrides from the command line.

Every key below is documented here and nowhere else; a preset or ``--set key=value`` may change any of them,
and an unknown key is an error (a typo must not be silently ignored).
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fakeprint.core.errors import FakeprintError
from fakeprint.features.file_augment import check_weights
from fakeprint.features.preprocess import tta_mode

DEFAULTS: dict[str, Any] = {
    # model
    "model": "threecnn",          # a registered model name (see `fakeprint models`)
    "model_args": {},             # keyword arguments for the model factory
    "base_checkpoints": [],       # ensemblecnn only: [skipconcnn checkpoint, threecnn checkpoint]
    # data
    "val_fraction": 0.1,          # internal split when the dataset has no validation.csv
    "train_on_all": False,        # train on every training image (the validation images are then seen in
                                  # training: only for a final fixed-schedule model; best = last epoch)
    "split_seed": 0,              # seed of the stratified internal split
    "selection_fraction": 0.0,    # > 0: a stratified share of the training part steers the plateau scheduler, early
                                  # stopping and best.json instead of the internal split (which then only reports)
    "cache_dir": None,            # where decoded uint8 caches live (default: beside the data)
    "on_bad_image": "error",      # error | skip
    # optimisation
    "epochs": 200,
    "batch_size": 16,
    "micro_batch": 0,             # > 0: each batch runs forward/backward in slices of this many images and sums
                                  # their gradients (one optimiser step per batch); BatchNorm then normalises each
                                  # slice ("ghost" batches), and a class-weighted loss is weighted per slice. Keeps
                                  # activations in the CPU's cache (the dilated ThreeCNN's forward + backward 1.5x
                                  # faster on 2 cores with 8) but changes the recipe: -0.4 points in round 5,
                                  # docs/results.md (0: the whole batch at once)
    "eval_batch_size": 256,
    "optimizer": "adam",          # adam | adamw | sgd
    "lr": 5e-4,
    "weight_decay": 1e-4,
    "momentum": 0.9,              # sgd only
    "label_smoothing": 0.0,
    "loss": "ce",                 # ce | focal | weighted_ce
    "focal_gamma": 2.0,
    "class_weights": None,        # list of per-class loss weights for weighted_ce (None: inverse frequency)
    "sampler": "shuffle",         # shuffle | balanced
    "scheduler": "plateau",       # plateau | warmup_linear (linear warm-up, then linear decay to 0) | cosine | none
                                  # ("onecycle", its old name, is read as warmup_linear)
    "plateau_patience": 15,
    "plateau_factor": 0.8,
    "warmup_epochs": 0.0,         # warmup_linear/cosine: linear warm-up length in epochs
    "early_stop": 15,             # epochs without a better validation accuracy before stopping (0: never)
    "max_minutes": 0.0,           # stop after the epoch in which the training time (summed over resumes) passes
                                  # this many minutes; the run then ends as usual, summary.json says why (0: no limit)
    "ema": 0.0,                   # decay of an exponential moving average of the weights (0: off)
    "ema_warmup": True,           # EMA decay min(ema, (1+t)/(10+t)) at update t, so early EMA figures mean something
    "grad_clip": 0.0,
    "distill_from": [],           # teacher checkpoints: train on their mean logits too (distillation; each teacher over the flips/turns it was trained with)
    "distill_weight": 0.5,        # share of the distillation term in the loss (the rest: the label loss)
    "distill_temperature": 2.0,   # softmax temperature of teacher and student in the distillation term
    # augmentation (batched, on the device)
    "hflip": True,
    "vflip": False,
    "rotation": 15.0,             # max degrees, uniform in [-rotation, rotation]
    "rotation_interp": "nearest", # nearest (as the report's torchvision default) | bilinear
    "rotation_prob": 1.0,         # share of images rotated (the others keep their pixels: statistics models)
    "rot90": False,               # random multiples of 90 degrees (lossless)
    "translate": 0,               # max pixels of random translation (lossless roll with zero fill)
    "color_jitter": 0.0,          # photometric: brightness/contrast/saturation strength (0: off)
    "mixup": 0.0,                 # MixUp Beta(alpha, alpha) (0: off)
    "cutmix": 0.0,                # CutMix Beta(alpha, alpha) (0: off); with mixup too, each mixed batch picks one
    "mix_prob": 1.0,              # share of batches that MixUp/CutMix mix
    "normalize": "imagenet",      # imagenet | none
    "tta": "none",                # test-time augmentation: none | flip (true) | dihedral (8 flips/quarter turns);
                                  # recorded in checkpoints and applied by default by evaluate/predict/serve
    # machinery
    "seed": 0,
    "device": "auto",             # auto | cpu | cuda | cuda:N | mps
    "amp": "auto",                # auto (bf16 on GPUs and CPUs with native bf16) | bf16 | fp16 | off
    "channels_last": "auto",      # auto (on GPU; on CPU where safe, see train._channels_last) | on | off
    "compile": False,
    "stat_cache": "auto",         # statmlp, flips/quarter turns only: statistics computed once, not every epoch
    "stat_mixup": 0.0,            # MixUp Beta(alpha, alpha) of statistic rows, not of images (needs stat_cache; 0: off)
    "stat_crops": 0,              # statistics of K random crops of each training image (and mirrors) as more views
    "stat_crop_size": 90,         # their side in pixels (their statistics must number as many as the image's)
    "stat_crop_prob": 0.5,        # the share of training draws that take a crop instead of the whole image
    "file_aug": 0.0,              # share of training draws replaced by a re-encoded/resized/cropped/blurred copy of
                                  # the file, drawn afresh each epoch (features/file_augment.py; 0: off)
    "file_aug_weights": None,     # family -> weight (jpeg, jpeg2, webp, resize, crop, blur, noise, chain); None: defaults
    "file_aug_variants": 0,       # statistics computed once: M perturbed copies of each training image (and mirrors)
    "deterministic": False,       # deterministic algorithms (for exact reproducibility on CPU)
    "threads": 0,                 # CPU threads for torch (0: leave torch's default)
    "workers": 0,                 # processes for decoding images into the cache (0: all cores)
    "progress": True,
    "max_train_images": 0,        # cap on training images (0: all), for quick studies
}

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adam", "adamw", "sgd"),
    "loss": ("ce", "focal", "weighted_ce"),
    "sampler": ("shuffle", "balanced"),
    "scheduler": ("plateau", "warmup_linear", "cosine", "none"),
    "rotation_interp": ("nearest", "bilinear"),
    "normalize": ("imagenet", "none"),
    "amp": ("auto", "bf16", "fp16", "off", "on"),
    "channels_last": ("auto", "on", "off"),
    "stat_cache": ("auto", "on", "off"),
    "on_bad_image": ("error", "skip"),
}


# the names the shipped recipes had during the campaign (docs/archive/results-log.md uses them): still accepted
ALIASES = {"hybrid_v4_h2_w32": "default", "hybrid_v5_h2_w32": "accurate", "threecnn_dilated_w32": "fast",
           "statmlp_v6_h2": "stats_fast"}
EXPERIMENTS = "experiments"


def _presets_dir() -> Any:
    return resources.files("fakeprint") / "configs"


def preset_names(experiments: bool = False) -> list[str]:
    """Names of the presets shipped with the package (``configs/*.yaml``); with ``experiments``, also the campaign's
    presets (``configs/experiments/*.yaml``), as ``experiments/NAME``."""
    names = sorted(p.name[:-5] for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))
    if experiments:
        names += sorted(f"{EXPERIMENTS}/{p.name[:-5]}" for p in (_presets_dir() / EXPERIMENTS).iterdir()
                        if p.name.endswith(".yaml"))
    return names


def preset_path(name: str) -> Any:
    """The file of a shipped preset: ``NAME``, an old name of a shipped recipe (``ALIASES``), ``experiments/NAME``,
    or a bare experiment's ``NAME``; None if there is none."""
    name = ALIASES.get(name.removesuffix(".yaml"), name.removesuffix(".yaml"))
    folder, _, bare = name.rpartition("/")
    if folder not in ("", EXPERIMENTS) or not bare or bare.startswith("."):
        return None
    candidates = [_presets_dir() / f"{bare}.yaml"] if not folder else []
    candidates.append(_presets_dir() / EXPERIMENTS / f"{bare}.yaml")
    return next((c for c in candidates if c.is_file()), None)


def preset_summary(name: str) -> str:
    """One line on a shipped preset: its first comment line, then its model, epochs and batch size."""
    path = preset_path(name)
    text = path.read_text()
    head = " ".join(ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#"))
    first = head.split(". ")[0].removesuffix(".")
    data = _read_yaml(path)
    facts = ", ".join(f"{k} {data[k]}" for k in ("model", "epochs", "batch_size") if k in data)
    return f"{first} ({facts})" if first else facts


def _read_yaml(path: Path | Any) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FakeprintError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FakeprintError(f"{path}: a config must be a mapping of key: value")
    return data


def load_config(config: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> dict:
    """Resolve a config: defaults, then a preset (a YAML path or a shipped preset name), then overrides.

    ``overrides`` is a list of ``key=value`` strings (values parsed as YAML) or a dict.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if config is not None:
        path = Path(config)
        if path.is_file():
            data = _read_yaml(path)
        else:
            shipped = preset_path(str(config))
            if shipped is None:
                raise FakeprintError(
                    f"config {config!r}: no such file, and no preset of that name "
                    f"(presets: {', '.join(preset_names())}; experiments: `fakeprint train --list-presets`)"
                )
            data = _read_yaml(shipped)
        _merge(cfg, data, source=str(config))
    if overrides:
        if isinstance(overrides, dict):
            _merge(cfg, overrides, source="overrides")
        else:
            _merge(cfg, parse_overrides(overrides), source="--set")
    validate(cfg)
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FakeprintError(f"--set {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _merge(cfg: dict[str, Any], data: dict[str, Any], source: str) -> None:
    for key, value in data.items():
        head, dot, arg = key.partition(".")
        if dot and head == "model_args":  # model_args.NAME=VALUE: one model argument, the others kept
            if not arg or not isinstance(cfg["model_args"], dict):
                raise FakeprintError(f"{source}: {key!r}: expected model_args.NAME=VALUE on a model_args mapping")
            cfg["model_args"] = {**cfg["model_args"], arg: value}
            continue
        if key not in DEFAULTS:
            raise FakeprintError(f"{source}: unknown config key {key!r} (known: {', '.join(sorted(DEFAULTS))})")
        default = DEFAULTS[key]
        if key in CHOICES and isinstance(value, bool):  # YAML reads a bare on/off as true/false
            value = "on" if value else "off"
        if isinstance(default, bool) and not isinstance(value, bool):
            raise FakeprintError(f"{source}: {key} must be true or false, got {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise FakeprintError(f"{source}: {key} must be a number, got {value!r}")
            value = type(default)(value) if isinstance(default, float) or float(value).is_integer() else value
        cfg[key] = value


def validate(cfg: dict[str, Any]) -> None:
    if cfg["scheduler"] == "onecycle":  # the old name: it never was a one-cycle policy (no momentum cycle)
        cfg["scheduler"] = "warmup_linear"

    try:
        cfg["tta"] = tta_mode(cfg["tta"])
    except FakeprintError as e:
        raise FakeprintError(f"config: {e}") from None
    for key, options in CHOICES.items():
        if cfg[key] not in options:
            raise FakeprintError(f"config: {key} must be one of {', '.join(options)}, got {cfg[key]!r}")
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if int(cfg[key]) < 1:
            raise FakeprintError(f"config: {key} must be at least 1, got {cfg[key]}")
    if not isinstance(cfg["micro_batch"], int) or cfg["micro_batch"] < 0:
        raise FakeprintError(f"config: micro_batch must be 0 (off) or a number of images, got {cfg['micro_batch']}")
    if not 0.0 <= float(cfg["selection_fraction"]) < 1.0:
        raise FakeprintError(f"config: selection_fraction must be at least 0 and below 1, got {cfg['selection_fraction']}")
    if not 0.0 <= float(cfg["rotation_prob"]) <= 1.0:
        raise FakeprintError(f"config: rotation_prob must be between 0 and 1, got {cfg['rotation_prob']}")
    for key in ("mixup", "cutmix", "stat_mixup"):
        if float(cfg[key]) < 0:
            raise FakeprintError(f"config: {key} is a Beta alpha: 0 (off) or more, got {cfg[key]}")
    for key, least, what in (("stat_crops", 0, "a whole number (0: off)"),
                             ("stat_crop_size", 1, "a whole number of pixels")):
        if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] < least:
            raise FakeprintError(f"config: {key} must be {what}, got {cfg[key]!r}")
    if isinstance(cfg["file_aug"], bool) or not isinstance(cfg["file_aug"], (int, float)) \
            or not 0.0 <= float(cfg["file_aug"]) <= 1.0:
        raise FakeprintError(f"config: file_aug must be a share from 0 to 1, got {cfg['file_aug']!r}")
    if cfg["file_aug_weights"] is not None:
        check_weights(cfg["file_aug_weights"])
    if isinstance(cfg["file_aug_variants"], bool) or not isinstance(cfg["file_aug_variants"], int) \
            or cfg["file_aug_variants"] < 0:
        raise FakeprintError(f"config: file_aug_variants must be a whole number (0: off), got {cfg['file_aug_variants']!r}")
    if not 0.0 < float(cfg["stat_crop_prob"]) <= 1.0:
        raise FakeprintError(f"config: stat_crop_prob must be above 0 and at most 1, got {cfg['stat_crop_prob']}")
    if not 0.0 < float(cfg["val_fraction"]) < 1.0:
        raise FakeprintError(f"config: val_fraction must be between 0 and 1, got {cfg['val_fraction']}")
    if not isinstance(cfg["model_args"], dict):
        raise FakeprintError("config: model_args must be a mapping")
