"""Batched augmentation on the device: uint8 NHWC batches in, normalised float NCHW batches out.

Every sample gets its own random parameters, drawn from a ``torch.Generator`` on the batch's device, and
the whole batch is transformed with a handful of tensor operations (no per-sample Python).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def draw_lossless(n: int, cfg: dict, g: torch.Generator, device
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The lossless part of ``augment``'s draw for ``n`` samples, its first draws from ``g``: which are mirrored
    (``hflip``), which flipped upside down (``vflip``), and how many quarter turns each gets (``rot90``: 0-3),
    None for a switch that is off. ``statcache`` makes the same draw to pick precomputed statistics, so both paths
    keep the same random stream."""
    hflip = torch.rand(n, generator=g, device=device) < 0.5 if cfg.get("hflip") else None
    vflip = torch.rand(n, generator=g, device=device) < 0.5 if cfg.get("vflip") else None
    k90 = torch.randint(0, 4, (n,), generator=g, device=device) if cfg.get("rot90") else None
    return hflip, vflip, k90


def augment(x: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """Augment a float N x 3 x H x W batch in [0, 1] with the config's switches:
    ``hflip``, ``vflip``, ``rot90``, ``rotation`` (degrees, ``rotation_interp``; ``rotation_prob``: the share of
    samples rotated, the others get angle 0), ``translate`` (pixels),
    ``color_jitter`` (brightness, contrast, saturation strength).

    When the batch goes through the affine resampling (rotation or translation) anyway, the flips are
    folded into each sample's sampling matrix instead of being applied as separate passes."""
    n, dev = x.shape[0], x.device
    hflip, vflip, k90 = draw_lossless(n, cfg, g, dev)
    if k90 is not None:
        k90 = k90.view(n, 1, 1, 1)
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
        p_rot = float(cfg.get("rotation_prob", 1.0))
        if p_rot < 1.0:
            angle = angle * (torch.rand(n, generator=g, device=dev) < p_rot).to(angle.dtype)
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


def mix_batch(x: torch.Tensor, cfg: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """MixUp or CutMix on a whole batch (one coefficient per batch, as in the papers' reference code).

    With probability ``mix_prob`` the batch is mixed with a shuffled copy of itself: CutMix
    (``cutmix`` = Beta alpha > 0) pastes a random box, MixUp (``mixup`` = Beta alpha > 0) blends; when both
    are on, each mixed batch picks one at random. Returns ``(x, perm, lam)``: the targets are
    ``lam * y + (1 - lam) * y[perm]``; ``perm`` is None when the batch is left alone (``lam`` 1)."""
    mixup, cutmix = float(cfg.get("mixup") or 0.0), float(cfg.get("cutmix") or 0.0)
    if mixup <= 0 and cutmix <= 0:
        return x, None, 1.0
    dev = x.device
    u = torch.rand(3, generator=g, device=dev).tolist()
    if u[0] >= float(cfg.get("mix_prob", 1.0)):
        return x, None, 1.0
    use_cutmix = cutmix > 0 and (mixup <= 0 or u[1] < 0.5)
    alpha = cutmix if use_cutmix else mixup
    # Beta(alpha, alpha) from two Gamma draws with the batch's generator (reproducible, resumable)
    ga = torch._standard_gamma(torch.full((2,), alpha, device=dev), generator=g)
    lam = float(ga[0] / ga.sum())
    perm = torch.randperm(x.shape[0], generator=g, device=dev)
    if not use_cutmix:
        return x * lam + x[perm] * (1.0 - lam), perm, lam
    h, w = x.shape[2], x.shape[3]
    rh, rw = int(h * math.sqrt(1.0 - lam)), int(w * math.sqrt(1.0 - lam))
    c = torch.rand(2, generator=g, device=dev).tolist()
    cy, cx = int(c[0] * h), int(c[1] * w)
    y0, y1, x0, x1 = max(cy - rh // 2, 0), min(cy + rh // 2, h), max(cx - rw // 2, 0), min(cx + rw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    return x, perm, lam
