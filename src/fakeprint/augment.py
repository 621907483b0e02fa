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


def normalize(x: torch.Tensor, mode: str = "imagenet") -> torch.Tensor:
    if mode == "none":
        return x
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def augment(x: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """Augment a float N x 3 x H x W batch in [0, 1] with the config's switches:
    ``hflip``, ``vflip``, ``rot90``, ``rotation`` (degrees, ``rotation_interp``), ``translate`` (pixels),
    ``color_jitter`` (brightness, contrast, saturation strength)."""
    n, dev = x.shape[0], x.device
    if cfg.get("hflip"):
        flip = torch.rand(n, generator=g, device=dev) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if cfg.get("vflip"):
        flip = torch.rand(n, generator=g, device=dev) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(2), x)
    if cfg.get("rot90"):
        k = torch.randint(0, 4, (n,), generator=g, device=dev).view(n, 1, 1, 1)
        x = torch.where(k == 1, x.rot90(1, (2, 3)), x)  # square images: rot90 keeps the shape
        x = torch.where(k == 2, x.rot90(2, (2, 3)), x)
        x = torch.where(k == 3, x.rot90(3, (2, 3)), x)
    rot = float(cfg.get("rotation") or 0.0)
    shift = int(cfg.get("translate") or 0)
    if rot > 0 or shift > 0:
        angle = _uniform(n, -rot, rot, g, dev) * (math.pi / 180.0)
        cos, sin = angle.cos(), angle.sin()
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        if shift > 0:
            h, w = x.shape[2], x.shape[3]
            d = torch.randint(-shift, shift + 1, (n, 2), generator=g, device=dev).float()
            theta[:, 0, 2] = d[:, 0] * 2.0 / w
            theta[:, 1, 2] = d[:, 1] * 2.0 / h
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
