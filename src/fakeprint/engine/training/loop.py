"""One training epoch and one evaluation pass, each a function of its inputs and the epoch's generator:
randomness is a pure function of (seed, epoch, rank), so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fakeprint.core.metrics import from_confusion
from fakeprint.data.loader import DeviceBatches
from fakeprint.engine.runtime import autocast, predict_logits
from fakeprint.engine.training import statcache
from fakeprint.engine.training.distill import distill_loss, distill_target
from fakeprint.engine.training.ema import EMA
from fakeprint.engine.training.setup import Dist, all_sum, unwrap, use_channels_last
from fakeprint.features.augment import augment, mix_batch
from fakeprint.features.file_augment import file_augment
from fakeprint.features.preprocess import normalize, to_float


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
    to_channels_last = use_channels_last(cfg, device, model)
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
            x, perm, lam = mix_batch(augment(to_float(file_augment(xb, cfg, gen)), cfg, gen), cfg, gen)
            x = normalize(x, cfg["normalize"])
            x = x.contiguous(memory_format=torch.channels_last if to_channels_last else torch.contiguous_format)
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
            ema.update(unwrap(model))
        loss_sum += loss * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        if bar.disable is False and i % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    stats = all_sum(torch.stack([loss_sum.float(), correct.float(), torch.tensor(float(seen), device=device)]), d)
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


@torch.no_grad()
def evaluate_model(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: dict, device: torch.device,
                   amp_dtype, d: Dist, num_classes: int, tta: bool | str | None = None,
                   on_statistics: bool = False) -> dict[str, Any]:
    """Loss and confusion matrix on (this rank's shard of) a split, summed across ranks; ``tta`` (default: the
    config's) is a test-time augmentation mode (see ``augment.tta_views``). ``on_statistics``: ``images`` are
    the statistics of the images and their mirrors, computed once (statcache)."""

    tta = cfg["tta"] if tta is None else tta
    idx = torch.arange(d.rank, images.shape[0], d.world_size, device=images.device)
    if on_statistics:
        logits = statcache.logits(model, images[idx], tta).to(device)
    else:  # the one logits core (inference.predict_logits: normalise, layout, autocast, TTA views), on this shard
        logits = predict_logits(model, images[idx], device, batch_size=int(cfg["eval_batch_size"]),
                                norm=cfg["normalize"], tta=tta, amp_dtype=amp_dtype,
                                channels_last=use_channels_last(cfg, device, model)).to(device)
    y = labels[idx]
    loss_sum = torch.nn.functional.cross_entropy(logits, y, reduction="sum") if len(y) else torch.zeros((), device=device)
    cm = torch.bincount(y * num_classes + logits.argmax(1), minlength=num_classes * num_classes) if len(y) else \
        torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    cm = all_sum(cm, d).view(num_classes, num_classes).cpu().numpy()
    loss = all_sum(loss_sum.float(), d).item()
    m = from_confusion(cm)
    return {"val_loss": loss / max(int(cm.sum()), 1), "val_acc": m["accuracy"], "val_macro_f1": m["macro_f1"],
            "val_recall": m["recall"], "confusion_matrix": cm}


def cm_to_pairs(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Expand a confusion matrix into (y_true, y_pred) pairs (for scikit-learn's report)."""
    k = cm.shape[0]
    t = np.repeat(np.repeat(np.arange(k), k), cm.reshape(-1))
    p = np.repeat(np.tile(np.arange(k), k), cm.reshape(-1))
    return t, p
