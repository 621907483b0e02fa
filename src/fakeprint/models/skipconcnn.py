"""SkipConCNN: the report's network with one residual block (8,695,045 parameters)."""

from __future__ import annotations

from torch import nn

from fakeprint.models.layers import ResidualBlock, conv_bn_relu
from fakeprint.models.registry import register_model


class SkipConCNN(nn.Module):
    """Widths w, 2w, 4w, 4w (the report's: ``width`` 128, i.e. 128, 256, 512, 512); ``skipconcnn_narrow`` is
    the same topology at width 8, for CPU studies; ``skip=False`` removes the shortcut branch."""

    def __init__(self, num_classes: int = 5, skip: bool = True, dropout: float = 0.5, width: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(3, w),
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),                      # 100 -> 50
            ResidualBlock(2 * w, 4 * w, skip=skip),
            nn.MaxPool2d(2),                      # 50 -> 25
            conv_bn_relu(4 * w, 4 * w),
            nn.Dropout(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * 36, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


@register_model
def skipconcnn(num_classes: int = 5, **kwargs) -> nn.Module:
    """The report's SkipConCNN (8,695,045 parameters)."""
    return SkipConCNN(num_classes, **kwargs)


@register_model
def skipconcnn_noskip(num_classes: int = 5, **kwargs) -> nn.Module:
    """SkipConCNN without its skip connection (the shortcut branch removed), for the residual study."""
    kwargs["skip"] = False
    return SkipConCNN(num_classes, **kwargs)


@register_model
def skipconcnn_narrow(num_classes: int = 5, **kwargs) -> nn.Module:
    """SkipConCNN's topology at width 8 (128: the report's), for CPU-scale studies."""
    kwargs.setdefault("width", 8)
    return SkipConCNN(num_classes, **kwargs)


@register_model
def skipconcnn_narrow_noskip(num_classes: int = 5, **kwargs) -> nn.Module:
    """skipconcnn_narrow without its skip connection, for the residual study at CPU scale."""
    kwargs.setdefault("width", 8)
    kwargs["skip"] = False
    return SkipConCNN(num_classes, **kwargs)
