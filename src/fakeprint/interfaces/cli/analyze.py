"""`fakeprint analyze CKPT --data DIR --split S [--out DIR]`: per-class errors, mistakes, spectra, calibration."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "analyze", help="error analysis of a checkpoint: per-class errors, worst mistakes, spectra, calibration",
        description="Write an analysis folder: analysis.md/.json (per-class precision and recall, most-confused "
                    "pairs, calibration), mistakes.png, spectra.png (mean Fourier spectrum per class), "
                    "calibration.png and the evaluation files.")
    s.add_argument("checkpoint", help="a run folder or a .safetensors checkpoint (or a shipped model: default, accurate, fast, robust)")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--split", default=None, choices=("internal", "validation", "train"),
                   help="internal (the training run's held-out part), validation or train; default: internal when "
                        "the run held images out, else validation (as evaluate)")
    s.add_argument("--out", default=None, help="analysis folder (default: analysis-SPLIT beside the checkpoint)")
    s.add_argument("--top", type=int, default=16, help="mistakes in the gallery (default 16)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=_cmd_analyze)


def _cmd_analyze(args: argparse.Namespace) -> int:
    from fakeprint.engine.evaluate import default_split
    from fakeprint.reports.analyze import analyze

    split = args.split or default_split(args.checkpoint)
    r = analyze(args.checkpoint, args.data, split, args.out, device=args.device, top=args.top)
    weakest = min(r["per_class"], key=lambda c: c["recall"])
    print(f"{r['split']} split, {r['n']} images: accuracy {r['accuracy'] * 100:.2f}%, weakest class "
          f"{weakest['class']} (recall {weakest['recall']:.3f}), ECE {r['calibration']['ece']:.4f}")
    print(f"wrote {r['out']}/analysis.md (and analysis.json, mistakes.png, spectra.png, calibration.png)")
    return 0
