"""FPNet: fakeprint's own family, built for generator fingerprints.

Generator traces live in the highest frequencies (upsampling grids, periodic spectral peaks, noise
texture), so the first layers run at full resolution with no pooling, and the resolution is reduced
only by strided residual stages that can learn what to keep. Global average pooling then summarises
the (spatially stationary) trace over the whole image.
"""

from __future__ import annotations

from torch import nn

from fakeprint.models.layers import ResidualBlock
from fakeprint.models.registry import register_model


class FPNet(nn.Module):
    """``stem="conv"``: ``stem_convs`` 3x3 convolutions at full resolution. ``stem="s2d"``: a lossless 2x2
    space-to-depth (pixel unshuffle: every pixel kept, moved into channels) then the convolutions at half
    resolution, which keeps the pixel-level traces at a quarter of the cost. Stages halve the resolution
    with strided residual blocks; widths double per stage. ``drop_path``: stochastic depth of the last block
    (earlier blocks get linearly less)."""

    def __init__(self, num_classes: int = 5, width: int = 32, depths: tuple[int, ...] = (1, 1, 1),
                 stem_convs: int = 2, dropout: float = 0.0, stem: str = "conv", stage_widths: tuple[int, ...] | None = None,
                 first_stride: int = 2, drop_path: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        if stem == "s2d":
            layers.append(nn.PixelUnshuffle(2))
            cin = 12
        for _ in range(stem_convs):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            cin = width
        self.stem = nn.Sequential(*layers)
        stages: list[nn.Module] = []
        n_blocks, b = sum(depths), 0
        for i, depth in enumerate(depths):
            cout = stage_widths[i] if stage_widths else width * 2 ** (i + 1)
            blocks = []
            for j in range(depth):  # stochastic depth grows linearly with depth, up to ``drop_path``
                p = drop_path * b / max(n_blocks - 1, 1)
                blocks.append(ResidualBlock(cin if j == 0 else cout, cout, bias=False, drop_path=p,
                                            stride=(2 if i > 0 else first_stride) if j == 0 else 1))
                b += 1
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


@register_model
def fpnet_tiny(num_classes: int = 5, **kwargs) -> nn.Module:
    """FPNet, width 8: a few-second-per-epoch CPU model for the demo and the tests."""
    kwargs.setdefault("width", 8)
    kwargs.setdefault("stem_convs", 1)
    return FPNet(num_classes, **kwargs)


@register_model
def fpnet_s(num_classes: int = 5, **kwargs) -> nn.Module:
    """FPNet, width 16, depths (1, 1, 2): CPU-trainable, fast CPU inference."""
    kwargs.setdefault("width", 16)
    kwargs.setdefault("depths", (1, 1, 2))
    return FPNet(num_classes, **kwargs)


@register_model
def fpnet_m(num_classes: int = 5, **kwargs) -> nn.Module:
    """FPNet, width 32, depths (1, 2, 2): a larger variant meant for GPU training (not yet trained at scale)."""
    kwargs.setdefault("width", 32)
    kwargs.setdefault("depths", (1, 2, 2))
    return FPNet(num_classes, **kwargs)


@register_model
def fpnet_s2d(num_classes: int = 5, **kwargs) -> nn.Module:
    """FPNet with a lossless space-to-depth stem, stages 48/96/192: the CPU recipe fpnet_cpu, shipped until round 6."""
    kwargs.setdefault("stem", "s2d")
    kwargs.setdefault("width", 32)
    kwargs.setdefault("stem_convs", 1)
    kwargs.setdefault("depths", (1, 2, 2))
    kwargs.setdefault("stage_widths", (48, 96, 192))
    return FPNet(num_classes, **kwargs)
