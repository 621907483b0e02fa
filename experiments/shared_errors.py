"""Which held-out images do all of several models get wrong? The errors a family of models shares.

    python experiments/shared_errors.py --data data/unibuc-deepfake RUN [RUN ...] --out benchmarks/results/NAME

Every RUN (a run folder or checkpoint; all with the same internal split) predicts the internal split with its
own test-time augmentation. Writes ``NAME.json`` (each model's accuracy, how many images k of the models get
wrong for every k, the ensemble's accuracy, the "oracle" share that at least one model gets right) and
``NAME.csv`` (``image_id,label,predicted,models_wrong,same_wrong_label`` for the images every model gets wrong:
image ids only, no pixels). An ensemble can only fix what its members disagree on; images that every member
gets wrong, with the same wrong label, are either beyond the family or mislabelled (``fakeprint label-issues``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="path without suffix: .json and .csv are written")
    args = ap.parse_args()

    import fakeprint
    from fakeprint.core.errors import FakeprintError
    from fakeprint.core.versions import git_commit
    from fakeprint.engine.evaluate import load_eval_split
    from fakeprint.models.checkpoint import resolve_checkpoint

    ckpts = [resolve_checkpoint(r) for r in args.runs]
    held = load_eval_split(args.data, "internal", ckpts[0], progress=False)
    labels, probs = [], []
    for c in ckpts:
        if load_eval_split(args.data, "internal", c, progress=False).ids != held.ids:
            raise FakeprintError(f"{c}: a different internal split from {ckpts[0]}")
        pred = fakeprint.load(c).predict(held.images)
        labels.append(pred.labels)
        probs.append(pred.probs)
        print(f"{c}: {100 * (pred.labels == held.labels).mean():.2f}%", flush=True)
    pred_all, y = np.stack(labels), held.labels
    n_wrong = (pred_all != y[None]).sum(0)
    every = np.where(n_wrong == len(ckpts))[0]
    same = [len(set(pred_all[:, i].tolist())) == 1 for i in every]
    report = {
        "split": "internal split (the runs' split.csv)", "n": int(len(y)),
        "commit": git_commit(),  # each model as named on the command line (a shipped name, a run folder): no machine paths
        "models": {str(r): float((p == y).mean()) for r, p in zip(args.runs, labels, strict=True)},
        "images_wrong_by_k_models": np.bincount(n_wrong, minlength=len(ckpts) + 1).tolist(),
        "wrong_by_every_model": int(len(every)),
        "wrong_by_every_model_per_class": np.bincount(y[every], minlength=5).tolist(),
        "wrong_by_every_model_with_the_same_label": int(sum(same)),
        "ensemble_accuracy": float((np.mean(probs, 0).argmax(1) == y).mean()),
        "oracle_accuracy": float((n_wrong < len(ckpts)).mean()),
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "label", "predicted", "models_wrong", "same_wrong_label"])
        for i, s in zip(every, same, strict=True):
            values, counts = np.unique(pred_all[:, i], return_counts=True)
            w.writerow([held.ids[i], int(y[i]), int(values[counts.argmax()]), int(n_wrong[i]), s])
    print(json.dumps({k: v for k, v in report.items() if k != "models"}, indent=1))


if __name__ == "__main__":
    from fakeprint.core.errors import FakeprintError

    try:
        main()
    except FakeprintError as e:  # a user's mistake (a missing run, another split): one line, no traceback
        raise SystemExit(f"error: {e}") from None
