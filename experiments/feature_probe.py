"""A different family: hand-made image statistics and gradient boosting, judged on the internal split.

    python experiments/feature_probe.py --data data/unibuc-deepfake --run runs/cpu6/w32_s1 \
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

``--feature-set v3`` (and any set with ``--torch``) computes the statistics with ``fakeprint.features.statistics`` as the
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
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from feature_oracle import all_features  # noqa: E402  (the numpy oracle lives beside its tests)

BLEND_WEIGHTS = (0.2, 0.3, 0.4, 0.5)


def torch_features(images: np.ndarray, feature_set: str, chunk: int = 256) -> dict[str, np.ndarray]:
    """The statistics by group as fakeprint's models compute them (``models.stats.StatFeatures``; v3 adds the
    rich-model residual co-occurrences, ``srm``)."""
    import torch

    from fakeprint.features.preprocess import to_float
    from fakeprint.features.statistics import SIZES, StatFeatures

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
    ap.add_argument("--shared", type=Path, help="shared-errors CSV (experiments/shared_errors.py): images to count")
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
    from fakeprint.core.errors import FakeprintError
    from fakeprint.core.versions import git_commit
    from fakeprint.data.cache import load_split

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
        from fakeprint.core.errors import FakeprintError
        from fakeprint.studies.label_issues import fold_indices

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
        from fakeprint.engine.predict import EnsembleClassifier

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
