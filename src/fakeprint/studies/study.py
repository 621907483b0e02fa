"""Studies: the report's comparisons (and its failed approaches and class-4 future work), one command each.

A study is a grid of variants trained with ``fakeprint.engine.training.train.train`` on the same data and evaluated on the
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

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fakeprint.core.csvio import write_csv
from fakeprint.core.errors import FakeprintError
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import portable_path, read_csv
from fakeprint.data.splits import read_split_csv
from fakeprint.engine.config import load_config
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load
from fakeprint.engine.training.train import train
from fakeprint.studies.common import WEAK_CLASS, scores
from fakeprint.studies.grids import SPECIALIST_TUNE_IMAGES, get_grid, variant_config
from fakeprint.studies.study_report import summarise_study, write_outputs


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
    report = summarise_study(name, scale, data, grid, results, seeds, wall, extra)
    report |= {"training_runs": n_runs, "reused_runs": reused}
    write_outputs(out, report)
    log(f"study {name} ({scale}) finished in {wall / 60:.1f} min: {out / 'study.md'}")
    return report


def train_variant(data: Path, cfg: dict, run_dir: Path) -> dict[str, Any]:
    """Train one run (or reuse/continue it) and read back its evaluation on the held-out split."""

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
    return load(run).predict(images).probs


def average_members(data: Path, members: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """Evaluate the mean of the members' softmax probabilities on the held-out split (nothing trained)."""

    split = load_eval_split(data, _eval_split_name(data), Path(members[0]["run"]), progress=False)
    probs = np.mean([_probs(m["run"], split.images) for m in members], axis=0)
    return {"run": None, "seed": members[0]["seed"], "members": [m["run"] for m in members],
            **scores(split.labels, probs.argmax(1)), "own_train_time_s": 0.0,
            "train_time_s": sum(m["train_time_s"] for m in members), "epochs_run": None,
            "split": members[0]["split"], "detail": "mean of " + " and ".join(labels) + " probabilities"}


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

    def table(split: str) -> dict[str, list]:
        t, problems = read_csv(data / f"{split}.csv", need_label=True)
        if problems:
            raise FakeprintError(str(problems[0]))
        return {"ids": t.ids, "labels": t.labels, "folder": split}

    if _eval_split_name(data) == "validation":
        return table("train"), table("validation")

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
    return {"run": portable_path(run_dir), "seed": seed, "members": [main["run"]], **scores(held_split.labels, pred),
            "own_train_time_s": spec["train_time_s"], "train_time_s": spec["train_time_s"] + main["train_time_s"],
            "epochs_run": spec["epochs_run"], "split": main["split"], "threshold": threshold,
            "tune_accuracy": tune_acc, "tune_images": len(tune_idx),
            "specialist_binary_accuracy": spec["accuracy"],
            "detail": f"predict 4 where the specialist's P(4) > {threshold:g} (tuned on {len(tune_idx)} "
                      f"training-part images), else the baseline's prediction"}
