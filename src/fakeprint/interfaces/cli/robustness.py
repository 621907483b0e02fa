"""`fakeprint robustness MODEL [MODEL ...] --data DIR`: accuracy after each perturbation of the image files."""

from __future__ import annotations

import argparse
import json
import sys

from fakeprint.interfaces.cli.common import add_tta


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "robustness", help="accuracy, class-4 recall, uncertain share and calibration after each perturbation",
        description="Re-encode every image of a labelled split as a user would have it (JPEG, WebP, resizing, "
                    "crops, blur, noise, chains of them; real encoders, seeded), read each file back through "
                    "fakeprint's decode path, and score the model on it. Writes robustness.md, robustness.json "
                    "and robustness.png. Specs: KIND[:key=value,...] joined by '+', e.g. jpeg:q=75,sub=444, "
                    "resize:s=0.75,filter=lanczos, crop:f=0.9+webp:q=80 (docs/ROBUSTNESS.md).")
    s.add_argument("checkpoint", nargs="+", help="a run folder, checkpoint, MODEL.onnx or shipped model name "
                                                 "(several: their ensemble)")
    s.add_argument("--data", required=True, help="dataset folder")
    s.add_argument("--split", default="internal", choices=("internal", "validation", "train"),
                   help="internal (default: the run's held-out images), validation or train")
    s.add_argument("--suite", default="default",
                   help="default (31 perturbations), quick (8), or specs separated by ';'")
    s.add_argument("--seed", type=int, default=0, help="seed of the random parts (noise), default 0")
    s.add_argument("--out", default=None, help="folder for the report (default robustness-SPLIT beside the run)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    add_tta(s)
    s.set_defaults(fn=_cmd_robustness)


def _cmd_robustness(args: argparse.Namespace) -> int:
    from fakeprint.features.perturb import suite
    from fakeprint.studies.robustness import robustness_markdown, run_robustness

    suite(args.suite)  # a bad spec fails before any model is loaded
    r = run_robustness(args.checkpoint, args.data, args.split, args.suite, args.out, args.seed, args.tta,
                       args.device, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(robustness_markdown(r))
        print(f"wrote {r['out']}/robustness.md, robustness.json, robustness.png", file=sys.stderr)
    return 0
