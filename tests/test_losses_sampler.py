"""The arithmetic of the focal loss, the class-weighted loss and the class-balanced sampler."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fakeprint.core.errors import FakeprintError
from fakeprint.data.loader import DeviceBatches
from fakeprint.engine.config import load_config
from fakeprint.engine.training.losses import focal_loss, make_loss


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(2, 6), st.integers(0, 10_000))
def test_focal_with_gamma_zero_is_cross_entropy(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 3
    target = torch.randint(0, k, (n,), generator=g)
    assert torch.allclose(focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target), atol=1e-6)


def test_focal_matches_a_hand_computed_case():
    # softmax([0, ln 3]) = [1/4, 3/4]
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    target = torch.tensor([1, 0])
    easy = -(0.25 ** 2) * math.log(0.75)      # p_y = 3/4
    hard = -(0.75 ** 2) * math.log(0.25)      # p_y = 1/4
    assert focal_loss(logits, target, gamma=2.0).item() == pytest.approx((easy + hard) / 2, rel=1e-5)
    # gamma down-weights the easy example far more than the hard one
    ce = F.cross_entropy(logits, target, reduction="none")
    assert easy / ce[0].item() == pytest.approx(0.0625, rel=1e-5)
    assert hard / ce[1].item() == pytest.approx(0.5625, rel=1e-5)


def test_focal_weighting_multiplies_each_example_by_its_class_weight():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    target = torch.tensor([1, 0])
    easy, hard = -(0.25 ** 2) * math.log(0.75), -(0.75 ** 2) * math.log(0.25)
    w = torch.tensor([1.0, 3.0])
    assert focal_loss(logits, target, 2.0, w).item() == pytest.approx((3 * easy + 1 * hard) / (3 + 1), rel=1e-5)
    # gamma 0 with weights is weighted cross-entropy, normalised the same way
    assert torch.allclose(focal_loss(logits, target, 0.0, w), F.cross_entropy(logits, target, weight=w), atol=1e-6)


def _cfg(**kw):
    return load_config(None, {"model": "fpnet_tiny"} | kw)


def test_make_loss_weighted_ce_defaults_to_inverse_frequency():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    loss = make_loss(_cfg(loss="weighted_ce"), labels, 3, torch.device("cpu"))
    logits = torch.randn(10, 3, generator=torch.Generator().manual_seed(0))
    w = torch.tensor([10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)])
    assert torch.allclose(loss(logits, labels), F.cross_entropy(logits, labels, weight=w))


def test_make_loss_uses_given_class_weights_and_focal():
    labels = torch.tensor([0, 1, 4, 4])
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    weights = [1.0, 1.0, 1.0, 1.0, 2.0]
    wce = make_loss(_cfg(loss="weighted_ce", class_weights=weights), labels, 5, torch.device("cpu"))
    assert torch.allclose(wce(logits, labels), F.cross_entropy(logits, labels, weight=torch.tensor(weights)))
    focal = make_loss(_cfg(loss="focal", focal_gamma=0.0), labels, 5, torch.device("cpu"))
    assert torch.allclose(focal(logits, labels), F.cross_entropy(logits, labels), atol=1e-6)


def test_make_loss_refuses_class_weights_of_the_wrong_length():
    with pytest.raises(FakeprintError, match="class_weights needs 5 values"):
        make_loss(_cfg(loss="weighted_ce", class_weights=[1.0, 2.0]), torch.tensor([0, 1]), 5, torch.device("cpu"))


def _imbalanced() -> torch.Tensor:
    counts = [700, 200, 60, 30, 10]
    return torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])


def _draws(sampler: str, seed: int, epochs: int) -> list[torch.Tensor]:
    labels = _imbalanced()
    b = DeviceBatches(torch.zeros(len(labels), 1, 1, 3, dtype=torch.uint8), labels, 50, sampler=sampler, seed=seed)
    out = []
    for e in range(epochs):
        b.set_epoch(e)
        out.append(b.indices())
    return out


def test_balanced_sampler_draws_classes_near_uniformly():
    labels = _imbalanced()
    idx = torch.cat(_draws("balanced", 0, 5))                    # 5,000 draws
    freq = np.bincount(labels[idx].numpy(), minlength=5) / len(idx)
    assert np.abs(freq - 0.2).max() < 0.03                       # ~5 standard errors
    shuffled = torch.cat(_draws("shuffle", 0, 5))
    assert np.bincount(labels[shuffled].numpy(), minlength=5)[0] / len(shuffled) == pytest.approx(0.7)


def test_balanced_sampler_is_a_function_of_seed_and_epoch():
    a, b, c = _draws("balanced", 3, 2), _draws("balanced", 3, 2), _draws("balanced", 4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1])          # a new draw every epoch
    assert not torch.equal(a[0], c[0])          # another seed, another draw
    assert len(a[0]) == len(_imbalanced())      # one epoch = as many draws as images


def test_shuffle_sampler_is_a_permutation():
    idx = _draws("shuffle", 0, 1)[0]
    assert torch.equal(idx.sort().values, torch.arange(len(_imbalanced())))
