"""Issue 38 probe: can the image statistics tell a pristine file from a re-encoded, resized, cropped or blurred one,
well enough to send pristine images to `default` and the rest to `robust`? Internal split only for scoring.

    python experiments/router_probe.py --data data/unibuc-deepfake --out /tmp/router_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from fakeprint.data.cache import load_split
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load
from fakeprint.features.file_augment import random_spec
from fakeprint.features.perturb import decoded_copies, perturbed_images, suite
from fakeprint.features.statistics import StatFeatures
from fakeprint.models.checkpoint import resolve_checkpoint


def stats(sf: StatFeatures, images: np.ndarray) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(images), 256):
            x = torch.from_numpy(images[s:s + 256]).permute(0, 3, 1, 2).float() / 255
            out.append(sf(x).numpy())
    return np.concatenate(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--feature-set", default="v4")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    full = load_split(args.data, "train", progress=False)
    held = load_eval_split(args.data, "internal", resolve_checkpoint("default"), progress=False)
    held_ids = set(held.ids)
    train_idx = np.array([i for i, k in enumerate(full.ids) if k not in held_ids])
    rng = np.random.default_rng(0)
    pick = rng.choice(train_idx, args.n, replace=False)
    clean = full.images[pick]
    specs = [random_spec(rng) for _ in range(args.n)]
    pert = decoded_copies(clean, specs, [int(s) for s in rng.integers(0, 2**31 - 1, args.n)])
    sf = StatFeatures(args.feature_set, "none").eval()
    X = np.concatenate([stats(sf, clean), stats(sf, pert)])
    y = np.r_[np.zeros(args.n), np.ones(args.n)]
    print(f"train features {X.shape} in {time.perf_counter() - t0:.0f} s", flush=True)
    scaler = StandardScaler().fit(X)
    det = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(X), y)
    print(f"fitted in {time.perf_counter() - t0:.0f} s; train acc {det.score(scaler.transform(X), y):.4f}", flush=True)
    d, r = load("default"), load("robust")
    rows = []
    for spec in suite(args.suite):
        imgs = held.images if spec == "none" else perturbed_images(held.images, spec)
        p_pert = det.predict_proba(scaler.transform(stats(sf, imgs)))[:, 1]
        pd, pr = d.predict(imgs).probs, r.predict(imgs).probs
        row = {"spec": spec, "default": float((pd.argmax(1) == held.labels).mean()),
               "robust": float((pr.argmax(1) == held.labels).mean()), "sent_to_robust": {}, "routed": {}}
        for th in (0.1, 0.3, 0.5, 0.7, 0.9):
            to_r = p_pert >= th
            pred = np.where(to_r, pr.argmax(1), pd.argmax(1))
            row["sent_to_robust"][th] = float(to_r.mean())
            row["routed"][th] = float((pred == held.labels).mean())
        soft = (1 - p_pert[:, None]) * pd + p_pert[:, None] * pr
        row["soft"] = float((soft.argmax(1) == held.labels).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "n_train": args.n, "seconds": time.perf_counter() - t0}, indent=1))


if __name__ == "__main__":
    main()
