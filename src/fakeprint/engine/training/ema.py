"""Exponential moving average of a model's weights and BatchNorm statistics.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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
