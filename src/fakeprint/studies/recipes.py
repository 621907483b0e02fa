"""The recipe study: candidate training recipes under one CPU-time budget, judged at their last epoch.

``fakeprint study recipes --data DIR --budget-minutes N`` trains every candidate for as many epochs as its
own training speed fits into N minutes (so a slower model gets fewer epochs: the table compares accuracy
per CPU-minute). The speed of the first candidate (the reference) is measured once; every other
candidate's is the reference's times its speed ratio, measured in interleaved probes of the two (a single
probe on a shared 2-core machine varies by 30%, a ratio far less), and a ratio within 5% of 1 counts as
1 (the same model with another augmentation costs the same). Each candidate is then then evaluates the **last** checkpoint (no epoch is selected on the split the
table reports) on the internal split with no, flip and eight-view dihedral test-time augmentation, and on
1,250 images of its own training part without augmentation (the training accuracy). Fixed ensembles of
candidates (members chosen before any result existed) average their members' probabilities.

The epochs planned for each candidate are stored in ``plan.json`` in the study folder on first use, so
an interrupted study continues with the same configs (finished runs are reused, a killed one resumes).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.core.versions import git_commit, versions
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import dataset_identity, read_csv, stratified_split
from fakeprint.data.loader import DeviceBatches
from fakeprint.data.splits import read_split_csv
from fakeprint.engine.config import load_config
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load
from fakeprint.engine.runtime import pick_device
from fakeprint.engine.training.distill import teacher_views
from fakeprint.engine.training.loop import train_one_epoch
from fakeprint.engine.training.setup import Dist, build_parts, place_model, setup_backends
from fakeprint.studies.common import scores
from fakeprint.studies.study import train_variant

TTA_COLUMNS = ("none", "flip", "dihedral")
TRAIN_PART_EVAL_IMAGES = 1250


@dataclass(frozen=True)
class Recipe:
    id: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    preset: str = "fpnet_cpu"
    members: tuple[str, ...] = ()             # an ensemble of earlier candidates (nothing trained)
    teachers: tuple[str, ...] = ()            # distilled from these earlier candidates' last checkpoints


# Every candidate: the fpnet_cpu recipe (AdamW, warm-up + linear decay, label smoothing 0.1, EMA, the eight
# flips and quarter turns) unless it says otherwise; no early stop, last epoch reported.
BASE: dict[str, Any] = {"early_stop": 0, "progress": False}
REPORT_AUG = {"hflip": True, "vflip": False, "rot90": False, "rotation": 15.0}
ROT_TRANSLATE: dict[str, Any] = {"rotation": 15.0, "translate": 8}
LONG_TEACHERS = ("rot_translate", "rot_translate_droppath", "wide_fullres_reg", "fpnet_m_reg", "threecnn_dilated")
CANDIDATES: tuple[Recipe, ...] = (
    Recipe("baseline", "fpnet_cpu as it is (dihedral flips/turns)"),
    Recipe("cutmix", "+ CutMix (alpha 1)", {"cutmix": 1.0}),
    Recipe("translate", "+ random translation (up to 8 px)", {"translate": 8}),
    Recipe("rot15_bilinear", "+ rotation +-15 deg (bilinear)", {"rotation": 15.0, "rotation_interp": "bilinear"}),
    Recipe("droppath", "+ stochastic depth 0.2, head dropout 0.3", {"model_args": {"drop_path": 0.2, "dropout": 0.3}}),
    Recipe("rot15_nearest", "+ rotation +-15 deg (nearest, as the report)", {"rotation": 15.0}),
    Recipe("mixup", "+ MixUp (alpha 0.2)", {"mixup": 0.2}),
    Recipe("wd", "weight decay 0.2 (instead of 0.05)", {"weight_decay": 0.2}),
    Recipe("weighted_ce", "class-weighted CE (class 4 x2)", {"loss": "weighted_ce", "class_weights": [1, 1, 1, 1, 2]}),
    Recipe("wide", "FPNet s2d wider (stages 64/128/256)", {"model_args": {"width": 48, "stage_widths": [64, 128, 256]}}),
    Recipe("fullres", "FPNet with a full-resolution conv stem", {"model_args": {"stem": "conv"}}),
    Recipe("threecnn_dilated", "the report's dilated ThreeCNN, fast recipe, report's augmentation",
           {"model": "threecnn_dilated", "model_args": {}, "batch_size": 32} | REPORT_AUG),
    Recipe("ensemble_reg", "ensemble: baseline + cutmix + translate + rot15_bilinear",
           members=("baseline", "cutmix", "translate", "rot15_bilinear")),
    Recipe("distill_reg", "fpnet_cpu distilled from the ensemble_reg members (weight 0.5, T 2)",
           teachers=("baseline", "cutmix", "translate", "rot15_bilinear")),
    # round 2 (long schedules, on a GPU where one is lent): regularisers combined, capacity, distillation
    Recipe("rot_translate", "+ rotation +-15 deg (nearest) and translation (8 px)", ROT_TRANSLATE),
    Recipe("rot_translate_droppath", "+ rotation, translation, stochastic depth 0.1, head dropout 0.2",
           ROT_TRANSLATE | {"model_args": {"drop_path": 0.1, "dropout": 0.2}}),
    Recipe("wide_fullres_reg", "FPNet wide (48; 64/128/256) with a full-resolution stem, rotation, translation, "
           "stochastic depth 0.1", ROT_TRANSLATE | {"model_args": {"stem": "conv", "width": 48,
                                                                     "stage_widths": [64, 128, 256], "drop_path": 0.1}}),
    Recipe("fpnet_m_reg", "fpnet_m (full resolution, depths 1/2/2), rotation, translation, stochastic depth 0.1",
           ROT_TRANSLATE | {"model": "fpnet_m", "model_args": {"drop_path": 0.1}}),
    Recipe("ensemble_long", "ensemble: rot_translate + rot_translate_droppath + wide_fullres_reg + fpnet_m_reg + "
           "threecnn_dilated", members=LONG_TEACHERS),
    Recipe("distill_long", "fpnet_s2d with rotation and translation, distilled from the ensemble_long members "
           "(weight 0.7, T 2)", ROT_TRANSLATE | {"distill_weight": 0.7}, teachers=LONG_TEACHERS),
    # round 6: the shipped default's recipe (the dilated ThreeCNN at width 32 with the fast recipe)
    Recipe("dilated_w32", "the dilated ThreeCNN at width 32 (c3 128), fast recipe, report's augmentation: "
           "the shipped default's preset", preset="fast"),
)
TINY: dict[str, Any] = {"model": "fpnet_tiny", "model_args": {"width": 4}, "batch_size": 16, "eval_batch_size": 64,
                        "threads": 1, "workers": 1, "max_train_images": 120}


def candidates(only: list[str] | None = None) -> list[Recipe]:
    known = {r.id: r for r in CANDIDATES}
    if not only:
        return list(CANDIDATES)
    bad = [o for o in only if o not in known]
    if bad:
        raise FakeprintError(f"unknown recipe(s) {', '.join(bad)} (known: {', '.join(known)})")
    chosen = [known[o] for o in only]
    for i, r in enumerate(chosen):
        late = [t for t in r.teachers if t in only and only.index(t) > i]
        if late:
            raise FakeprintError(f"{r.id} is distilled from {', '.join(late)}: list them before it in --only")
    missing = {m for r in chosen for m in (*r.members, *r.teachers)} - set(only)
    if missing:
        raise FakeprintError(f"an ensemble or distillation needs its members too: add {', '.join(sorted(missing))} "
                             "to --only")
    return chosen


def recipe_config(r: Recipe, extra: dict[str, Any] | None, tiny: bool = False) -> dict[str, Any]:
    overrides = BASE | r.overrides | (TINY if tiny else {}) | (extra or {})
    if tiny and "model_args" in r.overrides:  # keep the candidate's own arguments on the tiny model
        overrides["model_args"] = TINY["model_args"] | {k: v for k, v in r.overrides["model_args"].items()
                                                        if k in ("drop_path", "dropout", "stem")}
        overrides["model"] = TINY["model"]
    return load_config(r.preset, overrides)


# ---------------------------------------------------------------------------------------------- speed

def measure_speed(cfg: dict[str, Any], steps: int = 6, warmup: int = 2, seconds: float | None = None,
                  start_at: float | None = None) -> float:
    """Training images/s of ``cfg`` on this machine: ``steps`` timed steps of the real training step (augment,
    mix, forward, backward, optimiser, EMA) on random 100x100 images, after ``warmup`` untimed ones. With
    ``seconds``, as many rounds of ``steps`` steps as fit into that time instead, timed from ``start_at``
    (``time.time()`` seconds; so that probes in several processes overlap, as their runs will)."""
    cfg = cfg | {"progress": False, "distill_from": []}
    device = pick_device(cfg["device"])
    setup_backends(cfg, device)
    bs = int(cfg["batch_size"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, ((steps + warmup) * bs, 100, 100, 3), generator=g, dtype=torch.uint8).to(device)
    y = torch.randint(0, 5, ((steps + warmup) * bs,), generator=g).to(device)
    parts = build_parts(cfg, place_model(cfg, device, 5), device, y, 5, steps)
    gen = torch.Generator(device=device).manual_seed(0)
    warm = DeviceBatches(x[: warmup * bs], y[: warmup * bs], bs)
    timed = DeviceBatches(x[warmup * bs:], y[warmup * bs:], bs)

    def run(batches: DeviceBatches) -> None:
        train_one_epoch(parts.model, batches, parts.opt, None, False, parts.loss_fn, cfg, device, parts.amp_dtype, None,
                        parts.ema, gen, Dist(), "")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    run(warm)
    sync()
    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    t0, done = time.perf_counter(), 0
    while True:
        run(timed)
        done += steps * bs
        if seconds is None or time.perf_counter() - t0 >= seconds:
            break
    sync()
    return done / (time.perf_counter() - t0)


def training_part_size(data: Path, cfg: dict[str, Any]) -> int:
    """Images in the training part of the internal split (what one epoch sees)."""

    table, problems = read_csv(Path(data) / "train.csv", need_label=True)
    if problems:
        raise FakeprintError(str(problems[0]))
    n = len(table.ids)
    if (Path(data) / "validation.csv").is_file():
        train_n = n
    else:
        tr, _ = stratified_split(np.asarray(table.labels), cfg["val_fraction"], cfg["split_seed"])
        train_n = len(tr)
    cap = int(cfg["max_train_images"] or 0)
    return min(train_n, cap) if cap else train_n


RATIO_TOLERANCE = 0.05


def speed_ratio(cfg: dict[str, Any], reference: dict[str, Any], rounds: int = 3, steps: int = 8) -> float:
    """Training speed of ``cfg`` relative to ``reference``: the median over ``rounds`` of back-to-back probes
    of the two; within ``RATIO_TOLERANCE`` of 1 it is 1."""
    ratios = []
    for _ in range(rounds):
        ratios.append(measure_speed(cfg, steps=steps) / measure_speed(reference, steps=steps))
    r = float(np.median(ratios))
    return 1.0 if abs(r - 1.0) < RATIO_TOLERANCE else r


def plan_epochs(budget_minutes: float, images_per_s: float, n_train: int) -> int:
    """Whole epochs that fit into the budget at the measured speed (at least one)."""
    return max(1, int(budget_minutes * 60.0 * images_per_s / max(n_train, 1)))


# --------------------------------------------------------------------------------------------- runner

def run_recipes(data: str | Path, budget_minutes: float, out: str | Path | None = None,
                only: list[str] | None = None, extra: dict[str, Any] | None = None, tiny: bool = False,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the recipe study; writes ``recipes.json`` and ``recipes.md`` in ``out``."""

    log = log or (lambda s: print(s, file=sys.stderr))
    data = Path(data)
    if not (data / "train.csv").is_file():
        raise FakeprintError(f"{data / 'train.csv'}: file not found (a study needs a dataset in the report's layout)")
    if not budget_minutes > 0:
        raise FakeprintError(f"--budget-minutes must be positive, got {budget_minutes}")
    chosen = candidates(only)
    out = Path(out or "runs/study-recipes")
    out.mkdir(parents=True, exist_ok=True)
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else {}
    if plan and plan.get("budget_minutes") != budget_minutes:
        raise FakeprintError(f"{out}: planned for a budget of {plan.get('budget_minutes')} min; use that budget "
                             "or another --out")
    plan["budget_minutes"] = budget_minutes
    plan.setdefault("runs", {})
    t0 = time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    trained = [r for r in chosen if not r.members]
    for i, r in enumerate(trained, 1):
        cfg = recipe_config(r, extra, tiny)
        if r.id not in plan["runs"]:
            n_train = training_part_size(data, cfg)
            if "reference" not in plan:
                ips = measure_speed(cfg, steps=12)
                plan["reference"] = {"id": r.id, "images_per_s": ips}
                ratio = 1.0
            else:
                ref = next((c for c in CANDIDATES if c.id == plan["reference"]["id"]), None)
                if ref is None:
                    raise FakeprintError(f"{plan_path}: unknown reference candidate {plan['reference']['id']!r}")
                ratio = speed_ratio(cfg, recipe_config(ref, extra, tiny))
            ips = plan["reference"]["images_per_s"] * ratio
            plan["runs"][r.id] = {"images_per_s_probe": ips, "speed_ratio": ratio, "train_images": n_train,
                                  "epochs": plan_epochs(budget_minutes, ips, n_train)}
            atomic_write(plan_path, (json.dumps(plan, indent=2) + "\n").encode())
        p = plan["runs"][r.id]
        cfg["epochs"] = int(p["epochs"])
        if r.teachers:
            cfg["distill_from"] = [str(out / "runs" / t / "last.safetensors") for t in r.teachers]
        run_dir = out / "runs" / r.id
        log(f"[{i}/{len(trained)}] {r.label}: {p['epochs']} epoch(s) at ~{p['images_per_s_probe']:.0f} images/s "
            f"-> {run_dir}")
        train_variant(data, cfg, run_dir)
        rows[r.id] = evaluate_last_cached(data, run_dir) | {"planned": p}
    for r in chosen:
        if r.members:
            rows[r.id] = evaluate_ensemble(data, [out / "runs" / m for m in r.members])
    report = {
        "study": "recipes", "budget_minutes": budget_minutes, "data": dataset_identity(data),
        "split": next(iter(rows.values()))["split"] if rows else None, "selection": "last epoch (no selection)",
        "machine": machine(), "commit": git_commit(), "versions": versions(), "tiny": tiny,
        "extra_overrides": extra or {}, "wall_time_s": time.perf_counter() - t0,
        "candidates": [{"id": r.id, "label": r.label, "preset": r.preset, "overrides": r.overrides,
                        "members": list(r.members), "teachers": list(r.teachers)} | rows[r.id] for r in chosen],
    }
    atomic_write(out / "recipes.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write(out / "recipes.md", recipes_markdown(report).encode())
    log(f"recipe study: {out / 'recipes.md'}")
    return report


def machine() -> str:
    """The device in words: the GPU's name, or the CPU's model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _held_out(data: Path, run_dir: Path):
    return load_eval_split(data, "validation" if (data / "validation.csv").is_file() else "internal",
                           run_dir / "last.safetensors", progress=False)


def evaluate_last_cached(data: Path, run_dir: Path) -> dict[str, Any]:
    """``evaluate_last``, kept in ``recipe-eval.json`` beside the checkpoint it describes (recomputed when the
    checkpoint is newer), so a continued study does not evaluate finished runs again."""
    cache = run_dir / "recipe-eval.json"
    last = run_dir / "last.safetensors"
    if cache.is_file() and cache.stat().st_mtime >= last.stat().st_mtime:
        return json.loads(cache.read_text())
    result = evaluate_last(data, run_dir)
    atomic_write(cache, (json.dumps(result, indent=2) + "\n").encode())
    return result


def evaluate_last(data: Path, run_dir: Path) -> dict[str, Any]:
    """The last checkpoint on the held-out split (each TTA mode) and on part of its own training part."""

    clf = load(run_dir / "last.safetensors", "auto")  # the GPU where there is one (load defaults to the CPU)
    held = _held_out(data, run_dir)
    by_tta = {mode: scores(held.labels, clf.predict(held.images, tta=mode).probs.argmax(1)) for mode in TTA_COLUMNS}
    own = teacher_views(clf.meta.get("config") or {})  # the flips and turns it was trained with
    by_tta["own"] = by_tta[own] | {"views": own}
    # training accuracy: the final weights on (a seeded part of) the images they were trained on, unaugmented
    train_ids = set(read_split_csv(run_dir / "split.csv").get("train", ([], []))[0])
    full = load_split(data, "train", progress=False)
    idx = np.array([i for i, image_id in enumerate(full.ids) if image_id in train_ids], dtype=np.int64)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(idx, min(TRAIN_PART_EVAL_IMAGES, len(idx)), replace=False))
    part = full.subset(idx)
    train_acc = float((clf.predict(part.images).labels == part.labels).mean())
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "metrics.csv", newline="") as f:
        hist = list(csv.DictReader(f))
    ips = float(np.mean([float(h["train_images_per_s"]) for h in hist])) if hist else 0.0
    return {"run": run_dir.name, "split": summary["split"], "n": int(len(held.labels)), "epochs": len(hist),
            "train_minutes": summary["train_time_s"] / 60.0, "images_per_s": ips,
            "train_part_accuracy": train_acc, "train_part_images": int(len(idx)), "tta": by_tta}


def evaluate_ensemble(data: Path, runs: list[Path]) -> dict[str, Any]:
    held = _held_out(data, runs[0])
    probs: dict[str, list[np.ndarray]] = {mode: [] for mode in (*TTA_COLUMNS, "own")}
    for r in runs:
        clf = load(r / "last.safetensors", "auto")
        mine = {mode: clf.predict(held.images, tta=mode).probs for mode in TTA_COLUMNS}
        for mode in TTA_COLUMNS:
            probs[mode].append(mine[mode])
        probs["own"].append(mine[teacher_views(clf.meta.get("config") or {})])
    # "own": each member over the flips and turns it was trained with (see train.teacher_views)
    by_tta = {mode: scores(held.labels, np.mean(p, axis=0).argmax(1)) for mode, p in probs.items()}
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    return {"run": None, "split": summaries[0]["split"], "n": int(len(held.labels)), "epochs": None,
            "train_minutes": sum(s["train_time_s"] for s in summaries) / 60.0, "images_per_s": None,
            "train_part_accuracy": None, "tta": by_tta}


def recipes_markdown(report: dict[str, Any]) -> str:
    rows = report["candidates"]
    base = next((r for r in rows if r["id"] == "baseline"), None)
    split = report["split"] or "internal split"
    lines = [
        f"# Recipe study: {report['budget_minutes']:g} CPU-minutes per candidate",
        "",
        f"Every figure is on the {split}, at the **last epoch** (no epoch selection; the runs never stop "
        "early). Each candidate trains for the whole epochs that its training speed fits into the budget: "
        f"the reference candidate's speed, measured once on this machine ({report['machine']}), times the "
        "candidate's speed ratio to it (interleaved probes; within 5% counts as the same). Minutes and "
        "images/s are measured wall time, which other work on the machine slows. Training accuracy: the final "
        f"weights on {TRAIN_PART_EVAL_IMAGES} unaugmented images of their own training part. TTA: none, "
        "horizontal flip (2 views), dihedral (8 flips and quarter turns). Ensembles average the last "
        "checkpoints' probabilities of members fixed before any result existed.",
        "",
        "| candidate | epochs | minutes | images/s | training acc. | acc. (no TTA) | acc. (flip) | acc. (8-view) "
        "| vs baseline (8-view) | class-4 recall (8-view) | macro F1 (8-view) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        t = r["tta"]
        delta = (f"{(t['dihedral']['accuracy'] - base['tta']['dihedral']['accuracy']) * 100:+.2f}"
                 if base is not None and r is not base else "")
        if r["members"]:
            lead = f"| {r['label']} | - | {r['train_minutes']:.1f} (sum) | - | - |"
        else:
            lead = (f"| {r['label']} | {r['epochs']} | {r['train_minutes']:.1f} | {r['images_per_s']:.0f} | "
                    f"{r['train_part_accuracy'] * 100:.2f}% |")
        lines.append(f"{lead} {t['none']['accuracy'] * 100:.2f}% | {t['flip']['accuracy'] * 100:.2f}% | "
                     f"**{t['dihedral']['accuracy'] * 100:.2f}%** | {delta} | "
                     f"{t['dihedral']['class4_recall']:.3f} | {t['dihedral']['macro_f1']:.4f} |")
    lines += ["", "What each candidate changes (on top of the `fpnet_cpu` preset, with "
              + ", ".join(f"`{k}={v}`" for k, v in BASE.items() if k != "progress") + "):", ""]
    for r in rows:
        what = (", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "nothing") if not r["members"] else \
            "mean probabilities of " + ", ".join(r["members"])
        if r.get("teachers"):
            what = ("distilled from the last checkpoints of " + ", ".join(r["teachers"]) + " (their mean logits, "
                    "each teacher over the flips and turns it was trained with, computed once before training and "
                    "not counted in its minutes)")
        lines.append(f"- **{r['id']}**: {what}")
    lines += ["", f"Commit {report['commit']}; torch {report['versions'].get('torch', '?')}; "
              f"study wall time {report['wall_time_s'] / 60:.1f} min (reused runs count nothing)."]
    return "\n".join(lines) + "\n"
