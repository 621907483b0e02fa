"""Preprocessing shared by every way in: uint8 NHWC images -> float NCHW in [0, 1] -> normalised, and the
test-time views. Training (``augment``), inference (``inference.predict_logits``), Grad-CAM, ONNX export
and the service all take these from here, so that they cannot drift apart.
"""

from __future__ import annotations

import torch

from fakeprint.core.errors import FakeprintError

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


TTA_MODES = ("none", "flip", "dihedral")


def tta_mode(value: object) -> str:
    """Normalise a ``tta`` setting: ``False``/``"none"``, ``True``/``"flip"`` (the image and its horizontal
    flip), ``"dihedral"`` (all eight flips and quarter turns)."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "flip"
    if isinstance(value, str) and value in TTA_MODES:
        return value

    raise FakeprintError(f"tta must be one of none, flip, dihedral (or true/false), got {value!r}")


def tta_views(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The views of an N x C x H x W batch that test-time augmentation averages over."""
    mode = tta_mode(mode)
    if mode == "none":
        return [x]
    if mode == "flip":
        return [x, x.flip(3)]
    views = [x.rot90(k, (2, 3)) for k in range(4)]
    return views + [v.flip(3) for v in views]
