"""EnsembleCNN: a learned, confidence-blended combination of frozen base models.

Given the base models' softmax outputs ``p_1..p_k`` (k=2 in the report: SkipConCNN then ThreeCNN) and
their concatenation ``z`` (5k values):

- blend weights ``w = softmax(W(z))`` with ``W = Linear(5k->16)-ReLU-Linear(16->k)``;
  the weighted prediction is ``p_w = sum_i w_i p_i``;
- a meta prediction ``p_m = softmax(M(z))`` with ``M = Linear(5k->32)-ReLU-Dropout-Linear(32->5)``;
- the confidence blend: with ``c_w = max(p_w)`` and ``c_m = max(p_m)`` (each prediction's top
  probability), ``a = c_w / (c_w + c_m)`` and the output is ``p = a p_w + (1 - a) p_m``.
  The more confident of the two predictions gets the larger share; ``p`` is a proper distribution.

``forward`` returns ``log p`` so that cross-entropy (which applies log-softmax, a no-op on
log-probabilities) trains it like any other model. Base models stay frozen and in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn

from fakeprint.models.registry import create_model, register_model


class EnsembleCNN(nn.Module):
    def __init__(self, members: list[nn.Module], num_classes: int = 5, hidden_w: int = 16, hidden_m: int = 32,
                 dropout: float = 0.3):
        super().__init__()
        self.members = nn.ModuleList(members)
        for p in self.members.parameters():
            p.requires_grad_(False)
        k = len(members)
        d = num_classes * k
        self.weights = nn.Sequential(nn.Linear(d, hidden_w), nn.ReLU(inplace=True), nn.Linear(hidden_w, k))
        self.meta = nn.Sequential(
            nn.Linear(d, hidden_m), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden_m, num_classes)
        )
        self.members.eval()

    def train(self, mode: bool = True) -> EnsembleCNN:
        super().train(mode)
        self.members.eval()  # frozen: BatchNorm statistics and dropout stay as trained
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            probs = [m(x).float().softmax(dim=1) for m in self.members]
        z = torch.cat(probs, dim=1)
        w = self.weights(z).float().softmax(dim=1)
        p_w = sum(w[:, i : i + 1] * p for i, p in enumerate(probs))
        p_m = self.meta(z).float().softmax(dim=1)
        c_w = p_w.max(dim=1, keepdim=True).values
        c_m = p_m.max(dim=1, keepdim=True).values
        a = c_w / (c_w + c_m)
        p = a * p_w + (1 - a) * p_m
        return p.clamp_min(1e-12).log()


@register_model
def ensemblecnn(num_classes: int = 5, members: tuple[str, ...] = ("skipconcnn", "threecnn"), **kwargs) -> nn.Module:
    """The report's EnsembleCNN: SkipConCNN + ThreeCNN frozen, 727 trainable parameters."""
    return EnsembleCNN([create_model(m, num_classes) for m in members], num_classes, **kwargs)
