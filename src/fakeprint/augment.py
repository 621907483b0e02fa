"""Batched augmentation on the device: uint8 NHWC batches in, normalised float NCHW batches out.

Every sample gets its own random parameters, drawn from a ``torch.Generator`` on the batch's device, and
the whole batch is transformed with a handful of tensor operations (no per-sample Python).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1] (a channels-last view, no copy of layout)."""
    return x.permute(0, 3, 1, 2).float().div_(255.0)


_CONSTANTS: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as 1 x 3 x 1 x 1 tensors, made once per device and dtype: building them per
    batch would be a blocking host-to-device copy on every step on a GPU."""
    key = (device, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = (torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1),
                           torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1))
    return _CONSTANTS[key]


def normalize(x: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    if mode == "none":
        return x
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def augment(x: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """Augment a float N x 3 x H x W batch in [0, 1] with the config's switches:
    ``hflip``, ``vflip``, ``rot90``, ``rotation`` (degrees, ``rotation_interp``), ``translate`` (pixels),
    ``color_jitter`` (brightness, contrast, saturation strength).

    When the batch goes through the affine resampling (rotation or translation) anyway, the flips are
    folded into each sample's sampling matrix instead of being applied as separate passes."""
    n, dev = x.shape[0], x.device
    hflip = torch.rand(n, generator=g, device=dev) < 0.5 if cfg.get("hflip") else None
    vflip = torch.rand(n, generator=g, device=dev) < 0.5 if cfg.get("vflip") else None
    k90 = torch.randint(0, 4, (n,), generator=g, device=dev).view(n, 1, 1, 1) if cfg.get("rot90") else None
    rot = float(cfg.get("rotation") or 0.0)
    shift = int(cfg.get("translate") or 0)
    affine = rot > 0 or shift > 0
    if not affine or k90 is not None:  # flips as passes of their own (rot90 does not commute with them)
        if hflip is not None:
            x = torch.where(hflip.view(n, 1, 1, 1), x.flip(3), x)
        if vflip is not None:
            x = torch.where(vflip.view(n, 1, 1, 1), x.flip(2), x)
        hflip = vflip = None
    if k90 is not None:
        x = torch.where(k90 == 1, x.rot90(1, (2, 3)), x)  # square images: rot90 keeps the shape
        x = torch.where(k90 == 2, x.rot90(2, (2, 3)), x)
        x = torch.where(k90 == 3, x.rot90(3, (2, 3)), x)
    if affine:
        angle = _uniform(n, -rot, rot, g, dev) * (math.pi / 180.0)
        cos, sin = angle.cos(), angle.sin()
        tx = ty = torch.zeros(n, device=dev)
        if shift > 0:
            h, w = x.shape[2], x.shape[3]
            d = torch.randint(-shift, shift + 1, (n, 2), generator=g, device=dev).float()
            tx, ty = d[:, 0] * 2.0 / w, d[:, 1] * 2.0 / h
        # output pixel p samples the input at theta @ (p, 1); a flip applied before is a sign on a row of theta
        theta = torch.stack([cos, -sin, tx, sin, cos, ty], dim=1).view(n, 2, 3)
        if hflip is not None or vflip is not None:
            sx = 1.0 - 2.0 * hflip.float() if hflip is not None else torch.ones(n, device=dev)
            sy = 1.0 - 2.0 * vflip.float() if vflip is not None else torch.ones(n, device=dev)
            theta = theta * torch.stack([sx, sy], dim=1).view(n, 2, 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid.to(x.dtype), mode=cfg.get("rotation_interp", "nearest"),
                          padding_mode="zeros", align_corners=False)
    s = float(cfg.get("color_jitter") or 0.0)
    if s > 0:
        b = _uniform(n, 1 - s, 1 + s, g, dev).view(n, 1, 1, 1)
        c = _uniform(n, 1 - s, 1 + s, g, dev).view(n, 1, 1, 1)
        sat = _uniform(n, 1 - s, 1 + s, g, dev).view(n, 1, 1, 1)
        x = x * b
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = ((x - gray) * sat + gray).clamp_(0, 1)
    return x
