"""Batched inference from uint8 images to class probabilities (optionally with flip test-time augmentation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fakeprint.core.errors import FakeprintError
from fakeprint.data.loader import tensor_view
from fakeprint.features.preprocess import normalize, to_float, tta_mode, tta_views
from fakeprint.models.memory import cpu_micro_batch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise FakeprintError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FakeprintError("device 'cuda' asked for, but no CUDA GPU is available")
    return dev


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp``. ``auto``: bf16 on GPUs that support it and on CPUs with native bf16
    instructions (AVX512-BF16 or AMX), where it trains 1.8x faster; otherwise none (fp32)."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16  # bf16, or "on"


def cpu_has_native_bf16() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray | torch.Tensor, device: torch.device,
                   batch_size: int = 256, norm: str = "imagenet", tta: bool | str = False,
                   amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                   micro_batch: int | None = None) -> torch.Tensor:
    """Logits (float32, on CPU) for N x H x W x 3 uint8 images. ``tta`` (a mode of ``augment.tta_views``:
    none/False, flip/True, dihedral) averages the logits of the views. ``batch_size`` images are moved to the
    device and augmented at a time; the network sees them ``micro_batch`` at a time (None: ``cpu_micro_batch``
    on the CPU, all at once on a GPU; 0: all at once). The slicing does not change the outputs. A model with
    a ``forward_flip_tta`` method (models.hybrid) computes flip TTA itself (the same logits up to rounding)."""
    was_training = [m for m in model.modules() if m.training]
    if was_training:  # eval() walks every module (about 0.7 ms for a hybrid): a per-call cost served requests feel
        model.eval()
    out = []
    n = images.shape[0]
    if micro_batch is None:
        h, w, c = images.shape[1:]
        micro_batch = cpu_micro_batch(model, (c, h, w)) if device.type == "cpu" and n else 0
    flip_fast = tta_mode(tta) == "flip" and hasattr(model, "forward_flip_tta")
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        if isinstance(chunk, np.ndarray):
            chunk = tensor_view(chunk)
        x = normalize(to_float(chunk.to(device, non_blocking=True)), norm)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            if flip_fast:  # the model averages the image and its mirror itself, sharing work between them
                logits = _forward(model.forward_flip_tta, x, micro_batch)
            else:
                views = tta_views(x, tta)
                logits = sum(_forward(model, v, micro_batch) for v in views) / len(views)
        out.append(logits.cpu())
    for m in was_training:
        m.train()
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def _forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, micro_batch: int) -> torch.Tensor:
    if micro_batch <= 0 or micro_batch >= len(x):
        return model(x).float()
    return torch.cat([model(part).float() for part in x.split(micro_batch)])


def predict_probs(model: nn.Module, images, device: torch.device, **kw) -> np.ndarray:
    return predict_logits(model, images, device, **kw).softmax(dim=1).numpy()
