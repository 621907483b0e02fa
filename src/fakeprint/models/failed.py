"""The report's unsuccessful models, re-built as baselines for ``fakeprint study failed``.

The report describes the failed models only in words; these are reconstructions, each documented below:

- ``effnet_se``: an EfficientNet-like net (MBConv blocks with squeeze-excitation) whose three stages are
  summarised by a multi-scale attention head (the report: under 90%).
- ``twoconv``: a two-convolution CNN searched over ``(out1, out2, kernel)`` (the report's best: 64, 128, 5
  at 76%).
- ``fiveconv``: a five-convolution CNN with a large fully connected head (the report: it overfits).

The narrow stand-ins that the studies train at ``--scale small`` are width arguments of their own families
(``threecnn_narrow`` in ``threecnn.py``, ``skipconcnn_narrow`` in ``skipconcnn.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from fakeprint.models.layers import conv_bn_relu
from fakeprint.models.registry import register_model

# --------------------------------------------------------------------------------------- EfficientNet-like


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool -> reduce -> SiLU -> expand -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, reduced, 1),
            nn.SiLU(inplace=True),
            nn.Conv2d(reduced, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk (stride) -> squeeze-excitation -> 1x1 project;
    identity shortcut when the shape is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 4, kernel: int = 3,
                 se_ratio: float = 0.25):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU(inplace=True)]
        layers += [
            nn.Conv2d(mid, mid, kernel, stride=stride, padding=kernel // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.SiLU(inplace=True),
            SqueezeExcite(mid, max(1, int(cin * se_ratio))),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class EffNetSE(nn.Module):
    """Stem Conv3x3(3->w)-BN-SiLU at full resolution; three stages of MBConv blocks (the first of each with
    stride 2: 100 -> 50 -> 25 -> 13) with widths 2w, 4w, 8w.

    Multi-scale attention: each stage's output is average-pooled and projected to ``dim`` values; a
    scoring layer gives one score per scale, softmax over the three scales weights them, and the weighted
    sum feeds the classifier, so the net learns which resolution carries the evidence.
    """

    def __init__(self, num_classes: int = 5, width: int = 16, depths: tuple[int, ...] = (1, 2, 2),
                 expand: int = 4, dim: int = 128, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.SiLU(inplace=True))
        cin = width
        self.stages = nn.ModuleList()
        self.project = nn.ModuleList()
        for i, depth in enumerate(depths):
            cout = width * 2 ** (i + 1)
            blocks = [MBConv(cin, cout, stride=2, expand=expand)]
            blocks += [MBConv(cout, cout, expand=expand) for _ in range(depth - 1)]
            self.stages.append(nn.Sequential(*blocks))
            self.project.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cout, dim),
                                              nn.SiLU(inplace=True)))
            cin = cout
        self.score = nn.Linear(dim, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        scales = []
        for stage, project in zip(self.stages, self.project, strict=True):
            x = stage(x)
            scales.append(project(x))
        s = torch.stack(scales, dim=1)                      # N x scales x dim
        attn = self.score(s).softmax(dim=1)                 # N x scales x 1
        return self.head((attn * s).sum(dim=1))


@register_model
def effnet_se(num_classes: int = 5, **kwargs) -> nn.Module:
    """Failed in the report: EfficientNet-like, MBConv + squeeze-excitation, multi-scale attention."""
    return EffNetSE(num_classes, **kwargs)


# ------------------------------------------------------------------------------------------- TwoConv


class TwoConv(nn.Module):
    """Conv(3->out1, k)-BN-ReLU-MaxPool2; Conv(out1->out2, k)-BN-ReLU-MaxPool2 (100 -> 50 -> 25);
    AdaptiveAvgPool(4); Linear(out2*16->128)-ReLU-Dropout-Linear(128->classes). Padding keeps the size."""

    def __init__(self, num_classes: int = 5, out1: int = 64, out2: int = 128, kernel: int = 5,
                 dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, out1, kernel), nn.MaxPool2d(2),
            conv_bn_relu(out1, out2, kernel), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(out2 * 16, 128), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model
def twoconv(num_classes: int = 5, **kwargs) -> nn.Module:
    """Failed in the report: two convolutions, searched over (out1, out2, kernel); default 64, 128, 5."""
    return TwoConv(num_classes, **kwargs)


# ------------------------------------------------------------------------------------------ FiveConv


class FiveConv(nn.Module):
    """Five Conv3x3-BN-ReLU-MaxPool2 blocks with widths w, 2w, 4w, 8w, 8w (100 -> 50 -> 25 -> 12 -> 6 -> 3),
    then a large head Linear(8w*9->512)-ReLU-Dropout-Linear(512->classes)."""

    def __init__(self, num_classes: int = 5, width: int = 32, dropout: float = 0.5):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [conv_bn_relu(cin, w), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 9, 512), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def fiveconv(num_classes: int = 5, **kwargs) -> nn.Module:
    """Failed in the report (overfits): five convolutions and a large fully connected head."""
    return FiveConv(num_classes, **kwargs)
