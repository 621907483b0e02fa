"""ThreeCNN: the report's three-convolution network, and its dilated, wider variant."""

from __future__ import annotations

from torch import nn

from fakeprint.models.layers import conv_bn_relu
from fakeprint.models.registry import register_model


class ThreeCNN(nn.Module):
    """Conv(3->w)-MaxPool, Conv(w->2w)-MaxPool, Conv(2w->c3, no pad)-MaxPool, Dropout2d,
    AdaptiveAvgPool(4), Linear(c3*16->128)-ReLU-Dropout-Linear(128->classes). The report's: ``width`` 64,
    ``c3`` 192 (default: 3 x width); ``threecnn_narrow`` is the same topology at width 8, for CPU studies."""

    def __init__(self, num_classes: int = 5, c3: int | None = None, dilation: int = 1, dropout: float = 0.5,
                 dropout2d: float = 0.25, width: int = 64):
        super().__init__()
        w = width
        c3 = 3 * w if c3 is None else c3
        self.features = nn.Sequential(
            conv_bn_relu(3, w), nn.MaxPool2d(2),                    # 100 -> 50
            conv_bn_relu(w, 2 * w), nn.MaxPool2d(2),                # 50 -> 25
            conv_bn_relu(2 * w, c3, padding=0, dilation=dilation),  # 25 -> 23 (dilation 2: 21)
            nn.MaxPool2d(2),                                        # -> 11 (10)
            nn.Dropout2d(dropout2d),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * 16, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@register_model
def threecnn(num_classes: int = 5, **kwargs) -> nn.Module:
    """The report's ThreeCNN (691,781 parameters)."""
    return ThreeCNN(num_classes, **kwargs)


@register_model
def threecnn_dilated(num_classes: int = 5, **kwargs) -> nn.Module:
    """ThreeCNN with a dilated (2), wider (256) last convolution, the report's best ThreeCNN."""
    kwargs.setdefault("c3", 256)
    kwargs.setdefault("dilation", 2)
    return ThreeCNN(num_classes, **kwargs)


@register_model
def threecnn_narrow(num_classes: int = 5, **kwargs) -> nn.Module:
    """ThreeCNN's topology at width 8 (64: the report's), for CPU-scale studies."""
    kwargs.setdefault("width", 8)
    return ThreeCNN(num_classes, **kwargs)
