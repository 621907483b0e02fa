"""The training loop, top to bottom: data -> model -> optimiser -> epochs -> checkpoints -> report.

DDP is switched on by the ``torchrun`` environment (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on GPU.
Each rank takes its shard of every epoch's permutation; metrics are summed across ranks; rank 0 alone
writes. Randomness is a pure function of (seed, epoch, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from . import statcache
from .augment import augment, mix_batch
from .checkpoint import (
    atomic_write,
    git_commit,
    load_checkpoint,
    load_resume_state,
    read_metadata,
    resolve_checkpoint,
    save_checkpoint,
    save_resume_state,
    update_metadata,
    versions,
)
from .data.cache import SplitData, load_split
from .data.dataset import NUM_CLASSES, stratified_split
from .data.loader import DeviceBatches, to_device_tensor
from .errors import FakeprintError
from .inference import autocast, autocast_dtype, pick_device
from .losses import make_loss
from .metrics import confusion_text, report_text, write_report
from .models import count_parameters, create_model
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_macro_f1",
                  "val_recall_weakest", "selection_acc", "epoch_time_s", "train_images_per_s"]


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local), device


def _all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Make every rank's buffers (BatchNorm statistics) rank 0's: each rank updates its own in training."""
    if d.world_size > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------- data

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
    _barrier(d)
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


def write_split_csv(path: Path, ids: list[str], labels: np.ndarray, train_idx, internal_idx, selection_idx=()) -> None:
    """``split.csv`` (``image_id,label,subset``; subset ``train``, ``internal`` or ``selection``), written with
    the csv module (ids with commas or quotes stay one field). ``evaluate.load_eval_split`` reads it back."""
    from .csvio import write_csv

    write_csv(path, ["image_id", "label", "subset"],
              [*([ids[i], int(labels[i]), "train"] for i in train_idx),
               *([ids[i], int(labels[i]), "internal"] for i in internal_idx),
               *([ids[i], int(labels[i]), "selection"] for i in selection_idx)])


def read_split_csv(path: Path) -> dict[str, tuple[list[str], list[int]]]:
    """``split.csv`` read back: subset (``train``, ``internal``, ``selection``) -> (ids, labels), in file order.
    The one reader of what ``write_split_csv`` wrote (evaluate, the studies, the recipe study)."""
    out: dict[str, tuple[list[str], list[int]]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            ids, labels = out.setdefault(r.get("subset") or "", ([], []))
            ids.append(r["image_id"])
            labels.append(int(r["label"]))
    return out


# ---------------------------------------------------------------------------------------------- model

def build_model(cfg: dict, num_classes: int) -> nn.Module:
    model = create_model(cfg["model"], num_classes, **cfg["model_args"])
    from .models.stats import StatFeatures

    stat_norms = {m.input_norm for m in model.modules() if isinstance(m, StatFeatures)}
    if stat_norms and stat_norms != {cfg["normalize"]}:  # the statistics must see the uint8 image again
        raise FakeprintError(f"config: normalize is {cfg['normalize']!r} but {cfg['model']}'s image statistics expect "
                             f"input_norm {stat_norms.pop()!r}: set model_args.input_norm to {cfg['normalize']!r}")
    if cfg["model"] == "ensemblecnn":
        bases = cfg["base_checkpoints"]
        if not isinstance(bases, list) or len(bases) != len(model.members):
            raise FakeprintError(f"ensemblecnn needs base_checkpoints: a list of {len(model.members)} checkpoints "
                                 "(SkipConCNN first, then ThreeCNN), e.g. --set base_checkpoints=[runs/skip,runs/three]")
        for i, path in enumerate(bases):
            meta = read_metadata(path)
            base, _ = load_checkpoint(path)
            if type(base) is not type(model.members[i]):
                raise FakeprintError(f"{path}: a {meta['model']} checkpoint cannot be ensemble member {i} "
                                     f"({type(model.members[i]).__name__} expected)")
            model.members[i].load_state_dict(base.state_dict())
        for p in model.members.parameters():
            p.requires_grad_(False)
    return model


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(cfg["momentum"]),
                           nesterov=float(cfg["momentum"]) > 0)  # torch refuses nesterov without momentum


def build_scheduler(cfg: dict, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler, per_step). ``plateau`` steps once per epoch on validation accuracy (mode max)."""
    if cfg["scheduler"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", patience=int(cfg["plateau_patience"]), factor=float(cfg["plateau_factor"])), False
    if cfg["scheduler"] == "none":
        return None, False
    total = max(1, int(cfg["epochs"]) * steps_per_epoch)
    warm = int(float(cfg["warmup_epochs"]) * steps_per_epoch)
    cosine = cfg["scheduler"] == "cosine"

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * t)) if cosine else max(0.0, 1.0 - t)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor), True


class EMA:
    """Exponential moving average of the weights and BatchNorm statistics, used for evaluation and checkpoints.

    With ``warmup`` the decay of update ``t`` (counted from 0) is ``min(decay, (1 + t) / (10 + t))``: early
    averages then cover the few steps there are instead of the random initial weights, so per-epoch
    figures of the EMA model mean something from the first epoch on (timm's ModelEmaV2 warm-up)."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.updates += 1
        ema_p = [p for p in self.model.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_p, cur_p, 1.0 - decay)
        # BatchNorm statistics are averaged like the weights they belong to: copying the current ones
        # beside averaged weights mismatches them and wrecks the EMA model early in training.
        for b_ema, b in zip(self.model.buffers(), model.buffers(), strict=True):
            if b_ema.is_floating_point():
                b_ema.lerp_(b, 1.0 - decay)
            else:
                b_ema.copy_(b)


# ----------------------------------------------------------------------------------------- epoch steps

def epoch_generator(cfg: dict, epoch: int, d: Dist, device: torch.device) -> torch.Generator:
    """Seed the global RNG (dropout etc.) and return the augmentation generator for ``epoch``: both functions of
    the seed, the epoch and the rank only, so a resumed run draws what an unbroken one would."""
    torch.manual_seed(cfg["seed"] * 7919 + epoch * 104729 + d.rank)
    return torch.Generator(device=device).manual_seed(cfg["seed"] * 1_000_003 + epoch * 9973 + d.rank)


def train_one_epoch(model, batches: DeviceBatches, opt, sched, per_step: bool, loss_fn, cfg: dict,
                    device: torch.device, amp_dtype, scaler, ema: EMA | None, gen: torch.Generator,
                    d: Dist, desc: str, on_statistics: bool = False) -> dict[str, float]:
    """One epoch. ``on_statistics``: the batches hold statistics computed once (statcache), not images."""
    model.train()
    channels_last = _channels_last(cfg, device, model)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not (cfg["progress"] and d.main),
               dynamic_ncols=True)
    micro = int(cfg["micro_batch"])
    for i, (xb, yb, *soft) in enumerate(bar):
        if on_statistics:  # the image's or its mirror's row, drawn as augment draws its flips; stat_mixup, if on
            x, perm, lam = statcache.mix_rows(statcache.training_views(xb, cfg, gen), cfg, gen)
        else:
            x, perm, lam = mix_batch(augment(to_float(xb), cfg, gen), cfg, gen)
            x = normalize(x, cfg["normalize"])
            x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        y_mix = yb[perm] if perm is not None else None  # MixUp/CutMix: the targets are mixed like the images
        target = distill_target(soft[0], perm, lam, float(cfg["distill_temperature"])) if soft else None
        opt.zero_grad(set_to_none=True)
        parts = micro_slices(len(yb), micro)
        logits_parts, loss = [], torch.zeros((), device=device)
        for k, part in enumerate(parts):
            # accumulate gradients locally; DDP reduces them once, in the backward of the last slice
            sync = contextlib.nullcontext() if k == len(parts) - 1 or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with autocast(device, amp_dtype):
                    logits = model(x[part])
                part_loss = loss_fn(logits, yb[part])
                if y_mix is not None:
                    part_loss = lam * part_loss + (1.0 - lam) * loss_fn(logits, y_mix[part])
                if target is not None:  # distillation: the teacher's (mixed) probabilities at temperature T
                    part_loss = distill_loss(logits, target[part], part_loss, float(cfg["distill_weight"]),
                                             float(cfg["distill_temperature"]))
                part_loss = part_loss * (logits.shape[0] / len(yb))  # slice means -> the batch mean
                if scaler is not None:
                    scaler.scale(part_loss).backward()
                else:
                    part_loss.backward()
            logits_parts.append(logits.detach())
            loss = loss + part_loss.detach()
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if per_step:
            sched.step()
        if ema is not None:
            ema.update(_inner(model))
        loss_sum += loss * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        if bar.disable is False and i % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    stats = _all_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]), d)
    n = max(stats[2].item(), 1.0)
    return {"train_loss": stats[0].item() / n, "train_acc": stats[1].item() / n, "images": stats[2].item()}


def micro_slices(n: int, micro: int) -> list[slice]:
    """``n`` images as near-equal consecutive slices of at most ``micro`` (0: one slice); near-equal, so that no
    slice is left with a single image for BatchNorm."""
    if micro <= 0 or micro >= n:
        return [slice(0, n)]
    k = -(-n // micro)
    bounds = [round(j * n / k) for j in range(k + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def distill_target(teacher_logits: torch.Tensor, perm: torch.Tensor | None, lam: float,
                   temperature: float) -> torch.Tensor:
    """The teacher's probabilities at temperature T, mixed with ``lam`` like the images under MixUp/CutMix."""
    target = torch.softmax(teacher_logits.float() / temperature, dim=1)
    if perm is not None:
        target = lam * target + (1.0 - lam) * target[perm]
    return target


def distill_loss(logits: torch.Tensor, target: torch.Tensor, hard_loss: torch.Tensor, weight: float,
                 temperature: float) -> torch.Tensor:
    """``(1 - weight) * hard_loss + weight * T^2 * KL(target || student_T)`` (Hinton et al. 2015), ``target``
    from ``distill_target``."""
    t = temperature
    logp = torch.log_softmax(logits.float() / t, dim=1)
    kl = torch.nn.functional.kl_div(logp, target, reduction="batchmean")
    return (1.0 - weight) * hard_loss + weight * t * t * kl


@torch.no_grad()
def teacher_logits(paths: list[str], images: torch.Tensor, device: torch.device, cfg: dict,
                   cache: Path | None = None, write_cache: bool = True, progress: bool = False) -> torch.Tensor:
    """Mean logits of the teacher checkpoints on every training image, each teacher averaged over the views its
    own training made it invariant to (``teacher_views``: the eight flips and turns of a teacher trained with
    them, the horizontal flip of one trained with that only), so that the targets do not depend on the flips
    of training and no teacher is asked about views it never saw.

    ``cache``: a safetensors file that keeps them for ``--resume`` (on 2 CPU cores three teachers take about 20
    minutes); used only where its key (the teachers' weights and views, the training images) still matches,
    written (atomically) where ``write_cache``."""
    from safetensors.torch import save

    from .inference import predict_logits
    from .models.fuse import fuse_for_inference

    teachers = []
    for p in paths:
        model, meta = load_checkpoint(p, map_location=device)
        tcfg = meta.get("config") or {}
        if not cfg["train_on_all"] and (tcfg.get("train_on_all") or tcfg.get("split_seed") != cfg["split_seed"]
                                        or tcfg.get("val_fraction") != cfg["val_fraction"]):
            raise FakeprintError(f"{p}: this teacher was not trained on the same training part (train_on_all, "
                                 "split_seed or val_fraction differ): it may have seen the student's held-out images")
        teachers.append((model, (meta.get("normalization") or {}).get("mode", "imagenet"), teacher_views(tcfg)))
    key = _teacher_key(paths, [(norm, views) for _, norm, views in teachers], images) if cache else ""
    if cache is not None and cache.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(cache), framework="pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("logits").to(device)
        except Exception:  # noqa: BLE001 - an unreadable cache is only recomputed
            pass
    total = torch.zeros(len(images), 0, device=device)
    bs = int(cfg["eval_batch_size"])
    with tqdm(total=len(teachers) * len(images), desc="teacher logits", unit="img", disable=not progress,
              dynamic_ncols=True, file=sys.stderr) as bar:
        for model, norm, views in teachers:
            fast, parts = fuse_for_inference(model), []
            if device.type == "cpu":
                fast = fast.to(memory_format=torch.channels_last)
            for start in range(0, len(images), bs):
                parts.append(predict_logits(fast, images[start : start + bs], device, batch_size=bs, norm=norm,
                                            tta=views, amp_dtype=autocast_dtype(device, cfg["amp"]),
                                            channels_last=device.type == "cpu").to(device))
                bar.update(len(parts[-1]))
            total = torch.cat(parts) if total.shape[1] == 0 else total + torch.cat(parts)
    total = total / len(paths)
    if cache is not None and write_cache:
        atomic_write(cache, save({"logits": total.float().cpu().contiguous()}, metadata={"key": key}))
    return total


def _teacher_key(paths: list[str], views: list[tuple[str, str]], images: torch.Tensor) -> str:
    import hashlib

    h = hashlib.sha256()
    for p, v in zip(paths, views, strict=True):
        h.update(hashlib.sha256(resolve_checkpoint(p).read_bytes()).digest())
        h.update(repr(v).encode())
    h.update(np.ascontiguousarray(images.cpu().numpy()).tobytes())
    return h.hexdigest()


def teacher_views(cfg: dict) -> str:
    """The test-time views a model trained with ``cfg``'s augmentation is invariant to: ``dihedral`` with vertical
    flips and quarter turns, ``flip`` with horizontal flips, else ``none``. (A model trained with horizontal
    flips only scores far lower on the rotated views: 77% against 90% on the internal split, for one.)"""
    if cfg.get("hflip") and cfg.get("vflip") and cfg.get("rot90"):
        return "dihedral"
    return "flip" if cfg.get("hflip") else "none"


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: dict, device: torch.device,
                   amp_dtype, d: Dist, num_classes: int, tta: bool | str | None = None,
                   on_statistics: bool = False) -> dict[str, Any]:
    """Loss and confusion matrix on (this rank's shard of) a split, summed across ranks; ``tta`` (default: the
    config's) is a test-time augmentation mode (see ``augment.tta_views``). ``on_statistics``: ``images`` are
    the statistics of the images and their mirrors, computed once (statcache)."""
    from .inference import predict_logits
    from .metrics import from_confusion

    tta = cfg["tta"] if tta is None else tta
    idx = torch.arange(d.rank, images.shape[0], d.world_size, device=images.device)
    if on_statistics:
        logits = statcache.logits(model, images[idx], tta).to(device)
    else:  # the one logits core (inference.predict_logits: normalise, layout, autocast, TTA views), on this shard
        logits = predict_logits(model, images[idx], device, batch_size=int(cfg["eval_batch_size"]),
                                norm=cfg["normalize"], tta=tta, amp_dtype=amp_dtype,
                                channels_last=_channels_last(cfg, device, model)).to(device)
    y = labels[idx]
    loss_sum = torch.nn.functional.cross_entropy(logits, y, reduction="sum") if len(y) else torch.zeros((), device=device)
    cm = torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes) if len(y) else \
        torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    cm = _all_sum(cm, d).view(num_classes, num_classes).cpu().numpy()
    loss = _all_sum(loss_sum.float(), d).item()
    m = from_confusion(cm)
    return {"val_loss": loss / max(int(cm.sum()), 1), "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"],
            "val_recall": m["recall"], "confusion_matrix": cm}


def _channels_last(cfg: dict, device: torch.device, model: nn.Module | None = None) -> bool:
    """``auto``: on for GPUs, and on CPUs for models that avoid a oneDNN bug (torch 2.13: the backward of a
    stride-2 1x1 convolution with fewer than 16 input channels in channels-last layout crashes)."""
    if cfg["channels_last"] != "auto":
        return cfg["channels_last"] == "on"
    if device.type == "cuda":
        return True
    return device.type == "cpu" and model is not None and channels_last_safe_on_cpu(model)


def channels_last_safe_on_cpu(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 16
                   for m in model.modules())


def _inner(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ------------------------------------------------------------------------------------------------ main

def setup_backends(cfg: dict, device: torch.device) -> None:
    """Threads, determinism, cuDNN autotuning and TF32: the backend switches set before training."""
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    if cfg["deterministic"]:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# settings a resumed run may change (they change when or how visibly it runs, not what it learns); recorded in
# its config.yaml
RESUME_SETTINGS = ("max_minutes", "progress", "threads")


def train(data_root: str | Path, cfg: dict, out: str | Path, resume: bool = False,
          resume_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg['model']`` on ``data_root`` into the run folder ``out``; returns the run's summary. With
    ``resume``, the run's own config.yaml replaces ``cfg``; ``resume_overrides`` may change RESUME_SETTINGS."""
    out = Path(out)
    d, device = setup_distributed(cfg["device"])
    if resume:
        saved = out / "config.yaml"
        if not (out / "resume.json").is_file() or not saved.is_file():
            raise FakeprintError(f"{out}: nothing to resume (no resume.json and config.yaml from an earlier run)")
        from .config import load_config

        bad = sorted(set(resume_overrides or {}) - set(RESUME_SETTINGS))
        if bad:
            raise FakeprintError(f"{', '.join(bad)} cannot be changed on --resume: a resumed run continues with the "
                                 f"config it was started with; only {', '.join(RESUME_SETTINGS)} may change")
        try:  # keys added to fakeprint since the run started take their defaults
            cfg = load_config(None, (yaml.safe_load(saved.read_text()) or {}) | (resume_overrides or {}))
        except yaml.YAMLError as e:
            raise FakeprintError(f"{saved}: not valid YAML ({e})") from None
    elif d.main and (out / "metrics.csv").exists():
        raise FakeprintError(f"{out}: a run folder with results already exists; use --resume to continue it "
                             "or choose another --out")
    setup_backends(cfg, device)
    torch.manual_seed(cfg["seed"])
    if d.main:
        out.mkdir(parents=True, exist_ok=True)

    train_split, val_split, split_desc, sel_split = prepare_data(Path(data_root), cfg, d, out)
    num_classes = NUM_CLASSES
    x_train = to_device_tensor(train_split.images, device)
    y_train = torch.from_numpy(train_split.labels).to(device)
    held_out = val_split is not None
    if not held_out and (cfg["scheduler"] == "plateau" or int(cfg["early_stop"])):
        raise FakeprintError("train_on_all leaves no held-out split to steer a plateau scheduler or early stopping: "
                             "use a fixed schedule (--set scheduler=warmup_linear early_stop=0)")
    if held_out:
        x_val = to_device_tensor(val_split.images, device)
        y_val = torch.from_numpy(val_split.labels).to(device)
    if sel_split is not None:
        x_sel = to_device_tensor(sel_split.images, device)
        y_sel = torch.from_numpy(sel_split.labels).to(device)

    model = build_model(cfg, num_classes).to(device)
    if _channels_last(cfg, device, model):
        model = model.to(memory_format=torch.channels_last)
    soft = None
    if cfg["distill_from"]:
        if not isinstance(cfg["distill_from"], list):
            raise FakeprintError("config: distill_from must be a list of teacher checkpoints")
        if d.main:
            print(f"distillation: teacher logits of {len(cfg['distill_from'])} checkpoint(s) on "
                  f"{len(train_split)} training images (each over the views it was trained on)", file=sys.stderr)
        soft = teacher_logits(cfg["distill_from"], x_train, device, cfg, cache=out / "teacher_logits.safetensors",
                              write_cache=d.main, progress=bool(cfg["progress"]) and d.main)
    # statmlp with lossless augmentation only: the statistics of every view of every image, once, not every epoch
    on_stats = statcache.enabled(cfg, model)
    train_inputs, val_inputs, sel_inputs, stats_time = x_train, None, None, 0.0
    if on_stats:
        t_stats = time.perf_counter()
        show, views, n_crops = bool(cfg["progress"]) and d.main, statcache.views(cfg), statcache.crop_count(cfg)
        train_inputs = statcache.statistics(model, x_train, cfg["normalize"], views=views, progress=show,
                                            desc="statistics (train)", crops=n_crops,
                                            crop_size=int(cfg["stat_crop_size"]), crop_seed=int(cfg["seed"]))
        if held_out:
            val_inputs = statcache.statistics(model, x_val, cfg["normalize"], views=views, progress=show,
                                              desc="statistics (val)")
        if sel_split is not None:
            sel_inputs = statcache.statistics(model, x_sel, cfg["normalize"], views=views, progress=show,
                                              desc="statistics (sel)")
        stats_time = time.perf_counter() - t_stats
        if d.main:
            what = "their mirror images" if views == "flip" else "their seven other flips and quarter turns"
            if n_crops:
                what += f", {n_crops} crops of {cfg['stat_crop_size']} pixels and their mirrors"
            print(f"statistics computed once (stat_cache): {train_inputs.shape[2]:,} for each of {len(x_train)} "
                  f"training images and {what} in {stats_time:.1f}s; each step takes the row of the view it draws",
                  file=sys.stderr)
    batches = DeviceBatches(train_inputs, y_train, int(cfg["batch_size"]), sampler=cfg["sampler"], drop_last=True,
                            seed=cfg["seed"], rank=d.rank, world_size=d.world_size, targets=soft)
    if len(batches) == 0:
        raise FakeprintError(f"batch_size {cfg['batch_size']} is larger than the training set "
                             f"({len(train_split)} images over {d.world_size} process(es))")
    opt = build_optimizer(cfg, model)
    sched, per_step = build_scheduler(cfg, opt, len(batches))
    loss_fn = make_loss(cfg, y_train, num_classes, device)
    amp_dtype = autocast_dtype(device, cfg["amp"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    ema = EMA(model, float(cfg["ema"]), bool(cfg["ema_warmup"])) if cfg["ema"] else None

    start_epoch, best_acc, bad_epochs, history, time_before, resumes = 0, -1.0, 0, [], 0.0, 0
    if resume:
        weights, state = load_resume_point(out)
        model.load_state_dict(weights.state_dict())
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.model.load_state_dict(state["ema"])
            ema.updates = int(state.get("ema_updates", 0))
        start_epoch, best_acc, bad_epochs = state["epoch"] + 1, state["best_acc"], state["bad_epochs"]
        time_before = float(state.get("train_time_s", 0.0))
        resumes = int(state.get("resumes", 0)) + 1
        history = _read_history(out / "metrics.csv", start_epoch)

    train_model: nn.Module = statcache.OnStatistics(model) if on_stats else model
    if d.world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        train_model = torch.compile(train_model)

    meta_base = {
        "model": cfg["model"], "model_args": cfg["model_args"], "num_classes": num_classes,
        "classes": [str(c) for c in range(num_classes)], "image_size": 100,
        "normalization": {"mode": cfg["normalize"], "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "config": cfg, "tta": cfg["tta"], "commit": git_commit(), "versions": versions(), "split": split_desc,
        "parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True),
    }
    if d.main:
        atomic_write(out / "config.yaml", yaml.safe_dump(cfg, sort_keys=False).encode())
        run_info = {"data": str(Path(data_root).resolve()), "split": split_desc, "train_images": len(train_split),
                    "val_images": len(val_split) if held_out else 0, "device": _device_name(device), "world_size": d.world_size,
                    "resumes": resumes, "stat_cache": on_stats, "statistics_time_s": stats_time,
                    "commit": meta_base["commit"], "versions": meta_base["versions"], "argv": sys.argv,
                    "parameters": meta_base["parameters"], "trainable_parameters": meta_base["trainable_parameters"]}
        atomic_write(out / "run.json", (json.dumps(run_info, indent=2) + "\n").encode())
        print(f"training {cfg['model']} ({meta_base['trainable_parameters']:,} trainable parameters) on "
              f"{len(train_split)} images, validating on {len(val_split) if held_out else 0} ({split_desc}); device "
              f"{run_info['device']} x{d.world_size}; run folder {out}", file=sys.stderr)

    eval_model = lambda: ema.model if ema is not None else model  # noqa: E731
    train_start = time.perf_counter()
    epoch = start_epoch - 1
    stop_reason = "epochs"
    limit_s = float(cfg["max_minutes"]) * 60.0
    for epoch in range(start_epoch, int(cfg["epochs"])):
        batches.set_epoch(epoch)
        gen = epoch_generator(cfg, epoch, d, device)
        t0 = time.perf_counter()
        tr = train_one_epoch(train_model, batches, opt, sched, per_step, loss_fn, cfg, device, amp_dtype, scaler,
                             ema, gen, d, desc=f"epoch {epoch + 1}/{cfg['epochs']}", on_statistics=on_stats)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t0
        _broadcast_buffers(eval_model(), d)  # every rank evaluates with rank 0's BatchNorm statistics
        ev = evaluate_model(eval_model(), val_inputs if on_stats else x_val, y_val, cfg, device, amp_dtype, d,
                            num_classes, on_statistics=on_stats) if held_out else None
        sel_acc = evaluate_model(eval_model(), sel_inputs if on_stats else x_sel, y_sel, cfg, device, amp_dtype, d,
                                 num_classes, on_statistics=on_stats)["val_acc"] if sel_split is not None else None
        steer = sel_acc if sel_acc is not None else ev["val_acc"] if ev else None  # what the schedule may look at
        epoch_time = time.perf_counter() - t0
        lr = opt.param_groups[0]["lr"]
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": tr["train_loss"], "train_acc": tr["train_acc"],
               "val_loss": ev["val_loss"] if ev else None, "val_acc": ev["val_acc"] if ev else None,
               "val_macro_f1": ev["val_macro_f1"] if ev else None,
               "val_recall_weakest": min(ev["val_recall"]) if ev else None, "selection_acc": sel_acc,
               "epoch_time_s": epoch_time,
               "train_images_per_s": tr["images"] / max(train_time, 1e-9)}
        history.append(row)
        if sched is not None and not per_step:
            sched.step(steer)
        improved = held_out and steer > best_acc
        if improved:
            best_acc, bad_epochs = steer, 0
        else:
            bad_epochs += 1
        stop = held_out and bool(cfg["early_stop"]) and bad_epochs >= int(cfg["early_stop"])
        spent = time_before + time.perf_counter() - train_start
        out_of_time = limit_s > 0 and spent >= limit_s and epoch + 1 < int(cfg["epochs"])
        if d.world_size > 1 and limit_s > 0:  # every rank stops at the same epoch (each has its own clock)
            out_of_time = _all_sum(torch.tensor(float(out_of_time), device=device), d).item() > 0
        if d.main:
            metrics = ({k: row[k] for k in ("val_acc", "val_loss", "val_macro_f1")} | {"epoch": epoch + 1}) if ev else {}
            last_meta = meta_base | {"epoch": epoch + 1, "metrics": metrics}
            if ev:
                last_meta["held_out"] = held_out_figure(ev, split_desc, cfg["tta"], epoch + 1, "last epoch")
            if improved:
                how = ("best epoch, chosen on the separate selection split" if sel_split is not None
                       else "best epoch, chosen on this same split (optimistic)")
                best_meta = last_meta | {"held_out": held_out_figure(ev, split_desc, cfg["tta"], epoch + 1, how)}
                save_checkpoint(out / "best", eval_model(), best_meta)
            save_checkpoint(out / "last", eval_model(), last_meta)
            _write_history(out / "metrics.csv", history)  # before the resume point moves (see save_resume_point)
            save_resume_point(out, epoch, model, meta_base, {
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                "ema": ema.model.state_dict() if ema is not None else None,
                "ema_updates": ema.updates if ema is not None else 0, "epoch": epoch,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "best_acc": best_acc, "bad_epochs": bad_epochs, "train_time_s": spent,
                "resumes": resumes})
            val = f"val {row['val_acc']:.4f}  f1 {row['val_macro_f1']:.4f}" if ev else "no held-out split"
            print(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  train {row['train_acc']:.4f} (augmented)  "
                  f"{val}  lr {lr:.2e}  {epoch_time:.1f}s{'  *' if improved else ''}", file=sys.stderr)
        _barrier(d)
        if stop or out_of_time:
            stop_reason = "early stop" if stop else "time limit"
            if d.main:
                print(f"early stop: no better validation accuracy for {bad_epochs} epochs" if stop else
                      f"time limit: {spent / 60:.1f} of max_minutes {cfg['max_minutes']} spent", file=sys.stderr)
            break
    train_time = time_before + time.perf_counter() - train_start + stats_time

    summary: dict[str, Any] = {"run": str(out), "epochs_run": epoch + 1, "train_time_s": train_time,
                               "stopped_by": stop_reason, "split": split_desc,
                               "selection": "last epoch" if held_out else None}
    if held_out and sel_split is None:
        summary["best_val_acc"] = best_acc
        summary["best_val_acc_note"] = "best epoch chosen on this same split: optimistic, not a held-out figure"
    elif held_out:
        summary["best_selection_acc"] = best_acc
        summary["selection_note"] = ("the schedule, early stopping and best.json were steered by the selection split "
                                     "(part of the training part), never by the reported split")
    if d.main and (out / "last.safetensors").exists():
        plot_training_curves(history, out / "curves.png", cfg["model"])
        if held_out:  # the report: the last epoch's weights, fp32, with the config's test-time augmentation
            last, meta = load_checkpoint(out / "last", map_location=device)
            ev = evaluate_model(last, x_val, y_val, cfg, device, None, Dist(), num_classes)
            y_true, y_pred = _cm_to_pairs(ev["confusion_matrix"])
            m = write_report(out, y_true, y_pred,
                             title=f"{cfg['model']} (last epoch, {meta['epoch']}; TTA {cfg['tta']}) on the {split_desc}",
                             extra={"split": split_desc, "epoch": meta["epoch"], "selection": "last epoch",
                                    "tta": cfg["tta"], "train_time_s": train_time})
            print("\n" + confusion_text(m["confusion_matrix"]) + "\n\n" + report_text(y_true, y_pred), file=sys.stderr)
            summary |= {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
            if len(val_split) >= 20:  # temperature and uncertain-flag threshold of the last checkpoint
                from .calibration import calibrate
                from .inference import predict_logits

                logits = predict_logits(last, val_split.images, device, batch_size=int(cfg["eval_batch_size"]),
                                        norm=cfg["normalize"], tta=cfg["tta"]).numpy()
                cal = calibrate(logits, val_split.labels) | {"split": split_desc, "tta": cfg["tta"]}
                update_metadata(out / "last", {"calibration": cal})
                summary["calibration"] = cal
        atomic_write(out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    _barrier(d)
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return summary


def save_resume_point(out: Path, epoch: int, model: nn.Module, meta: dict, state: dict[str, Any]) -> None:
    """Everything needed to continue after ``epoch``, made current by one atomic rename.

    Weights (safetensors) and optimizer/scheduler state (torch, read back with ``weights_only=True``) go
    into a fresh folder ``.resume-<epoch>``; then ``resume.json`` is atomically pointed at it and older
    folders are removed. A kill at any moment leaves ``resume.json`` naming a complete folder.
    """
    folder = out / f".resume-{epoch + 1:04d}"
    folder.mkdir(exist_ok=True)
    save_checkpoint(folder / "model", model, meta | {"epoch": epoch + 1})
    save_resume_state(folder / "state.pt", state)
    atomic_write(out / "resume.json", (json.dumps({"epoch": epoch + 1, "folder": folder.name}) + "\n").encode())
    for old in out.glob(".resume-*"):
        if old.name != folder.name:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def load_resume_point(out: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        pointer = json.loads((out / "resume.json").read_text())
        folder = out / str(pointer["folder"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FakeprintError(f"{out / 'resume.json'}: unreadable resume pointer ({e})") from None
    if folder.parent != out or not folder.name.startswith(".resume-"):
        raise FakeprintError(f"{out / 'resume.json'}: resume folder {folder.name!r} is not inside the run")
    weights, _ = load_checkpoint(folder / "model.safetensors")
    return weights, load_resume_state(folder / "state.pt")


def held_out_figure(ev: dict[str, Any], split: str, tta: str, epoch: int, selection: str) -> dict[str, Any]:
    """What a checkpoint may claim: its accuracy on images it was not trained on, and how it was measured."""
    return {"accuracy": ev["val_acc"], "macro_f1": ev["val_macro_f1"],
            "recall": [float(r) for r in ev["val_recall"]], "n": int(np.asarray(ev["confusion_matrix"]).sum()),
            "split": split, "epoch": epoch, "selection": selection, "tta": tta,
            "how": "this model, on images it never trained on"}


def _cm_to_pairs(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand a confusion matrix into (y_true, y_pred) pairs (for scikit-learn's report)."""
    k = cm.shape[0]
    t = np.repeat(np.repeat(np.arange(k), k), cm.reshape(-1))
    p = np.repeat(np.tile(np.arange(k), k), cm.reshape(-1))
    return t, p


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _write_history(path: Path, history: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in history:  # a missing figure (no held-out split) is an empty field
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else "" if v is None else v) for k, v in row.items()})
    atomic_write(path, buf.getvalue().encode())


def _read_history(path: Path, upto_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [{k: (int(v) if k == "epoch" else float(v) if v != "" else None) for k, v in r.items()}
                for r in csv.DictReader(f)]
    return [r for r in rows if r["epoch"] <= upto_epoch]


def plot_training_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and accuracy per epoch of one run (training, and the held-out split where there is one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=110)
    a.plot(ep, [r["train_loss"] for r in history], label="train")
    if history[0]["val_loss"] is not None:
        a.plot(ep, [r["val_loss"] for r in history], label="held out")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(ep, [r["train_acc"] for r in history], label="train (augmented batches)")
    if history[0]["val_acc"] is not None:
        b.plot(ep, [r["val_acc"] for r in history], label="held out")
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
