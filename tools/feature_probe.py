"""A different family: hand-made image statistics and gradient boosting, judged on the internal split.

    python tools/feature_probe.py --data data/unibuc-deepfake --run runs/cpu6/w32_s1 \
        --shared benchmarks/results/shared-errors-round6.csv --blend default \
        --out benchmarks/results/handcrafted-features

The CNNs of rounds 3-6 share their errors (54 internal-split images wrong for all twelve). This probe asks
whether a model that sees the images through other eyes (colour statistics and histograms, noise-residual
statistics, co-occurrences of neighbouring pixel differences, radial and 2-D power spectra: 539 numbers
per image) makes different mistakes. It trains scikit-learn's HistGradientBoostingClassifier (or, with
``--classifier``, an MLP or a linear model) on the internal split's training part (the run's ``split.csv``),
scores the internal split (the last iteration, no early stopping, nothing chosen on it), counts how many of the
``--shared`` images it gets right, and lists fixed blends of its probabilities with each ``--blend`` checkpoint's
(every weight of a fixed grid is shown; none is chosen). Writes ``OUT.json`` and ``OUT.md``; ``--groups`` adds
one model per feature group (ablation).

``--feature-set v3`` (and any set with ``--torch``) computes the statistics with ``fakeprint.models.stats`` as the
models do; v3 adds steganalysis-style rich-model residual co-occurrences (2,580 numbers per image).

Feature sets are compared with ``--evaluate-on selection`` (fit on 90% of the internal split's training part,
score on the other 10%) or, with less noise, ``--evaluate-on cv`` (``--folds`` stratified folds of the internal
split's training part, each scored by a model fitted on the others, every image scored once), so that the internal
split is scored once per feature set chosen, not used to choose. ``--classifier head`` trains the MLP that the
statistics models train (``models.hybrid.StatHead``'s layers and the presets' optimiser, in torch; far faster than
scikit-learn's on thousands of statistics). v4 adds colour-noise co-occurrences (3,705 numbers per image).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

GROUPS = ("colour", "residual", "cooccurrence", "spectrum")
EXTRA_GROUPS = ("chroma", "cooccurrence_rgb", "multiscale", "gradient")  # feature set v2 = GROUPS + these
BLEND_WEIGHTS = (0.2, 0.3, 0.4, 0.5)


def _hist(values: np.ndarray, bins: int) -> np.ndarray:
    """Row-wise histogram of values in [0, 1]: N x bins, each row summing to 1."""
    n, p = values.shape
    idx = np.minimum((values * bins).astype(np.int64), bins - 1) + bins * np.arange(n)[:, None]
    return np.bincount(idx.ravel(), minlength=n * bins).reshape(n, bins) / p


def _radial(power: np.ndarray, rad: np.ndarray, nbins: int) -> np.ndarray:
    """Mean of N x H x W power over rings of integer radius ``rad`` (H x W), in log scale."""
    n = len(power)
    counts = np.bincount(rad.ravel(), minlength=nbins)
    sums = np.stack([np.bincount(rad.ravel(), weights=p.ravel(), minlength=nbins) for p in power])
    assert sums.shape == (n, nbins)
    return np.log(sums / counts + 1e-8)


def features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of N x H x W x 3 uint8 images, by group (each N x k float32)."""
    b = batch.astype(np.float32) / 255.0
    n, h, w, _ = b.shape
    out: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
    mx, mn, grey = b.max(-1), b.min(-1), b.mean(-1)
    sat = (mx - mn) / (mx + 1e-6)
    for ch in (b[..., 0], b[..., 1], b[..., 2], sat, mx, grey):
        f = ch.reshape(n, -1)
        out["colour"] += [f.mean(1, keepdims=True), f.std(1, keepdims=True),
                          np.percentile(f, [1, 5, 25, 50, 75, 95, 99], axis=1).T, _hist(f, 16)]
    # noise residual: the image minus its 3x3 box mean, per channel
    p = np.pad(b, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    res = b - sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    for c in range(3):
        r = res[..., c].reshape(n, -1)
        var = r.var(1)
        kurt = ((r - r.mean(1, keepdims=True)) ** 4).mean(1) / (var ** 2 + 1e-12)
        out["residual"] += [r.std(1)[:, None], np.abs(r).mean(1)[:, None], kurt[:, None]]
    # neighbouring differences of the grey image (0-255), truncated to +-4: histogram and co-occurrence
    out["cooccurrence"] += _cooccurrence(grey * 255)
    # power spectra: of the grey residual (radial and 10 x 10 blocks) and of the grey image (radial)
    yy, xx = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    rad = np.sqrt(yy ** 2 + xx ** 2).astype(np.int64).clip(0, h // 2 - 1)
    spec = np.abs(np.fft.fftshift(np.fft.fft2(res.mean(-1)), axes=(1, 2))) ** 2
    out["spectrum"] += [_radial(spec, rad, h // 2),
                        np.log(spec + 1e-8).reshape(n, 10, h // 10, 10, w // 10).mean((2, 4)).reshape(n, -1)]
    centred = grey - grey.mean((1, 2), keepdims=True)
    out["spectrum"].append(_radial(np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2))) ** 2, rad, h // 2))
    return {g: np.concatenate(v, 1).astype(np.float32) for g, v in out.items()}


def _cooccurrence(grey255: np.ndarray) -> list[np.ndarray]:
    """Histogram (9) and pair co-occurrence (81) of horizontal and vertical differences truncated to +-4."""
    n, h, w = grey255.shape
    out = []
    for dy, dx in ((0, 1), (1, 0)):
        q = np.clip(np.round(grey255[:, dy:, dx:] - grey255[:, :h - dy, :w - dx]), -4, 4).astype(np.int64) + 4
        out.append(_hist(q.reshape(n, -1) / 9.0 + 1e-6, 9))
        a, c2 = (q[:, :, :-1], q[:, :, 1:]) if dx else (q[:, :-1, :], q[:, 1:, :])
        out.append(_hist((a * 9 + c2).reshape(n, -1) / 81.0 + 1e-6, 81))
    return out


def extra_features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Feature set v2's additions: chroma and hue, per-channel co-occurrences, the same at half resolution,
    gradient and Laplacian statistics, and the correlation of the channels' noise residuals."""
    b = batch.astype(np.float32) / 255.0
    n, h, w, _ = b.shape
    r, g, bl = b[..., 0], b[..., 1], b[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb, cr = (bl - y) / 1.772 + 0.5, (r - y) / 1.402 + 0.5
    mx, mn = b.max(-1), b.min(-1)
    chroma = mx - mn
    hue = np.where(mx == r, (g - bl) / (chroma + 1e-6), np.where(mx == g, 2 + (bl - r) / (chroma + 1e-6),
                                                                  4 + (r - g) / (chroma + 1e-6)))
    hue = (hue / 6.0) % 1.0
    hue_w = np.stack([np.bincount(np.minimum((hh * 16).astype(np.int64), 15).ravel(), weights=cc.ravel(),
                                  minlength=16) for hh, cc in zip(hue, chroma, strict=True)])
    out: dict[str, list[np.ndarray]] = {k: [] for k in EXTRA_GROUPS}
    out["chroma"] += [_hist(np.clip(cb, 0, 1).reshape(n, -1), 16), _hist(np.clip(cr, 0, 1).reshape(n, -1), 16),
                      hue_w / (hue_w.sum(1, keepdims=True) + 1e-6)]
    p = np.pad(b, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    res = (b - sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9).reshape(n, -1, 3)
    res = res - res.mean(1, keepdims=True)
    sd = res.std(1) + 1e-8
    corr = [(res[..., i] * res[..., j]).mean(1) / (sd[:, i] * sd[:, j]) for i, j in ((0, 1), (1, 2), (0, 2))]
    out["chroma"].append(np.stack(corr, 1))
    for c in range(3):
        out["cooccurrence_rgb"] += _cooccurrence(b[..., c] * 255)
    half = (b.reshape(n, h // 2, 2, w // 2, 2, 3).mean((2, 4)).mean(-1)) * 255
    out["multiscale"] += _cooccurrence(half)
    grey = b.mean(-1)
    gx, gy = grey[:, :, 1:] - grey[:, :, :-1], grey[:, 1:, :] - grey[:, :-1, :]
    mag = np.sqrt(gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2).reshape(n, -1)
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
           - grey[:, 1:-1, 2:]).reshape(n, -1)
    out["gradient"] += [_hist(np.clip(mag * 4, 0, 1 - 1e-6), 16), np.log(lap.var(1) + 1e-8)[:, None],
                        np.percentile(mag, [50, 90, 99], axis=1).T]
    return {k: np.concatenate(v, 1).astype(np.float32) for k, v in out.items()}


def all_features(images: np.ndarray, feature_set: str = "v1", chunk: int = 500) -> dict[str, np.ndarray]:
    def one(batch):
        f = features(batch)
        return f | extra_features(batch) if feature_set == "v2" else f
    parts = [one(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {g: np.concatenate([p[g] for p in parts]) for g in parts[0]}


def torch_features(images: np.ndarray, feature_set: str, chunk: int = 256) -> dict[str, np.ndarray]:
    """The statistics by group as fakeprint's models compute them (``models.stats.StatFeatures``; v3 adds the
    rich-model residual co-occurrences, ``srm``)."""
    import torch

    from fakeprint.models.stats import SIZES, StatFeatures
    from fakeprint.preprocess import to_float

    m = StatFeatures(feature_set, input_norm="none").eval()
    with torch.no_grad():
        f = torch.cat([m(to_float(torch.from_numpy(np.ascontiguousarray(images[i:i + chunk])))) for i in range(0, len(images), chunk)]).numpy()
    out, off = {}, 0
    for g in m.groups:
        out[g], off = f[:, off:off + SIZES[g]], off + SIZES[g]
    return out


CLASSIFIERS = {
    "gbm": "HistGradientBoostingClassifier(max_iter=400, learning_rate=0.08, max_leaf_nodes=31, "
           "l2_regularization=1.0, no early stopping)",
    "mlp": "StandardScaler + MLPClassifier(hidden (256,), alpha 0.01, 200 epochs of Adam, no early stopping)",
    "linear": "StandardScaler + LogisticRegression(C=0.1)",
    "head": "standardised, Linear(256)-ReLU-Dropout(0.2)-Linear as models.hybrid.StatHead, 30 epochs of AdamW "
            "(lr 2e-3 decaying linearly to 0, weight decay 0.05, batch 128, label smoothing 0.1), torch",
    "head2": "the same with two hidden layers of 512 and dropout 0.3 (the StatHead of hybrid_v4_h2_w32)",
}
HEAD_SHAPES = {"head": (256, 1, 0.2), "head2": (512, 2, 0.3)}  # hidden units, hidden layers, dropout


def fit_head(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray, seed: int, epochs: int = 30,
             shape: tuple[int, int, float] = HEAD_SHAPES["head"]) -> np.ndarray:
    """The statistics head's MLP (``shape``: hidden units, hidden layers, dropout) and recipe, fitted on fixed
    statistics (no augmentation): probabilities of x_va."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fakeprint.models.hybrid import mlp_layers

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy(((x_tr - mu) / sd).astype(np.float32))
    xv = torch.from_numpy(((x_va - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(np.asarray(y_tr, np.int64))
    hidden, layers, dropout = shape
    m = nn.Sequential(*mlp_layers(xt.shape[1], hidden, layers, dropout, int(yt.max()) + 1))
    opt = torch.optim.AdamW(m.parameters(), 2e-3, weight_decay=0.05)
    steps = epochs * -(-len(xt) // 128)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    m.train()
    for _ in range(epochs):
        for b in torch.randperm(len(xt), generator=g).split(128):
            loss = F.cross_entropy(m(xt[b]), yt[b], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    m.eval()
    with torch.no_grad():
        return m(xv).softmax(1).numpy()


def fit_score(x_tr, y_tr, x_va, seed: int, classifier: str = "gbm"):
    if classifier in HEAD_SHAPES:
        return fit_head(x_tr, y_tr, x_va, seed, shape=HEAD_SHAPES[classifier])
    import warnings

    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classifier == "gbm":
        m = HistGradientBoostingClassifier(max_iter=400, learning_rate=0.08, max_leaf_nodes=31,
                                           l2_regularization=1.0, early_stopping=False, random_state=seed)
    elif classifier == "mlp":
        m = make_pipeline(StandardScaler(), MLPClassifier((256,), alpha=1e-2, max_iter=200, random_state=seed))
    else:
        m = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a fixed number of epochs, by design
        m.fit(x_tr, y_tr)
    return m.predict_proba(x_va)


def summary(probs: np.ndarray, y: np.ndarray, shared: np.ndarray | None) -> dict:
    pred = probs.argmax(1)
    row = {"accuracy": round(float((pred == y).mean()), 4),
           "class4_recall": round(float((pred[y == 4] == 4).mean()), 4)}
    if shared is not None and shared.any():
        row["right_on_shared_errors"] = int((pred[shared] == y[shared]).sum())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--run", type=Path, required=True, help="a run folder whose split.csv defines the internal split")
    ap.add_argument("--shared", type=Path, help="shared-errors CSV (tools/shared_errors.py): images to count")
    ap.add_argument("--blend", nargs="*", default=[],
                    help="checkpoints or shipped names to blend with; A,B,C: the ensemble of those (mean probabilities)")
    ap.add_argument("--groups", action="store_true", help="also one model per feature group, and all but one")
    ap.add_argument("--feature-set", choices=("v1", "v2", "v3", "v4", "v5", "v6", "v7"), default="v1",
                    help="v1: the 539 statistics of the first probe; v2: v1 and per-channel co-occurrences, chroma, "
                         "half-resolution co-occurrences, gradients; v3: v2 and rich-model residual co-occurrences; "
                         "v4: v3 and colour-noise co-occurrences; v5: v4, the grey-level and colour-difference residuals "
                         "at one pixel and their local binary patterns; v6: v5 and pairs of neighbouring patterns "
                         "(v3-v6: computed as the models do, models.stats)")
    ap.add_argument("--torch", action="store_true", help="compute the statistics as the models do (models.stats; "
                    "always for v3-v6) instead of with this file's numpy")
    ap.add_argument("--evaluate-on", choices=("internal", "selection", "cv"), default="internal",
                    help="selection: fit on 90%% of the internal split's training part and score on the other 10%% "
                         "(stratified, --seed); cv: --folds stratified folds of the training part, each scored by a "
                         "model fitted on the others; both for choosing features without looking at the internal split")
    ap.add_argument("--folds", type=int, default=5, help="folds of --evaluate-on cv (default 5)")
    ap.add_argument("--classifier", choices=tuple(CLASSIFIERS), default="gbm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .md are written")
    args = ap.parse_args()

    import fakeprint
    from fakeprint.checkpoint import git_commit
    from fakeprint.data.cache import load_split
    from fakeprint.errors import FakeprintError

    split_csv = args.run / "split.csv"
    if not split_csv.is_file():
        raise SystemExit(f"error: {split_csv}: no split.csv (give a run folder of `fakeprint train`)")
    subset = {r["image_id"]: r["subset"] for r in csv.DictReader(split_csv.open())}
    data = load_split(args.data, "train", progress=False)
    missing = [i for i in data.ids if i not in subset]
    if missing:
        raise SystemExit(f"error: {split_csv}: {len(missing)} images of {args.data}/train.csv not in it, e.g. {missing[0]}")
    is_val = np.array([subset[i] != "train" for i in data.ids])
    y = np.asarray(data.labels)
    where = "the internal split (the run's split.csv); trained on its training part"
    if args.evaluate_on != "internal" and (args.shared or args.blend):
        raise SystemExit(f"error: --shared and --blend are about the internal split; not with --evaluate-on {args.evaluate_on}")
    fold = None  # --evaluate-on cv: each image's fold
    if args.evaluate_on == "cv":
        if not 2 <= args.folds <= 20:
            raise SystemExit(f"error: --folds must be 2 to 20, got {args.folds}")
        from fakeprint.errors import FakeprintError
        from fakeprint.label_issues import fold_indices

        rows = np.flatnonzero(~is_val)
        data, y = data.subset(rows), y[rows]
        try:
            splits = fold_indices(y, args.folds, args.seed)
        except FakeprintError as e:
            raise SystemExit(f"error: the internal split's training part: {e}") from None
        fold = np.zeros(len(y), np.int64)
        for k, (_, held) in enumerate(splits):
            fold[held] = k
        is_val = np.ones(len(y), bool)  # every image is scored once, by the model that did not see it
        where = (f"{args.folds}-fold cross-validation on the internal split's training part (stratified folds, seed "
                 f"{args.seed}; each image scored by a model fitted on the other folds); the internal split left out")
    elif args.evaluate_on == "selection":
        from fakeprint.data.dataset import stratified_split

        train_idx = np.flatnonzero(~is_val)
        fit, sel = stratified_split(y[train_idx], 0.1, args.seed)
        rows = np.sort(np.concatenate([train_idx[fit], train_idx[sel]]))
        is_val = np.isin(rows, train_idx[sel])
        data, y = data.subset(rows), y[rows]
        where = (f"a selection split: 10% of the internal split's training part (stratified, seed {args.seed}); "
                 "trained on the other 90%; the internal split left out")
    y_tr, y_va = y[~is_val], y[is_val]
    va_ids = [i for i, v in zip(data.ids, is_val, strict=True) if v]
    shared = None
    if args.shared:
        ids = {r["image_id"] for r in csv.DictReader(args.shared.open())}
        shared = np.array([i in ids for i in va_ids])

    t0 = time.perf_counter()
    engine = "torch (models.stats)" if args.torch or args.feature_set not in ("v1", "v2") else "numpy (this file)"
    if engine.startswith("torch"):
        feats = torch_features(np.asarray(data.images), args.feature_set)
    else:
        feats = all_features(np.asarray(data.images), args.feature_set)
    groups = tuple(feats)
    t_feat = time.perf_counter() - t0
    sizes = {g: int(f.shape[1]) for g, f in feats.items()}
    print(f"features: {sum(sizes.values())} per image ({sizes}) in {t_feat:.0f} s", flush=True)

    def run(groups: tuple[str, ...]) -> np.ndarray:
        x = np.concatenate([feats[g] for g in groups], 1)
        if fold is None:
            return fit_score(x[~is_val], y_tr, x[is_val], args.seed, args.classifier)
        probs = np.zeros((len(y), int(y.max()) + 1))
        for k in range(args.folds):
            probs[fold == k] = fit_score(x[fold != k], y[fold != k], x[fold == k], args.seed + k, args.classifier)
        return probs

    t0 = time.perf_counter()
    probs = run(groups)
    rows = {"all features": {**summary(probs, y_va, shared), "seconds": round(time.perf_counter() - t0)}}
    if fold is not None:
        rows["all features"]["fold_accuracy"] = [round(float((probs[fold == k].argmax(1) == y[fold == k]).mean()), 4)
                                                 for k in range(args.folds)]
    print("all features", rows["all features"], flush=True)
    if args.groups:
        for g in groups:
            rows[f"only {g}"] = summary(run((g,)), y_va, shared)
            rows[f"all but {g}"] = summary(run(tuple(x for x in groups if x != g)), y_va, shared)
            print(g, rows[f"only {g}"], rows[f"all but {g}"], flush=True)

    blends = {}
    if args.blend:
        from fakeprint.data.cache import SplitData
        from fakeprint.predict import EnsembleClassifier

        held = data.subset(np.where(is_val)[0], name="internal")
        assert isinstance(held, SplitData)
        for b in args.blend:
            try:
                parts = [fakeprint.load(x) for x in b.split(",")]
                clf = parts[0] if len(parts) == 1 else EnsembleClassifier(parts)
            except FakeprintError as e:
                raise SystemExit(f"error: {e}") from None
            p_cnn = clf.predict(held.images).probs
            entry = {"alone": summary(p_cnn, y_va, shared)}
            for w in BLEND_WEIGHTS:
                arith = (1 - w) * p_cnn + w * probs
                geo = np.exp((1 - w) * np.log(p_cnn + 1e-9) + w * np.log(probs + 1e-9))
                entry[f"w={w} arithmetic"] = summary(arith, y_va, shared)
                entry[f"w={w} geometric"] = summary(geo, y_va, shared)
            blends[str(b)] = entry
            print(b, entry, flush=True)

    report = {
        "what": f"{CLASSIFIERS[args.classifier]} on hand-made statistics", "classifier": args.classifier,
        "split": where, "feature_set": args.feature_set, "engine": engine,
        "n_train": int((~is_val).sum() if fold is None else (fold != 0).sum()), "n_scored": int(is_val.sum()),
        "shared_errors": None if shared is None else {"file": str(args.shared), "n": int(shared.sum())},
        "features": sizes, "feature_seconds": round(t_feat), "commit": git_commit(), "seed": args.seed,
        "models": rows, "blends": {"weights": "w = the feature model's share; every weight shown, none chosen",
                                   **blends},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Hand-made statistics (feature set {args.feature_set}, computed with {engine}), {args.classifier}", "",
             f"Classifier: {CLASSIFIERS[args.classifier]}.", "",
             f"Scored on {where} ({report['n_train']} images trained on{' per fold' if fold is not None else ''}, "
             f"{report['n_scored']} scored); "
             "last iteration, nothing chosen on the split scored.", "",
             "| model | accuracy | class-4 recall | right on the shared errors |", "| --- | ---: | ---: | ---: |"]
    n_sh = "" if shared is None else f" (of {int(shared.sum())})"
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['class4_recall']:.3f} | "
                     f"{r.get('right_on_shared_errors', '')}{n_sh} |")
    if fold is not None:
        lines += ["", "Accuracy of each fold (all features): "
                  + ", ".join(f"{100 * a:.2f}%" for a in rows["all features"]["fold_accuracy"]) + "."]
    for b, entry in blends.items():
        lines += ["", f"Blends with `{b}` (w = the feature model's share of the probabilities):", "",
                  "| blend | accuracy | class-4 recall | right on the shared errors |", "| --- | ---: | ---: | ---: |"]
        for name, r in entry.items():
            lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['class4_recall']:.3f} | "
                         f"{r.get('right_on_shared_errors', '')} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
