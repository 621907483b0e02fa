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
    s.add_argument("checkpoint", nargs="+",
                   help="a run folder or NAME.safetensors (or a shipped model: default, accurate, fast, robust); several: "
                        "their ensemble, whose calibration goes into the ensemble file --out; a routed ensemble file "
                        "(fakeprint route): the flag of its perturbed route, fitted on --perturbed copies (default "
                        "quick) and written into that file")
    s.add_argument("--data", required=True, help="the dataset the run trained on")
    s.add_argument("--split", default="internal", choices=("internal", "validation"),
                   help="held-out images to fit on (default internal: the run's split.csv)")
    s.add_argument("--perturbed", default=None, metavar="SUITE",
                   help="fit on perturbed copies too (a robustness suite: quick, default, or specs separated by ';'), "
                        "so that the flag holds on re-encoded, resized or cropped files")
    s.add_argument("--max-clean-flagged", type=float, default=0.10,
                   help="with --perturbed: the share of clean held-out images the flag may take (default 0.10)")
    s.add_argument("--wrong-flagged", type=float, default=None,
                   help="a routed ensemble: the share of wrong answers on the perturbed copies its perturbed route's "
                        "flag must take (default 0.75)")
    s.add_argument("--out", default=None, metavar="NAME.ensemble.json",
                   help="for several models: the ensemble file to write (members and the calibration of their "
                        "average); load, predict, evaluate, robustness and serve take it as one model")
    s.set_defaults(fn=_cmd_calibrate)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from fakeprint.core.errors import FakeprintError
    from fakeprint.engine.calibration import calibrate_checkpoint, calibrate_ensemble
    from fakeprint.models.ensemble_file import SUFFIX

    if len(args.checkpoint) == 1 and _is_routed(args.checkpoint[0]):
        from fakeprint.engine.routing import WRONG_FLAGGED, calibrate_route

        if args.out:
            raise FakeprintError("a routed ensemble's flag is written into its own file: drop --out")
        fit = calibrate_route(args.checkpoint[0], args.data, args.split, args.perturbed or "quick",
                              WRONG_FLAGGED if args.wrong_flagged is None else args.wrong_flagged)
        print(json.dumps(fit, indent=2))
        return 0
    if args.wrong_flagged is not None:
        raise FakeprintError("--wrong-flagged is for a routed ensemble's file (fakeprint route writes one)")
    if len(args.checkpoint) > 1:
        if not args.out or not args.out.endswith(SUFFIX):
            raise FakeprintError(f"several models are calibrated as an ensemble: name the file to write with "
                                 f"--out NAME{SUFFIX}")
        cal = calibrate_ensemble(args.checkpoint, args.data, args.out, args.split, perturbed=args.perturbed,
                                 max_clean_flagged=args.max_clean_flagged)
        print(json.dumps(cal, indent=2))
        return 0
    if args.out:
        raise FakeprintError("--out names an ensemble's file: give two or more models (one model's calibration is "
                             "stored in its checkpoint)")
    cal = calibrate_checkpoint(args.checkpoint[0], args.data, args.split, perturbed=args.perturbed,
                               max_clean_flagged=args.max_clean_flagged)
    print(json.dumps(cal, indent=2))
    return 0


def _is_routed(path: str) -> bool:
    from fakeprint.models.ensemble_file import is_ensemble_path, read_ensemble_file

    return is_ensemble_path(path) and read_ensemble_file(path)[2] is not None
