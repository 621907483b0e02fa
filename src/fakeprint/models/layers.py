"""Small building blocks shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None,
                 dilation: int = 1) -> nn.Sequential:
    if padding is None:
        padding = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """[Conv3x3-BN-ReLU-Conv3x3-BN] + shortcut (identity, or Conv1x1-BN when shape changes), then ReLU.

    ``skip=False`` drops the shortcut (for the residual-connection study). ``drop_path``: stochastic depth
    (Huang et al. 2016), in training each sample's residual branch is dropped with this probability and the
    kept ones scaled by 1 / (1 - p); only where there is a shortcut.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, skip: bool = True, bias: bool = True,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_path = float(drop_path)
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias),
            nn.BatchNorm2d(cout),
        )
        self.skip = skip
        if skip and (cin != cout or stride != 1):
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=bias), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.body(x)
        if self.skip and self.drop_path > 0 and self.training:
            keep = 1.0 - self.drop_path
            mask = torch.empty(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype).bernoulli_(keep)
            out = out * mask / keep
        if self.skip:
            out = out + self.shortcut(x)
        return self.act(out)
