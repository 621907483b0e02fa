"""The training loop, top to bottom: data -> model -> optimiser -> epochs -> checkpoints -> report.

DDP is switched on by the ``torchrun`` environment (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on GPU.
Each rank takes its shard of every epoch's permutation; metrics are summed across ranks; rank 0 alone
writes. Randomness is a pure function of (seed, epoch, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.core.metrics import confusion_text, report_text, write_report
from fakeprint.core.versions import git_commit, versions
from fakeprint.data.dataset import NUM_CLASSES
from fakeprint.data.loader import DeviceBatches, to_device_tensor
from fakeprint.engine.calibration import calibrate
from fakeprint.engine.config import load_config
from fakeprint.engine.runtime import predict_logits
from fakeprint.engine.training import statcache
from fakeprint.engine.training.data import prepare_data
from fakeprint.engine.training.distill import teacher_logits
from fakeprint.engine.training.loop import cm_to_pairs, epoch_generator, evaluate_model, train_one_epoch
from fakeprint.engine.training.run_folder import (
    held_out_figure,
    load_resume_point,
    plot_training_curves,
    read_history,
    save_resume_point,
    write_history,
)
from fakeprint.engine.training.setup import (
    Dist,
    Parts,
    all_sum,
    barrier,
    broadcast_buffers,
    build_parts,
    device_name,
    place_model,
    setup_backends,
    setup_distributed,
)
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD
from fakeprint.models import count_parameters
from fakeprint.models.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    update_metadata,
)

# settings a resumed run may change (they change when or how visibly it runs, not what it learns); recorded in
# its config.yaml
RESUME_SETTINGS = ("max_minutes", "progress", "threads")


@dataclass
class Inputs:
    """The splits on the device: images (or, with statistics computed once, their statistics) and labels."""

    train: torch.Tensor
    y_train: torch.Tensor
    val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None
    sel: torch.Tensor | None = None
    y_sel: torch.Tensor | None = None
    val_images: torch.Tensor | None = None  # the held-out images themselves, for the final report
    on_stats: bool = False
    stats_time: float = 0.0


@dataclass
class Progress:
    """Where a run stands: what ``--resume`` restores and the loop updates."""

    start_epoch: int = 0
    best_acc: float = -1.0
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    time_before: float = 0.0
    resumes: int = 0


def train(data_root: str | Path, cfg: dict, out: str | Path, resume: bool = False,
          resume_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg['model']`` on ``data_root`` into the run folder ``out``; returns the run's summary. With
    ``resume``, the run's own config.yaml replaces ``cfg``; ``resume_overrides`` may change RESUME_SETTINGS."""
    out = Path(out)
    d, device = setup_distributed(cfg["device"])
    cfg = resumed_config(out, resume_overrides) if resume else cfg
    if not resume and d.main and (out / "metrics.csv").exists():
        raise FakeprintError(f"{out}: a run folder with results already exists; use --resume to continue it "
                             "or choose another --out")
    setup_backends(cfg, device)
    torch.manual_seed(cfg["seed"])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    train_split, val_split, split_desc, sel_split = prepare_data(Path(data_root), cfg, d, out)
    held_out = val_split is not None
    if not held_out and (cfg["scheduler"] == "plateau" or int(cfg["early_stop"])):
        raise FakeprintError("train_on_all leaves no held-out split to steer a plateau scheduler or early stopping: "
                             "use a fixed schedule (--set scheduler=warmup_linear early_stop=0)")
    x = Inputs(to_device_tensor(train_split.images, device), torch.from_numpy(train_split.labels).to(device))
    if held_out:
        x.val = x.val_images = to_device_tensor(val_split.images, device)
        x.y_val = torch.from_numpy(val_split.labels).to(device)
    if sel_split is not None:
        x.sel, x.y_sel = to_device_tensor(sel_split.images, device), torch.from_numpy(sel_split.labels).to(device)
    model = place_model(cfg, device, NUM_CLASSES)
    soft = distillation_targets(cfg, x.train, device, out, d)
    compute_statistics(cfg, model, x, d)
    batches = DeviceBatches(x.train, x.y_train, int(cfg["batch_size"]), sampler=cfg["sampler"], drop_last=True,
                            seed=cfg["seed"], rank=d.rank, world_size=d.world_size, targets=soft)
    if len(batches) == 0:
        raise FakeprintError(f"batch_size {cfg['batch_size']} is larger than the training set "
                             f"({len(train_split)} images over {d.world_size} process(es))")
    parts = build_parts(cfg, model, device, x.y_train, NUM_CLASSES, len(batches))
    state = restore(out, parts) if resume else Progress()
    train_model: nn.Module = statcache.OnStatistics(model) if x.on_stats else model
    if d.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    meta_base = checkpoint_meta(cfg, model, split_desc)
    if d.main:
        write_run_info(out, cfg, data_root, meta_base, device, d, x, state, len(train_split),
                       len(val_split) if held_out else 0)
    stop_reason, epoch, spent_s = run_epochs(cfg, out, parts, train_model, batches, x, state, meta_base, split_desc,
                                             device, d)
    summary = summarise(out, stop_reason, epoch, spent_s + x.stats_time, split_desc, held_out, sel_split is not None,
                        state.best_acc)
    if d.main and (out / "last.safetensors").exists():
        plot_training_curves(state.history, out / "curves.png", cfg["model"])
        if held_out:
            summary |= final_report(out, cfg, x, val_split, split_desc, device, summary["train_time_s"])
        atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    barrier(d)
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary


def resumed_config(out: Path, overrides: dict[str, Any] | None) -> dict:
    """The config a run folder was started with (keys added to fakeprint since take their defaults), with the
    RESUME_SETTINGS in ``overrides`` applied; anything else in ``overrides`` is refused."""
    saved = out / "config.yaml"
    if not (out / "resume.json").is_file() or not saved.is_file():
        raise FakeprintError(f"{out}: nothing to resume (no resume.json and config.yaml from an earlier run)")
    bad = sorted(set(overrides or {}) - set(RESUME_SETTINGS))
    if bad:
        raise FakeprintError(f"{', '.join(bad)} cannot be changed on --resume: a resumed run continues with the "
                             f"config it was started with; only {', '.join(RESUME_SETTINGS)} may change")
    try:
        return load_config(None, (yaml.safe_load(saved.read_text()) or {}) | (overrides or {}))
    except yaml.YAMLError as e:
        raise FakeprintError(f"{saved}: not valid YAML ({e})") from None


def distillation_targets(cfg: dict, x_train: torch.Tensor, device: torch.device, out: Path,
                         d: Dist) -> torch.Tensor | None:
    """The teachers' logits on every training image (``distill_from``), or None."""
    if not cfg["distill_from"]:
        return None
    if not isinstance(cfg["distill_from"], list):
        raise FakeprintError("config: distill_from must be a list of teacher checkpoints")
    if d.main:
        print(f"distillation: teacher logits of {len(cfg['distill_from'])} checkpoint(s) on "
              f"{len(x_train)} training images (each over the views it was trained on)", file=sys.stderr)
    return teacher_logits(cfg["distill_from"], x_train, device, cfg, cache=out / "teacher_logits.safetensors",
                          write_cache=d.main, progress=bool(cfg["progress"]) and d.main)


def compute_statistics(cfg: dict, model: nn.Module, x: Inputs, d: Dist) -> None:
    """statmlp with lossless augmentation only: replace the images in ``x`` by the statistics of every view of
    every image, computed once rather than every epoch (statcache)."""
    x.on_stats = statcache.enabled(cfg, model)
    if not x.on_stats:
        return
    t0 = time.perf_counter()
    show, views, n_crops = bool(cfg["progress"]) and d.main, statcache.views(cfg), statcache.crop_count(cfg)
    n_train = len(x.train)
    x.train = statcache.statistics(model, x.train, cfg["normalize"], views=views, progress=show,
                                   desc="statistics (train)", crops=n_crops, crop_size=int(cfg["stat_crop_size"]),
                                   crop_seed=int(cfg["seed"]), variants=statcache.variant_count(cfg),
                                   weights=cfg["file_aug_weights"])
    if x.val is not None:
        x.val = statcache.statistics(model, x.val, cfg["normalize"], views=views, progress=show,
                                     desc="statistics (val)")
    if x.sel is not None:
        x.sel = statcache.statistics(model, x.sel, cfg["normalize"], views=views, progress=show,
                                     desc="statistics (sel)")
    x.stats_time = time.perf_counter() - t0
    if d.main:
        what = "their mirror images" if views == "flip" else "their seven other flips and quarter turns"
        if n_crops:
            what += f", {n_crops} crops of {cfg['stat_crop_size']} pixels and their mirrors"
        if statcache.variant_count(cfg):
            what += f", {statcache.variant_count(cfg)} perturbed copies of the file and their mirrors"
        print(f"statistics computed once (stat_cache): {x.train.shape[2]:,} for each of {n_train} training images "
              f"and {what} in {x.stats_time:.1f}s; each step takes the row of the view it draws", file=sys.stderr)


def restore(out: Path, parts: Parts) -> Progress:
    """Load the run's resume point into ``parts``; returns where the run stands."""
    weights, state = load_resume_point(out)
    parts.model.load_state_dict(weights.state_dict())
    parts.opt.load_state_dict(state["optimizer"])
    if parts.sched is not None and state.get("scheduler") is not None:
        parts.sched.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state.get("scaler") is not None:
        parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.model.load_state_dict(state["ema"])
        parts.ema.updates = int(state.get("ema_updates", 0))
    start = state["epoch"] + 1
    return Progress(start, state["best_acc"], state["bad_epochs"], read_history(out / "metrics.csv", start),
                    float(state.get("train_time_s", 0.0)), int(state.get("resumes", 0)) + 1)


def checkpoint_meta(cfg: dict, model: nn.Module, split_desc: str) -> dict[str, Any]:
    """The metadata every checkpoint of this run carries."""
    return {
        "model": cfg["model"], "model_args": cfg["model_args"], "num_classes": NUM_CLASSES,
        "classes": [str(c) for c in range(NUM_CLASSES)], "image_size": 100,
        "normalization": {"mode": cfg["normalize"], "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "config": cfg, "tta": cfg["tta"], "commit": git_commit(), "versions": versions(), "split": split_desc,
        "parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True),
    }


def write_run_info(out: Path, cfg: dict, data_root: str | Path, meta: dict, device: torch.device, d: Dist,
                   x: Inputs, state: Progress, n_train: int, n_val: int) -> None:
    """``config.yaml`` and ``run.json``, and the line that says what is trained on what."""
    atomic_write(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
    info = {"data": str(Path(data_root).resolve()), "split": meta["split"], "train_images": n_train,
            "val_images": n_val, "device": device_name(device), "world_size": d.world_size,
            "resumes": state.resumes, "stat_cache": x.on_stats, "statistics_time_s": x.stats_time,
            "commit": meta["commit"], "versions": meta["versions"], "argv": sys.argv,
            "parameters": meta["parameters"], "trainable_parameters": meta["trainable_parameters"]}
    atomic_write(out / "run.json", (json.dumps(info, indent=2) + "\n").encode())
    print(f"training {cfg['model']} ({meta['trainable_parameters']:,} trainable parameters) on {n_train} images, "
          f"validating on {n_val} ({meta['split']}); device {info['device']} x{d.world_size}; run folder {out}",
          file=sys.stderr)


def run_epochs(cfg: dict, out: Path, parts: Parts, train_model: nn.Module, batches: DeviceBatches, x: Inputs,
               state: Progress, meta_base: dict, split_desc: str, device: torch.device,
               d: Dist) -> tuple[str, int, float]:
    """The epochs, each followed by its evaluation, checkpoints and resume point; returns (what stopped the run,
    the last epoch, the training time summed over resumes)."""
    eval_model = lambda: parts.ema.model if parts.ema is not None else parts.model  # noqa: E731
    held_out = x.val is not None
    train_start, epoch, limit_s = time.perf_counter(), state.start_epoch - 1, float(cfg["max_minutes"]) * 60.0
    for epoch in range(state.start_epoch, int(cfg["epochs"])):
        row, ev, steer = one_epoch(cfg, parts, train_model, batches, x, eval_model, epoch, device, d)
        state.history.append(row)
        if parts.sched is not None and not parts.per_step:
            parts.sched.step(steer)
        improved = held_out and steer > state.best_acc
        if improved:
            state.best_acc, state.bad_epochs = steer, 0
        else:
            state.bad_epochs += 1
        stop = held_out and bool(cfg["early_stop"]) and state.bad_epochs >= int(cfg["early_stop"])
        spent = state.time_before + time.perf_counter() - train_start
        out_of_time = limit_s > 0 and spent >= limit_s and epoch + 1 < int(cfg["epochs"])
        if d.world_size > 1 and limit_s > 0:  # every rank stops at the same epoch (each has its own clock)
            out_of_time = all_sum(torch.tensor(float(out_of_time), device=device), d).item() > 0
        if d.main:
            save_epoch(out, parts, eval_model(), meta_base, split_desc, cfg, state, row, ev, epoch, improved, spent,
                       x.sel is not None)
        barrier(d)
        if stop or out_of_time:
            if d.main:
                print(f"early stop: no better validation accuracy for {state.bad_epochs} epochs" if stop else
                      f"time limit: {spent / 60:.1f} of max_minutes {cfg['max_minutes']} spent", file=sys.stderr)
            return ("early stop" if stop else "time limit"), epoch, state.time_before + time.perf_counter() - train_start
    return "epochs", epoch, state.time_before + time.perf_counter() - train_start


def one_epoch(cfg: dict, parts: Parts, train_model: nn.Module, batches: DeviceBatches, x: Inputs, eval_model,
              epoch: int, device: torch.device, d: Dist) -> tuple[dict[str, Any], dict | None, float | None]:
    """Train one epoch and evaluate it; returns its metrics.csv row, the held-out evaluation and the figure the
    schedule may look at (the selection split's where there is one)."""
    batches.set_epoch(epoch)
    gen = epoch_generator(cfg, epoch, d, device)
    t0 = time.perf_counter()
    tr = train_one_epoch(train_model, batches, parts.opt, parts.sched, parts.per_step, parts.loss_fn, cfg, device,
                         parts.amp_dtype, parts.scaler, parts.ema, gen, d, desc=f"epoch {epoch + 1}/{cfg['epochs']}",
                         on_statistics=x.on_stats)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t0
    broadcast_buffers(eval_model(), d)  # every rank evaluates with rank 0's BatchNorm statistics
    ev = evaluate_model(eval_model(), x.val, x.y_val, cfg, device, parts.amp_dtype, d, NUM_CLASSES,
                        on_statistics=x.on_stats) if x.val is not None else None
    sel_acc = evaluate_model(eval_model(), x.sel, x.y_sel, cfg, device, parts.amp_dtype, d, NUM_CLASSES,
                             on_statistics=x.on_stats)["val_acc"] if x.sel is not None else None
    steer = sel_acc if sel_acc is not None else ev["val_acc"] if ev else None
    row = {"epoch": epoch + 1, "lr": parts.opt.param_groups[0]["lr"], "train_loss": tr["train_loss"],
           "train_acc": tr["train_acc"], "val_loss": ev["val_loss"] if ev else None,
           "val_acc": ev["val_acc"] if ev else None, "val_macro_f1": ev["val_macro_f1"] if ev else None,
           "val_recall_weakest": min(ev["val_recall"]) if ev else None, "selection_acc": sel_acc,
           "epoch_time_s": time.perf_counter() - t0, "train_images_per_s": tr["images"] / max(train_time, 1e-9)}
    return row, ev, steer


def save_epoch(out: Path, parts: Parts, weights: nn.Module, meta_base: dict, split_desc: str, cfg: dict,
               state: Progress, row: dict, ev: dict | None, epoch: int, improved: bool, spent: float,
               has_selection: bool) -> None:
    """Rank 0 after an epoch: ``last`` (and ``best`` when it improved), metrics.csv, then the resume point."""
    metrics = ({k: row[k] for k in ("val_acc", "val_loss", "val_macro_f1")} | {"epoch": epoch + 1}) if ev else {}
    last_meta = meta_base | {"epoch": epoch + 1, "metrics": metrics}
    if ev:
        last_meta["held_out"] = held_out_figure(ev, split_desc, cfg["tta"], epoch + 1, "last epoch")
    if improved:
        how = ("best epoch, chosen on the separate selection split" if has_selection
               else "best epoch, chosen on this same split (optimistic)")
        save_checkpoint(out / "best", weights, last_meta | {
            "held_out": held_out_figure(ev, split_desc, cfg["tta"], epoch + 1, how)})
    save_checkpoint(out / "last", weights, last_meta)
    write_history(out / "metrics.csv", state.history)  # before the resume point moves (see save_resume_point)
    ema = parts.ema
    save_resume_point(out, epoch, parts.model, meta_base, {
        "optimizer": parts.opt.state_dict(), "scheduler": parts.sched.state_dict() if parts.sched is not None else None,
        "ema": ema.model.state_dict() if ema is not None else None, "ema_updates": ema.updates if ema is not None else 0,
        "epoch": epoch, "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "best_acc": state.best_acc, "bad_epochs": state.bad_epochs, "train_time_s": spent, "resumes": state.resumes})
    val = f"val {row['val_acc']:.4f}  f1 {row['val_macro_f1']:.4f}" if ev else "no held-out split"
    print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  train {row['train_acc']:.4f} (augmented)  "
          f"{val}  lr {row['lr']:.2e}  {row['epoch_time_s']:.1f}s{'  *' if improved else ''}", file=sys.stderr)


def summarise(out: Path, stop_reason: str, epoch: int, train_time: float, split_desc: str, held_out: bool,
              has_selection: bool, best_acc: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"run": str(out), "epochs_run": epoch + 1, "train_time_s": train_time,
                               "stopped_by": stop_reason, "split": split_desc,
                               "selection": "last epoch" if held_out else None}
    if held_out and not has_selection:
        summary["best_val_acc"] = best_acc
        summary["best_val_acc_note"] = "best epoch chosen on this same split: optimistic, not a held-out figure"
    elif held_out:
        summary["best_selection_acc"] = best_acc
        summary["selection_note"] = ("the schedule, early stopping and best.json were steered by the selection split "
                                     "(part of the training part), never by the reported split")
    return summary


def final_report(out: Path, cfg: dict, x: Inputs, val_split, split_desc: str, device: torch.device,
                 train_time: float) -> dict[str, Any]:
    """The report of the last epoch's weights (fp32, with the config's test-time augmentation) on the held-out
    split, and the temperature and uncertain-flag threshold of the last checkpoint."""
    last, meta = load_checkpoint(out / "last", map_location=device)
    ev = evaluate_model(last, x.val_images, x.y_val, cfg, device, None, Dist(), NUM_CLASSES)
    y_true, y_pred = cm_to_pairs(ev["confusion_matrix"])
    m = write_report(out, y_true, y_pred,
                     title=f"{cfg['model']} (last epoch, {meta['epoch']}; TTA {cfg['tta']}) on the {split_desc}",
                     extra={"split": split_desc, "epoch": meta["epoch"], "selection": "last epoch",
                            "tta": cfg["tta"], "train_time_s": train_time})
    print("\n" + confusion_text(m["confusion_matrix"]) + "\n\n" + report_text(y_true, y_pred), file=sys.stderr)
    result: dict[str, Any] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
    if len(val_split) >= 20:
        logits = predict_logits(last, val_split.images, device, batch_size=int(cfg["eval_batch_size"]),
                                norm=cfg["normalize"], tta=cfg["tta"]).numpy()
        cal = calibrate(logits, val_split.labels) | {"split": split_desc, "tta": cfg["tta"]}
        update_metadata(out / "last", {"calibration": cal})
        result["calibration"] = cal
    return result
