"""Honest confidence: temperature scaling and an ``uncertain`` flag, fitted on a held-out split.

``calibrate(logits, labels)`` fits one temperature T (logits / T before the softmax, Guo et al. 2017) by
minimising the negative log-likelihood, and a threshold on the score (the top probability after scaling):
predictions below the ``quantile`` (default the 5th percentile) of the held-out split's scores are flagged
``uncertain``. The calibration error before and after scaling is reported **cross-fitted**: T is fitted
on one half of the split and measured on the other, both ways, so the "after" figure is not measured on
the images it was fitted to. The stored T and threshold are then fitted on the whole split.

``calibrate_perturbed`` fits the same two numbers on held-out images *and* perturbed copies of them (re-encoded,
resized, cropped files: ``features.perturb``), so that the flag means something on files as users have them: T by
the NLL of all of them, the threshold as the ``max_clean_flagged`` quantile of the clean images' scores (so at most
that share of clean images is flagged), its effect reported cross-fitted (fitted on one half of the images,
measured on the other): the share of clean images flagged and of wrong answers flagged on the perturbed copies.

The result goes into a checkpoint's metadata (``calibration``); ``Classifier.predict`` applies it. An ensemble's goes
into its ensemble file (``calibrate_ensemble``, ``models.ensemble_file``), fitted on the log of its averaged
probabilities; ``EnsembleClassifier.predict`` applies it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fakeprint.core.errors import FakeprintError
from fakeprint.core.metrics import ece, softmax
from fakeprint.data.dataset import to_rgb_array
from fakeprint.data.demo import render
from fakeprint.engine.evaluate import load_eval_split, load_scored
from fakeprint.engine.predict import EnsembleClassifier, load
from fakeprint.features.perturb import perturbed_images, suite
from fakeprint.models.checkpoint import resolve_checkpoint, update_metadata
from fakeprint.models.ensemble_file import write_ensemble

QUANTILE = 0.05
BINS = 10


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    p = softmax(np.asarray(logits, np.float64) / temperature)
    return float(-np.log(np.maximum(p[np.arange(len(labels)), labels], 1e-12)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] with the lowest NLL (golden-section search on log T; NLL is unimodal
    in T for temperature scaling)."""
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, labels, math.exp(a)), nll(logits, labels, math.exp(b))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, labels, math.exp(b))
    return float(math.exp((lo + hi) / 2))


def calibrate(logits: np.ndarray, labels: np.ndarray, quantile: float = QUANTILE, seed: int = 0) -> dict[str, Any]:
    """Temperature, ``uncertain`` threshold and cross-fitted calibration figures for held-out ``logits``."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    if len(labels) < 20:
        raise FakeprintError(f"calibration needs at least 20 held-out images, got {len(labels)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    before, after = [], []
    for fit, test in (halves, halves[::-1]):
        t = fit_temperature(logits[fit], labels[fit])
        before.append(ece(softmax(logits[test]), labels[test]) * len(test))
        after.append(ece(softmax(logits[test] / t), labels[test]) * len(test))
    temperature = fit_temperature(logits, labels)
    scores = softmax(logits / temperature).max(1)
    threshold = float(np.quantile(scores, quantile))
    return {"temperature": temperature, "score": "max_probability", "uncertain_below": threshold,
            "quantile": quantile, "n": int(len(labels)),
            "ece_before": float(sum(before) / len(labels)), "ece_after_cross_fitted": float(sum(after) / len(labels)),
            "flagged_share": float((scores < threshold).mean())}


MAX_CLEAN_FLAGGED = 0.10


def calibrate_perturbed(clean: np.ndarray, labels: np.ndarray, perturbed: dict[str, np.ndarray],
                        max_clean_flagged: float = MAX_CLEAN_FLAGGED, seed: int = 0) -> dict[str, Any]:
    """``calibrate`` on clean logits and the logits of perturbed copies of the same images (spec -> logits)."""
    clean, labels = np.asarray(clean, np.float64), np.asarray(labels)
    if len(labels) < 20 or not perturbed:
        raise FakeprintError(f"calibration under perturbations needs at least 20 held-out images and one "
                             f"perturbation, got {len(labels)} and {len(perturbed)}")
    if not 0 < max_clean_flagged < 1:
        raise FakeprintError(f"--max-clean-flagged must be between 0 and 1, got {max_clean_flagged}")
    stack = np.stack([clean, *perturbed.values()])  # P+1 x N x C
    order = np.random.default_rng(seed).permutation(len(labels))
    halves = (order[: len(order) // 2], order[len(order) // 2:])
    clean_flagged, wrong_flagged, before, after = [], [], [], []
    for fit, test in (halves, halves[::-1]):
        t, u = _fit(stack[:, fit], labels[fit], max_clean_flagged)
        probs = softmax(stack[:, test].reshape(-1, stack.shape[2]) / t)
        y = np.tile(labels[test], len(stack))
        top, wrong = probs.max(1), probs.argmax(1) != y
        clean_flagged.append(float((top[: len(test)] < u).mean()))
        pert_wrong = wrong[len(test):]
        wrong_flagged.append(float((top[len(test):][pert_wrong] < u).mean()) if pert_wrong.any() else 1.0)
        before.append(ece(softmax(stack[:, test].reshape(-1, stack.shape[2])), y))
        after.append(ece(probs, y))
    temperature, threshold = _fit(stack, labels, max_clean_flagged)
    return {"temperature": temperature, "score": "max_probability", "uncertain_below": threshold,
            "quantile": max_clean_flagged, "n": int(len(labels)), "fitted_on": "clean and perturbed copies",
            "perturbations": list(perturbed), "ece_before": float(np.mean(before)),
            "ece_after_cross_fitted": float(np.mean(after)),
            "clean_flagged_cross_fitted": float(np.mean(clean_flagged)),
            "wrong_flagged_under_perturbations_cross_fitted": float(np.mean(wrong_flagged))}


def _fit(stack: np.ndarray, labels: np.ndarray, max_clean_flagged: float) -> tuple[float, float]:
    """(temperature by the NLL of every copy, threshold at the ``max_clean_flagged`` quantile of clean scores)."""
    t = fit_temperature(stack.reshape(-1, stack.shape[2]), np.tile(labels, len(stack)))
    return t, float(np.quantile(softmax(stack[0] / t).max(1), max_clean_flagged))


def probe_images(n: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    """Images no generator of the task made: plain colours (300x200, resized as any upload is), uniform
    noise, and the synthetic demo generators' images."""
    from PIL import Image


    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (n, 3))
    plain = np.stack([to_rgb_array(Image.new("RGB", (300, 200), tuple(int(v) for v in c))) for c in colours])
    noise = rng.integers(0, 256, (n, 100, 100, 3), dtype=np.uint8)
    demo = np.stack([render(i % 5, rng) for i in range(n)])
    return {"plain colour": plain, "noise": noise, "demo (synthetic generators)": demo}


def flagged_shares(clf: Any, probes: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Share of each probe set that ``clf`` flags ``uncertain``."""
    probes = probes if probes is not None else probe_images()
    return {name: float(np.mean(clf.predict(images).uncertain)) for name, images in probes.items()}


def calibrate_checkpoint(checkpoint: Any, data: Any, split: str = "internal", write: bool = True,
                         perturbed: str | None = None, max_clean_flagged: float = MAX_CLEAN_FLAGGED) -> dict[str, Any]:
    """Fit the calibration of ``checkpoint`` on a held-out ``split`` of ``data`` (its own test-time
    augmentation), store it in the checkpoint's metadata (``write``), and measure the share of the probe
    images it flags. ``perturbed`` (a suite name or specs, ``features.perturb``): fit it on those perturbed copies
    too (``calibrate_perturbed``). Refuses a split the checkpoint trained on."""
    specs = suite(perturbed) if perturbed else []
    clf = load(checkpoint)
    cfg = clf.meta.get("config") or {}
    if split == "train" or (split == "internal" and cfg.get("train_on_all")):
        raise FakeprintError(f"{checkpoint}: the {split} split was trained on; calibration needs held-out images")
    ds = load_eval_split(Path(data), split, resolve_checkpoint(checkpoint), progress=False)
    logits = clf.logits(ds.images, clf.tta).numpy()
    if specs:
        copies = {s: clf.logits(perturbed_images(ds.images, s), clf.tta).numpy() for s in specs if s != "none"}
        cal = calibrate_perturbed(logits, ds.labels, copies, max_clean_flagged)
    else:
        cal = calibrate(logits, ds.labels)
    cal |= {"split": split if split != "internal" else "internal split (the run's split.csv)", "tta": clf.tta}
    if write:
        update_metadata(checkpoint, {"calibration": cal})
        clf = load(checkpoint)
        cal["flagged_share_probes"] = flagged_shares(clf)
        update_metadata(checkpoint, {"calibration": cal})
    return cal


def calibrate_ensemble(members: list, data: Any, out: str | Path, split: str = "internal",
                       perturbed: str | None = None, max_clean_flagged: float = MAX_CLEAN_FLAGGED) -> dict[str, Any]:
    """Fit the calibration of the members' averaged probabilities (each member with its own test-time augmentation
    and calibration) on a held-out ``split`` that every member held out, as ``calibrate_checkpoint`` fits one
    model's, and write the ensemble file ``out`` (``NAME.ensemble.json``) naming the members and holding it."""
    if len(members) < 2:
        raise FakeprintError("an ensemble's calibration needs two or more models")
    if split == "train":
        raise FakeprintError("the train split was trained on; calibration needs held-out images")
    specs = suite(perturbed) if perturbed else []
    clf, ds = load_scored(list(members), data, split, progress=False)
    assert isinstance(clf, EnsembleClassifier)

    def logits(images: np.ndarray) -> np.ndarray:  # the log of the average: what the ensemble's calibration scales
        return np.log(np.clip(clf.predict(images).probs, 1e-12, 1.0))

    clean = logits(ds.images)
    if specs:
        cal = calibrate_perturbed(clean, ds.labels, {s: logits(perturbed_images(ds.images, s)) for s in specs
                                                     if s != "none"}, max_clean_flagged)
    else:
        cal = calibrate(clean, ds.labels)
    cal |= {"split": split if split != "internal" else "internal split (held out by every member)",
            "tta": "each member's own", "members_calibrated": [bool(m.meta.get("calibration")) for m in clf.members]}
    write_ensemble(out, [str(m) for m in members], cal)
    cal["flagged_share_probes"] = flagged_shares(load(out))
    write_ensemble(out, [str(m) for m in members], cal)
    return cal
