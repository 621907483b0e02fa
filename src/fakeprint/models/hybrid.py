"""Statistics models: an MLP on hand-made image statistics (``statmlp``), and the dilated ThreeCNN with such a
head beside it (``hybrid``), trained end to end in the ordinary loop.

Round 7 (docs/results.md) found that the statistics of ``stats.StatFeatures`` with a small MLP reach 88.80% on
the internal split and make different mistakes from the CNNs: a fixed geometric blend of their probabilities
with the shipped CNN's gave 91.84-92.48%. ``hybrid`` makes that blend one network: its output is the sum of the
CNN's logits and the statistics head's logits (a product of the two experts' probabilities, the geometric blend).
So that neither branch leans on the other, each training sample drops one branch with probability
``branch_drop`` (the CNN for half of those samples, the statistics head for the other half), and that branch's
logits are zero for it: each head also learns to classify alone. At evaluation both always count.
"""

from __future__ import annotations

import torch
from torch import nn

from fakeprint.features.statistics import StatFeatures
from fakeprint.models.memory import cpu_micro_batch
from fakeprint.models.registry import register_model
from fakeprint.models.threecnn import ThreeCNN

# images per StatFeatures call in CPU inference: a slice's intermediate results stay in the cache (2 cores, 1 MiB L2
# each: forward_and_mirror of 256 images in slices of 128, 64, 32, 16: 945, 756, 693, 752 ms; 6 images: per-call overhead)
STATS_CPU_SLICE = 32


def mlp_layers(width: int, hidden: int, layers: int, dropout: float, num_classes: int) -> list[nn.Module]:
    """``layers`` hidden layers of ``hidden`` units (Linear-ReLU-Dropout) on ``width`` inputs, and the output layer."""
    if layers < 1:
        raise ValueError(f"layers must be at least 1, got {layers}")
    body: list[nn.Module] = []
    for _ in range(layers):
        body += [nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = hidden
    return [*body, nn.Linear(width, num_classes)]


class StatHead(nn.Module):
    """StatFeatures -> BatchNorm (standardises each statistic with running moments, no affine) -> MLP with
    ``layers`` hidden layers of ``hidden`` units (ReLU, dropout)."""

    def __init__(self, num_classes: int = 5, feature_set: str = "v2", hidden: int = 256, dropout: float = 0.2,
                 input_norm: str = "imagenet", layers: int = 1):
        super().__init__()
        self.stats = StatFeatures(feature_set, input_norm)
        self.mlp = nn.Sequential(nn.BatchNorm1d(self.stats.dim, affine=False),
                                 *mlp_layers(self.stats.dim, hidden, layers, dropout, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.stats(x))

    def classify(self, f: torch.Tensor) -> torch.Tensor:
        """Logits from the statistics ``f``."""
        with torch.autocast(device_type=f.device.type, enabled=False):
            bn = self.mlp[0]
            # in eval the same standardisation written out: ONNX exporters cannot size a BatchNorm after the stats
            f = bn(f) if self.training else (f - bn.running_mean) * torch.rsqrt(bn.running_var + bn.eps)
            return self.mlp[1:](f)


class Hybrid(nn.Module):
    """Dilated ThreeCNN logits + statistics-head logits; see the module's docstring."""

    def __init__(self, num_classes: int = 5, width: int = 32, c3: int = 128, dilation: int = 2, dropout: float = 0.5,
                 dropout2d: float = 0.25, feature_set: str = "v2", hidden: int = 256, stat_dropout: float = 0.2,
                 branch_drop: float = 0.2, input_norm: str = "imagenet", stat_layers: int = 1):
        super().__init__()
        if not 0.0 <= branch_drop < 1.0:
            raise ValueError(f"branch_drop must be in [0, 1), got {branch_drop}")
        self.cnn = ThreeCNN(num_classes, c3=c3, dilation=dilation, dropout=dropout, dropout2d=dropout2d, width=width)
        self.head = StatHead(num_classes, feature_set, hidden, stat_dropout, input_norm, stat_layers)
        self.branch_drop = branch_drop

    # in inference on the CPU the CNN runs in cache-sized slices (inference.cpu_micro_batch: 6 images) and the
    # statistics in slices of STATS_CPU_SLICE (dozens of small operations each: per-call overhead on 6 images,
    # memory traffic on 512); predict_logits leaves the slicing to the model
    slices_itself = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self._sliced(self.cnn, x, None)
        b = self._sliced(self.head, x, STATS_CPU_SLICE).to(a.dtype)
        if self.training and self.branch_drop > 0:
            u = torch.rand(x.shape[0], 1, device=x.device)
            keep_a = (u >= self.branch_drop / 2).to(a.dtype)                # drop the CNN for u < p/2
            keep_b = ((u < self.branch_drop / 2) | (u >= self.branch_drop)).to(b.dtype)  # the head for p/2 <= u < p
            return a * keep_a + b * keep_b
        return a + b

    @torch.no_grad()
    def forward_flip_tta(self, x: torch.Tensor) -> torch.Tensor:
        """In inference, ``(self(x) + self(x.flip(3))) / 2`` (flip TTA) with the mirror image's statistics made
        mostly from the image's (``StatFeatures.forward_and_mirror``); ``inference.predict_logits`` uses it."""
        n = len(x)
        # the image and its mirror through each network in one call (one pass over the weights, one call's overhead)
        a, a_m = self._sliced(self.cnn, torch.cat([x, x.flip(3)]), None).split(n)
        size = STATS_CPU_SLICE if x.device.type == "cpu" else n
        pairs = [self.head.stats.forward_and_mirror(chunk) for chunk in x.split(max(size, 1))]
        b, b_m = self.head.classify(torch.cat([p[0] for p in pairs] + [p[1] for p in pairs])).to(a.dtype).split(n)
        return ((a + b) + (a_m + b_m)) / 2

    def _sliced(self, part: nn.Module, x: torch.Tensor, size: int | None) -> torch.Tensor:
        """``part(x)``, in inference on the CPU ``size`` images at a time (None: inference.cpu_micro_batch)."""
        if self.training or x.device.type != "cpu" or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
            return part(x)
        if size is None:
            size = cpu_micro_batch(part, tuple(x.shape[1:]))
        if size <= 0 or size >= x.shape[0]:
            return part(x)
        return torch.cat([part(chunk) for chunk in x.split(size)])


@register_model
def statmlp(num_classes: int = 5, **kwargs) -> nn.Module:
    """Hand-made image statistics (1,330 numbers, no convolution) and a one-hidden-layer MLP."""
    return StatHead(num_classes, **kwargs)


@register_model
def hybrid(num_classes: int = 5, **kwargs) -> nn.Module:
    """The dilated ThreeCNN (width 32) and a statistics MLP, logits summed, trained end to end."""
    return Hybrid(num_classes, **kwargs)
