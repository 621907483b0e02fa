"""Fitting a routed ensemble (``fakeprint route PRISTINE PERTURBED --data DIR --out NAME.ensemble.json``): a file
detector (``models.router``) learns, on the *training* part of a dataset (never the internal split the members
held out, which stays for scoring), to tell each image as its generator wrote it from a copy of it re-encoded,
resized, cropped, blurred or noisy, the copies drawn from the training augmentation's family
(``features.file_augment.random_spec``: a different seed from any suite's). It is a logistic regression on the
standardised statistics (scikit-learn), its accuracy measured on a quarter of the fitting images held out before
it is refitted on all of them. Its typicality score (``fit_typicality``: which inputs are far from every training
image, flagged ``uncertain``) is fitted on the other three quarters and its bar set on that quarter.

``calibrate_route`` (``fakeprint calibrate NAME.ensemble.json --data DIR``) then gives the perturbed route a flag of
its own. Its member is calibrated on clean images, but on re-saved files it is wrong more often (about 11% against
6%) and is sure of more of its mistakes. On the held-out split and its perturbed copies, the route's threshold on the
top probability is the lowest at which ``wrong_flagged`` (0.75) of the wrong answers among those copies are flagged
(the member's own flag counts). Clean images mostly take the first route, so its cost falls on right answers for
re-saved files, and it is reported: cross-fitted (fitted on one half of the images, measured on the other, both
ways), the shares of clean images, of wrong answers and of right answers flagged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fakeprint.core.errors import FakeprintError
from fakeprint.data.cache import load_split
from fakeprint.engine.evaluate import load_eval_split, load_scored
from fakeprint.engine.predict import Predictions, RoutedClassifier, load, route_flags, route_of
from fakeprint.features.file_augment import random_spec
from fakeprint.features.perturb import decoded_copies, perturbed_images, suite
from fakeprint.models.checkpoint import resolve_checkpoint
from fakeprint.models.ensemble_file import SUFFIX, update_route, write_ensemble
from fakeprint.models.router import FileDetector, save_detector

C = 0.1  # the regression's inverse regularisation: 3,705 statistics, a few thousand images
TYPICAL_COMPONENTS = 64  # principal components of the standardised statistics the typicality score reads
FAR_QUANTILE = 0.995  # the far bar: this quantile of the typicality of fitting images held out from its fit


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
    measured |= fit_typicality(det, x, test2, seed)
    weights = out.with_name(out.name[: -len(SUFFIX)] + ".router.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_detector(weights, det)
    route = {"detector": weights.name, "threshold": threshold, "feature_set": feature_set,
             "fitted_on": f"{images} training images of {Path(data).name} outside the members' internal split, and "
                          f"a perturbed copy of each (features.file_augment.random_spec, seed {seed})",
             "measured": measured}
    write_ensemble(out, [str(pristine), str(perturbed)], None, {"route": route})
    return route


def fit_typicality(det: FileDetector, x: np.ndarray, held_out: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Give ``det`` (its standardisation set) a typicality score fitted on the statistics ``x`` outside ``held_out``
    (principal components, then a Ledoit-Wolf covariance of them) and a far bar at FAR_QUANTILE of the held-out
    rows' scores; return the share of held-out rows it calls far (about 1 - FAR_QUANTILE by construction)."""
    z = (x - det.mean.double().numpy()) / det.scale.double().numpy()
    fit = z[~held_out]
    k = max(1, min(TYPICAL_COMPONENTS, len(fit) - 1, z.shape[1]))
    pca = PCA(k, random_state=seed).fit(fit)
    cov = LedoitWolf().fit(pca.transform(fit))
    det.set_typicality(pca.mean_, pca.components_, cov.location_, cov.precision_, 0.0)
    scores = det.typicality(torch.from_numpy(x[held_out])).double().numpy()
    bar = float(np.quantile(scores, FAR_QUANTILE))
    det.far_above.fill_(bar)
    return {"typicality": {"components": k, "far_above": bar, "quantile": FAR_QUANTILE,
                           "held_out_far": float((scores > bar).mean()), "held_out_images": int(held_out.sum())}}


WRONG_FLAGGED = 0.75


def route_threshold(outputs: list[Predictions], labels: np.ndarray, threshold: float, wrong_flagged: float) -> float:
    """The lowest threshold on the top probability of second-route answers at which ``wrong_flagged`` of the wrong
    answers in ``outputs`` (predictions of perturbed copies of images labelled ``labels``, members' own flags
    included) are flagged; 0.0 when the members' flags already reach it."""
    top = np.concatenate([o.probs.max(1) for o in outputs])
    wrong = np.concatenate([o.labels != labels for o in outputs])
    own = np.concatenate([np.asarray(o.uncertain, bool) for o in outputs])
    second = np.concatenate([route_of(o.file_perturbed, threshold) == 1 for o in outputs])
    if not wrong.any() or own[wrong].mean() >= wrong_flagged:
        return 0.0
    # flagged at threshold u: own | (second & top < u); try each second-route wrong answer's score, just above it
    for u in np.unique(top[wrong & second & ~own]):
        u = float(np.nextafter(np.float32(u), np.float32(2)))
        if route_flags(own, second, top, u)[wrong].mean() >= wrong_flagged:
            return u
    return 1.0


def _flag_shares(outputs: list[Predictions], clean: Predictions, labels: np.ndarray, threshold: float,
                 u: float) -> dict[str, float]:
    def flags(o: Predictions) -> np.ndarray:
        return route_flags(o.uncertain, route_of(o.file_perturbed, threshold) == 1, o.probs.max(1), u)

    wrong = [o.labels != labels for o in outputs]
    f = [flags(o) for o in outputs]
    return {"clean_flagged": float(flags(clean).mean()),
            "wrong_flagged_under_perturbations": float(np.mean([x[w].mean() for x, w in zip(f, wrong, strict=True)
                                                                if w.any()])),
            "right_flagged_under_perturbations": float(np.mean([x[~w].mean() for x, w in zip(f, wrong, strict=True)
                                                                if (~w).any()]))}


def calibrate_route(path: str | Path, data: str | Path, split: str = "internal", perturbed: str = "quick",
                    wrong_flagged: float = WRONG_FLAGGED, seed: int = 0) -> dict[str, Any]:
    """Fit ``route.uncertain_below`` of the routed ensemble file ``path`` on the held-out ``split`` of ``data`` and
    perturbed copies of it (the ``perturbed`` suite), write it into the file, and return it with the cross-fitted
    figures (see the module's docstring)."""
    if split == "train":
        raise FakeprintError("the train split was trained on; calibration needs held-out images")
    if not 0.0 < wrong_flagged < 1.0:
        raise FakeprintError(f"--wrong-flagged must be between 0 and 1, got {wrong_flagged}")
    specs = [s for s in suite(perturbed) if s != "none"]
    if not specs:
        raise FakeprintError(f"--perturbed {perturbed!r}: the route's flag is fitted on perturbed copies; name some")
    clf, ds = load_scored([path], data, split, progress=False)
    if not isinstance(clf, RoutedClassifier):
        raise FakeprintError(f"{path}: not a routed ensemble (fakeprint route writes one)")
    if any(not m.meta.get("calibration") for m in clf.members):
        raise FakeprintError(f"{path}: both members must be calibrated first (fakeprint calibrate MEMBER --data DIR)")
    labels, n = ds.labels, len(ds.labels)
    if n < 20:
        raise FakeprintError(f"calibration needs at least 20 held-out images, got {n}")
    clf.uncertain_below = None  # fitted on the members' own flags
    clean = clf.predict(ds.images)
    outputs = [clf.predict(perturbed_images(ds.images, s)) for s in specs]
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2:])
    crossed = []
    for fit, test in (halves, halves[::-1]):
        u = route_threshold([o.subset(fit) for o in outputs], labels[fit], clf.threshold, wrong_flagged)
        crossed.append(_flag_shares([o.subset(test) for o in outputs], clean.subset(test), labels[test],
                                    clf.threshold, u))
    u = route_threshold(outputs, labels, clf.threshold, wrong_flagged)
    fit = {"uncertain_below": u, "wrong_flagged_target": wrong_flagged, "perturbations": specs,
           "split": split if split != "internal" else "internal split (held out by both members)", "n": int(n),
           "cross_fitted": {k: float(np.mean([c[k] for c in crossed])) for k in crossed[0]},
           "in_sample": _flag_shares(outputs, clean, labels, clf.threshold, u)}
    update_route(path, {"uncertain_below": u, "uncertain_fit": fit})
    return fit
