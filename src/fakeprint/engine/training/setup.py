"""Training set-up shared by ``train`` and the recipe study: processes (DDP), backends, model, optimiser,
scheduler, memory layout.

DDP is switched on by the ``torchrun`` environment (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on GPU; rank 0 alone
writes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fakeprint.core.errors import FakeprintError
from fakeprint.engine.runtime import autocast_dtype, pick_device
from fakeprint.engine.training.ema import EMA
from fakeprint.engine.training.losses import make_loss
from fakeprint.features.statistics import StatFeatures
from fakeprint.models import create_model
from fakeprint.models.checkpoint import (
    load_checkpoint,
    read_metadata,
)
from fakeprint.models.fuse import relu_after_pool


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


def all_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(model: nn.Module, d: Dist) -> None:
    """Make every rank's buffers (BatchNorm statistics) rank 0's: each rank updates its own in training."""
    if d.world_size > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


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


def build_model(cfg: dict, num_classes: int) -> nn.Module:
    model = create_model(cfg["model"], num_classes, **cfg["model_args"])

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


def use_channels_last(cfg: dict, device: torch.device, model: nn.Module | None = None) -> bool:
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


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


@dataclass
class Parts:
    """What one training step needs besides the data: the one set-up ``train`` and the recipe study share."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    per_step: bool
    loss_fn: Any
    amp_dtype: torch.dtype | None
    scaler: Any
    ema: EMA | None


def place_model(cfg: dict, device: torch.device, num_classes: int) -> nn.Module:
    """The config's model on ``device``, laid out for training there (``training_layout``)."""
    return training_layout(cfg, device, build_model(cfg, num_classes).to(device))


def training_layout(cfg: dict, device: torch.device, model: nn.Module) -> nn.Module:
    """``model`` in the memory layout that pays on ``device``, with its ReLUs before 2D max-pools moved after them
    (``models.fuse.relu_after_pool``: the same outputs, gradients and state dict, a quarter of the ReLU work)."""
    relu_after_pool(model)
    if use_channels_last(cfg, device, model):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_parts(cfg: dict, model: nn.Module, device: torch.device, labels: torch.Tensor, num_classes: int,
                steps_per_epoch: int) -> Parts:
    """Optimiser, scheduler, loss, autocast and EMA for ``model`` (from ``place_model``)."""
    opt = build_optimizer(cfg, model)
    sched, per_step = build_scheduler(cfg, opt, steps_per_epoch)
    amp_dtype = autocast_dtype(device, cfg["amp"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    ema = EMA(model, float(cfg["ema"]), bool(cfg["ema_warmup"])) if cfg["ema"] else None
    return Parts(model, opt, sched, per_step, make_loss(cfg, labels, num_classes, device), amp_dtype, scaler, ema)
