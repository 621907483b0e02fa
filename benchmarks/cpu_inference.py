"""Batched CPU inference throughput of a model (default: the one shipped in the package).

    python benchmarks/cpu_inference.py [--checkpoint RUN|default|accurate ...] [--backend torch|torch-plain|onnx]
        [--tta] [--images 2048] [--batch-size 256] [--micro-batch N] [--threads 2] [--data DIR [--perturbed-share 0.5]]

Times ``Classifier.predict`` on uint8 images already in memory (decoding excluded; that is the data
path's job), after one warm-up batch, and prints one JSON object (environment header, images/s).
``torch`` is what every command runs (``Classifier.inference_model``: BatchNorms folded, channels-last,
``--batch-size`` images at a time through the network in slices that fit the CPU's cache,
``inference.cpu_micro_batch``; ``--micro-batch 0``: whole batches, as before the slicing); ``torch-plain`` the
network as trained, in NCHW, whole batches (what fakeprint ran before the fusion), for comparison. Several
``--checkpoint``: their ensemble as ``fakeprint predict A B C`` runs it (``torch`` only). The images are uniform
noise unless ``--data`` names a dataset folder: then its training images, a share of them perturbed as users' files
are (a routed model then sends them to both members, as it would in use).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakeprint  # noqa: E402
from _common import emit, environment  # noqa: E402
from fakeprint.data.dataset import portable_path  # noqa: E402


def inputs(n: int, data: str | None, perturbed_share: float) -> tuple[np.ndarray, str]:
    """``n`` uint8 images to time and what they are: uniform noise, or real images, some of them perturbed."""
    if data is None:
        return np.random.default_rng(0).integers(0, 256, (n, 100, 100, 3), dtype=np.uint8), "uniform noise"
    from fakeprint.data.cache import load_split
    from fakeprint.features.perturb import decoded_copies, suite

    split = load_split(Path(data), "train", progress=False)
    x = np.ascontiguousarray(split.images[np.arange(n) % len(split.images)])
    k = int(round(n * perturbed_share))
    specs = [s for s in suite("default") if s != "none"]
    if k:
        x[:k] = decoded_copies(x[:k], [specs[i % len(specs)] for i in range(k)], list(range(k)))
    rng = np.random.default_rng(0)
    x = x[rng.permutation(n)]  # perturbed and pristine files mixed in every batch
    return x, (f"the first {n} images of {Path(data).name}'s training split, {k} of them perturbed "
               f"(the default robustness suite's {len(specs)} specs in turn)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=None,
                    help="default: the shipped model; repeat it for an ensemble (torch backend)")
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--backend", default="torch", choices=("torch", "torch-plain", "onnx"),
                    help="onnx: onnxruntime on the checkpoint exported in memory")
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="torch: images per forward pass (default: inference.cpu_micro_batch; 0: the whole batch)")
    ap.add_argument("--data", default=None,
                    help="time real images: the first --images of DIR's training split (default: uniform noise)")
    ap.add_argument("--perturbed-share", type=float, default=0.5,
                    help="with --data: this share of them re-encoded, resized, cropped or blurred by the robustness "
                         "suite's specs in turn (real encoders), so that a routed model routes both ways (default 0.5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpts = args.checkpoint or [None]
    if len(ckpts) > 1 and args.backend != "torch":
        ap.error("an ensemble (several --checkpoint) is measured with --backend torch only")
    if args.backend == "onnx":
        from fakeprint.engine.onnx import load_backend

        clf = load_backend(ckpts[0] or "default", "onnx", "cpu")
    else:
        clf = fakeprint.load(ckpts)  # one checkpoint (None: the shipped model) or several: their ensemble
        for member in getattr(clf, "members", [clf]):
            member.micro_batch = args.micro_batch
        if args.backend == "torch-plain":
            from fakeprint.engine.runtime import predict_logits

            clf.logits = lambda images, tta, batch_size=256: predict_logits(  # the unfused network, NCHW, whole batches
                clf.model, images, clf.device, batch_size=batch_size, norm=clf.normalize, tta=tta, micro_batch=0)
    if not 0.0 <= args.perturbed_share <= 1.0:
        ap.error("--perturbed-share must be between 0 and 1")
    x, source = inputs(args.images, args.data, args.perturbed_share)
    clf.predict(x[: args.batch_size], batch_size=args.batch_size, tta=args.tta)
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        clf.predict(x, batch_size=args.batch_size, tta=args.tta)
        rates.append(args.images / (time.perf_counter() - t0))
    result = {"benchmark": "cpu_inference", "environment": environment(torch.device("cpu")),
              "model": clf.name, "checkpoint": portable_path(clf.path) if clf.path else
              ckpts[0] if len(ckpts) == 1 else ckpts,
              "backend": args.backend, "images": args.images, "batch_size": args.batch_size,
              "micro_batch": None if args.backend == "onnx" else
              0 if args.backend == "torch-plain" else args.micro_batch if args.micro_batch is not None else "auto",
              "tta": args.tta, "input": source, "images_per_s": {"median": float(np.median(rates)), "all": rates}}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
