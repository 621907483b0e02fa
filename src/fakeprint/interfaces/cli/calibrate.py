"""`fakeprint calibrate`: temperature scaling and the uncertain flag, fitted on held-out images."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("calibrate", help="fit temperature scaling and the uncertain flag on held-out images",
                       description="Fit a temperature and an uncertain-flag threshold (the 5th percentile of the top "
                                   "probability) on a held-out split, store them in the checkpoint's metadata, and print "
                                   "the calibration error before and after (cross-fitted) and the share of plain-colour, "
                                   "noise and synthetic images flagged. Training does this for the last checkpoint.")
    s.add_argument("checkpoint", help="a run folder or NAME.safetensors (or a shipped model: default, accurate, fast, robust)")
    s.add_argument("--data", required=True, help="the dataset the run trained on")
    s.add_argument("--split", default="internal", choices=("internal", "validation"),
                   help="held-out images to fit on (default internal: the run's split.csv)")
    s.add_argument("--perturbed", default=None, metavar="SUITE",
                   help="fit on perturbed copies too (a robustness suite: quick, default, or specs separated by ';'), "
                        "so that the flag holds on re-encoded, resized or cropped files")
    s.add_argument("--max-clean-flagged", type=float, default=0.10,
                   help="with --perturbed: the share of clean held-out images the flag may take (default 0.10)")
    s.set_defaults(fn=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from fakeprint.engine.calibration import calibrate_checkpoint

    cal = calibrate_checkpoint(args.checkpoint, args.data, args.split, perturbed=args.perturbed,
                               max_clean_flagged=args.max_clean_flagged)
    print(json.dumps(cal, indent=2))
    return 0
