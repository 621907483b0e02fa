"""Fitting a routed ensemble (``fakeprint route PRISTINE PERTURBED --data DIR --out NAME.ensemble.json``): a file
detector (``models.router``) learns, on the *training* part of a dataset (never the internal split the members
held out, which stays for scoring), to tell each image as its generator wrote it from a copy of it re-encoded,
resized, cropped, blurred or noisy, the copies drawn from the training augmentation's family
(``features.file_augment.random_spec``: a different seed from any suite's). It is a logistic regression on the
standardised statistics (scikit-learn), its accuracy measured on a quarter of the fitting images held out before
it is refitted on all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fakeprint.core.errors import FakeprintError
from fakeprint.data.cache import load_split
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load
from fakeprint.features.file_augment import random_spec
from fakeprint.features.perturb import decoded_copies
from fakeprint.models.checkpoint import resolve_checkpoint
from fakeprint.models.ensemble_file import SUFFIX, write_ensemble
from fakeprint.models.router import FileDetector, save_detector

C = 0.1  # the regression's inverse regularisation: 3,705 statistics, a few thousand images


def _statistics(det: FileDetector, images: np.ndarray) -> np.ndarray:
    out = [det.image_statistics(images[s:s + 256]).numpy() for s in range(0, len(images), 256)]
    return np.concatenate(out) if out else np.zeros((0, det.stats.dim), np.float32)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=C, max_iter=3000).fit(scaler.transform(x), y)


def fit_router(pristine: str, perturbed: str, data: str | Path, out: str | Path, images: int = 3000,
               threshold: float = 0.5, feature_set: str = "v4", seed: int = 0) -> dict[str, Any]:
    """Fit the detector on ``images`` training images and a perturbed copy of each, write it beside ``out`` (an
    ensemble file routing between ``pristine`` and ``perturbed``) and return what was measured."""
    out = Path(out)
    if not str(out).endswith(SUFFIX):
        raise FakeprintError(f"--out {out}: a routed ensemble is written as NAME{SUFFIX}")
    if not 0.0 < threshold < 1.0:
        raise FakeprintError(f"--threshold must be between 0 and 1, got {threshold}")
    if images < 100:
        raise FakeprintError(f"--images must be at least 100, got {images}")
    members = [load(pristine), load(perturbed)]  # errors about a member come before any image is read
    full = load_split(Path(data), "train", progress=False)
    held: set[str] = set()
    for m in (pristine, perturbed):
        held |= set(load_eval_split(Path(data), "internal", resolve_checkpoint(m), progress=False).ids)
    pool = np.array([i for i, k in enumerate(full.ids) if k not in held], dtype=np.int64)
    if len(pool) < images:
        raise FakeprintError(f"{data}: {len(pool)} training images outside the members' internal split, "
                             f"--images asks for {images}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(pool, images, replace=False))
    clean = full.images[pick]
    specs = [random_spec(rng) for _ in range(images)]
    copies = decoded_copies(clean, specs, [int(s) for s in rng.integers(0, 2**31 - 1, images)])
    det = FileDetector(feature_set, members[0].normalize if members[0].normalize != "per member" else "imagenet")
    x = np.concatenate([_statistics(det, clean), _statistics(det, copies)]).astype(np.float64)
    y = np.r_[np.zeros(images), np.ones(images)]
    # a quarter of the images (with their copies) held out to measure the detector, then a refit on all
    test = np.zeros(images, bool)
    test[rng.choice(images, images // 4, replace=False)] = True
    test2 = np.r_[test, test]
    scaler, reg = _fit(x[~test2], y[~test2])
    p = reg.predict_proba(scaler.transform(x[test2]))[:, 1]
    measured = {"images": images, "held_out_images": int(test.sum()),
                "pristine_called_pristine": float((p[: test.sum()] < threshold).mean()),
                "perturbed_called_perturbed": float((p[test.sum():] >= threshold).mean())}
    scaler, reg = _fit(x, y)
    det.set_weights(torch.from_numpy(scaler.mean_), torch.from_numpy(np.where(scaler.scale_ > 0, scaler.scale_, 1.0)),
                    torch.from_numpy(reg.coef_[0]), float(reg.intercept_[0]))
    weights = out.with_name(out.name[: -len(SUFFIX)] + ".router.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(weights, det)
    route = {"detector": weights.name, "threshold": threshold, "feature_set": feature_set,
             "fitted_on": f"{images} training images of {Path(data).name} outside the members' internal split, and "
                          f"a perturbed copy of each (features.file_augment.random_spec, seed {seed})",
             "measured": measured}
    write_ensemble(out, [str(pristine), str(perturbed)], None, {"route": route})
    return route
