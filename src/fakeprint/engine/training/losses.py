"""Losses: cross-entropy (with label smoothing), class-weighted cross-entropy and focal loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fakeprint.core.errors import FakeprintError


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """``-(1 - p_y)^gamma log p_y`` (Lin et al. 2017), averaged; with class weights ``w`` the weighted mean
    ``sum(w_y l) / sum(w_y)``, as ``F.cross_entropy(weight=w)`` does, so ``gamma=0`` is (weighted)
    cross-entropy either way."""
    logp = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - logp.exp()) ** gamma) * logp
    if weight is not None:
        w = weight[target]
        return (loss * w).sum() / w.sum()
    return loss.mean()


def make_loss(cfg: dict, labels: torch.Tensor, num_classes: int, device: torch.device):
    """The training loss named by ``cfg['loss']``: ``ce``, ``weighted_ce`` or ``focal``."""
    ls = float(cfg["label_smoothing"])
    weight = None
    if cfg["loss"] == "weighted_ce" or (cfg["loss"] == "focal" and cfg.get("class_weights")):
        if cfg.get("class_weights"):
            weight = torch.tensor(cfg["class_weights"], dtype=torch.float32, device=device)
            if weight.numel() != num_classes:
                raise FakeprintError(f"config: class_weights needs {num_classes} values, got {weight.numel()}")
        else:
            counts = torch.bincount(labels.cpu(), minlength=num_classes).float().clamp_min(1)
            weight = (counts.sum() / (num_classes * counts)).to(device)
    if cfg["loss"] == "focal":
        gamma = float(cfg["focal_gamma"])
        return lambda logits, y: focal_loss(logits, y, gamma, weight)
    return lambda logits, y: F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=ls)
