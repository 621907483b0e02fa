"""Knowledge distillation: the teachers' soft targets and the student's loss (Hinton et al. 2015).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write
from fakeprint.engine.runtime import autocast_dtype, predict_logits
from fakeprint.models.checkpoint import (
    load_checkpoint,
    resolve_checkpoint,
)
from fakeprint.models.fuse import fuse_for_inference


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
