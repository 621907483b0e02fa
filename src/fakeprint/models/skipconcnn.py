"""SkipConCNN: the report's network with one residual block (8,695,045 parameters)."""

from __future__ import annotations

from torch import nn

from .layers import ResidualBlock, conv_bn_relu
from .registry import register_model


class SkipConCNN(nn.Module):
    def __init__(self, num_classes: int = 5, skip: bool = True, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(3, 128),
            conv_bn_relu(128, 256),
            nn.MaxPool2d(2),                      # 100 -> 50
            ResidualBlock(256, 512, skip=skip),
            nn.MaxPool2d(2),                      # 50 -> 25
            conv_bn_relu(512, 512),
            nn.Dropout(dropout),
        )
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(512 * 36, 128),
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
