"""File-level augmentation: during training, a share of the images is replaced, afresh each epoch, by what a
user's copy of it would be after a random re-encode, resize, crop, blur, noise or a chain of two of them (real
encoders, ``features.perturb``), read back through fakeprint's decode path. The pixel path (every network, and
the statistics a hybrid computes from the image) sees them directly; a statistics-only model trained on
statistics computed once gets ``file_aug_variants`` perturbed copies of each image instead
(``engine.training.statcache``).

Config (``engine.config``): ``file_aug`` (the share of training draws perturbed, 0: off), ``file_aug_weights``
(how often each family is drawn). Strengths are drawn uniformly from the ranges users' files come in:

| family | drawn |
| --- | --- |
| ``jpeg`` | quality 50-95; chroma 4:2:0 (70%) or 4:4:4 |
| ``jpeg2`` | quality 70-95, then again at 50-95 |
| ``webp`` | quality 50-95 |
| ``resize`` | scale 0.5-2 (log-uniform), filter bilinear, bicubic, lanczos, box or nearest |
| ``crop`` | 70-95% of each side, centred |
| ``blur`` | Gaussian radius 0.2-1.2 |
| ``noise`` | sigma 1-6 (0-255 scale) |
| ``chain`` | two of the above (not chains), one after the other |

The draws come from the epoch's generator (one seed per batch), so a resumed run perturbs as an unbroken one
would; with ``file_aug: 0`` nothing is drawn and a run keeps its random stream.
"""

from __future__ import annotations

import numpy as np
import torch

from fakeprint.core.errors import FakeprintError
from fakeprint.features.perturb import decoded_copies

FAMILIES = ("jpeg", "jpeg2", "webp", "resize", "crop", "blur", "noise", "chain")
DEFAULT_WEIGHTS = {"jpeg": 3.0, "jpeg2": 1.0, "webp": 1.5, "resize": 2.5, "crop": 1.0, "blur": 1.5, "noise": 0.5,
                   "chain": 2.0}
_FILTERS = ("bilinear", "bicubic", "lanczos", "box", "nearest")


def check_weights(weights: object) -> dict[str, float]:
    """``file_aug_weights`` as a mapping family -> weight (missing families: 0); a one-line error otherwise."""
    if not isinstance(weights, dict) or not weights:
        raise FakeprintError(f"config: file_aug_weights must map families ({', '.join(FAMILIES)}) to weights, "
                             f"got {weights!r}")
    out = {}
    for k, v in weights.items():
        if k not in FAMILIES:
            raise FakeprintError(f"config: file_aug_weights: unknown family {k!r} (known: {', '.join(FAMILIES)})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise FakeprintError(f"config: file_aug_weights.{k} must be a number of at least 0, got {v!r}")
        out[k] = float(v)
    if sum(out.values()) <= 0:
        raise FakeprintError("config: file_aug_weights: at least one weight must be above 0")
    return out


def _one(family: str, rng: np.random.Generator) -> str:
    if family == "jpeg":
        return f"jpeg:q={rng.integers(50, 96)},sub={'420' if rng.random() < 0.7 else '444'}"
    if family == "jpeg2":
        return f"jpeg2:q={rng.integers(70, 96)},q2={rng.integers(50, 96)}"
    if family == "webp":
        return f"webp:q={rng.integers(50, 96)}"
    if family == "resize":
        return f"resize:s={float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))):.3f},filter={rng.choice(_FILTERS)}"
    if family == "crop":
        return f"crop:f={rng.uniform(0.7, 0.95):.3f}"
    if family == "blur":
        return f"blur:r={rng.uniform(0.2, 1.2):.3f}"
    return f"noise:sigma={rng.uniform(1.0, 6.0):.2f}"


def random_spec(rng: np.random.Generator, weights: dict[str, float] | None = None) -> str:
    """One perturbation spec drawn from ``weights`` (family -> weight) and the ranges above."""
    w = weights or DEFAULT_WEIGHTS
    names = [k for k in FAMILIES if w.get(k, 0) > 0]
    p = np.array([w[k] for k in names]) / sum(w[k] for k in names)
    family = names[rng.choice(len(names), p=p)]
    if family != "chain":
        return _one(family, rng)
    simple = [k for k in FAMILIES[:-1] if w.get(k, 0) > 0] or list(FAMILIES[:-1])
    a, b = rng.choice(len(simple), 2, replace=len(simple) < 2)  # two families, or one twice if only one is on
    return _one(simple[a], rng) + "+" + _one(simple[b], rng)


def file_augment(x: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """A uint8 N x H x W x 3 batch with ``file_aug`` of its images replaced by perturbed copies (see above)."""
    p = float(cfg.get("file_aug") or 0.0)
    if p <= 0 or x.shape[0] == 0:
        return x
    take = torch.rand(x.shape[0], generator=g, device=x.device) < p
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=x.device).item())
    idx = torch.nonzero(take).flatten()
    if len(idx) == 0:
        return x
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, cfg.get("file_aug_weights")) for _ in range(len(idx))]  # checked by load_config
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, len(idx))]
    copies = decoded_copies(x[idx].cpu().numpy(), specs, seeds)
    out = x.clone()
    out[idx] = torch.from_numpy(copies).to(x.device)
    return out
