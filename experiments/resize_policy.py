"""Issue 38, item 3: how should an image that is not 100x100 be brought to the model's input? Measured on the
internal split with the robustness suite's real re-encodes (features.perturb), for each candidate policy of the
decode step, with the shipped models.

    python experiments/resize_policy.py --data data/unibuc-deepfake --out benchmarks/results/resize_policy-cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fakeprint.core.versions import git_commit, versions
from fakeprint.data.dataset import decode_reduced, upright
from fakeprint.engine.evaluate import load_eval_split
from fakeprint.engine.predict import load
from fakeprint.features.perturb import parse, perturb_file
from fakeprint.models.checkpoint import resolve_checkpoint
from fakeprint.studies.common import scores
from fakeprint.studies.recipes import machine

R = Image.Resampling
POLICIES = {
    "bilinear (today)": lambda im: im.resize((100, 100), R.BILINEAR),
    "bicubic": lambda im: im.resize((100, 100), R.BICUBIC),
    "lanczos": lambda im: im.resize((100, 100), R.LANCZOS),
    "box down, bicubic up": lambda im: im.resize((100, 100), R.BOX if min(im.size) >= 100 else R.BICUBIC),
    "centre crop when larger, bicubic up": lambda im: (
        im.crop(((im.width - 100) // 2, (im.height - 100) // 2, (im.width - 100) // 2 + 100,
                 (im.height - 100) // 2 + 100)) if min(im.size) >= 100 else im.resize((100, 100), R.BICUBIC)),
}
SPECS = ("resize:s=0.75", "resize:s=0.5", "resize:s=1.5", "resize:s=2", "crop:f=0.9", "crop:f=0.8",
         "resize:s=0.75,filter=lanczos", "resize:s=2,filter=nearest")


def decode(data: bytes, policy) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        decode_reduced(im)
        im.load()
        im = upright(im).convert("RGB")
        if im.size != (100, 100):
            im = policy(im)
        return np.asarray(im, dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--models", default="default,fast")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results, t0 = [], time.perf_counter()
    for name in args.models.split(","):
        clf = load(name)
        ds = load_eval_split(args.data, "internal", resolve_checkpoint(name), progress=False)
        for spec in SPECS:
            steps = parse(spec)
            base = zlib.crc32(spec.encode())
            files = [perturb_file(im, steps, seed=base + i) for i, im in enumerate(ds.images)]
            for pname, policy in POLICIES.items():
                x = np.stack([decode(f, policy) for f in files])
                s = scores(ds.labels, clf.predict(x).labels)
                results.append({"model": name, "spec": spec, "policy": pname, "accuracy": s["accuracy"],
                                "class4_recall": s["class4_recall"]})
                print(f"{name:8s} {spec:30s} {pname:38s} {s['accuracy'] * 100:6.2f}%", flush=True)
    out = {"what": "accuracy on the internal split (1,250 images, never trained on; the shipped models' last "
                   "epoch, their flip TTA) after each perturbation, for each policy of bringing the decoded file "
                   "to 100x100", "machine": machine() + (", AVX-512 BF16 and AMX" if "amx_bf16" in Path("/proc/cpuinfo").read_text() else ", no bf16"), "commit": git_commit(),
           "versions": versions(), "seconds": time.perf_counter() - t0, "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
