"""`fakeprint route`: a routed ensemble, one model for pristine files and another for re-encoded ones."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("route", help="route pristine files to one model and perturbed ones to another",
                       description="Fit a file detector (a logistic regression on the image statistics) on training "
                                   "images outside the models' internal split and a perturbed copy of each, and write "
                                   "an ensemble file that sends every image the detector calls pristine to PRISTINE "
                                   "and every other to PERTURBED. load, predict, evaluate, robustness and serve take "
                                   "the file as one model.")
    s.add_argument("pristine", help="the model for files as their generator wrote them (e.g. default)")
    s.add_argument("perturbed", help="the model for re-encoded, resized, cropped or blurred files (e.g. robust)")
    s.add_argument("--data", required=True, help="the dataset the models trained on")
    s.add_argument("--out", required=True, metavar="NAME.ensemble.json", help="the ensemble file to write (its "
                   "detector goes beside it, NAME.router.safetensors)")
    s.add_argument("--images", type=int, default=3000, help="training images to fit on, each with one perturbed "
                   "copy (default 3000)")
    s.add_argument("--threshold", type=float, default=0.5,
                   help="P(perturbed) from which an image goes to PERTURBED (default 0.5)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_route)


def _cmd_route(args: argparse.Namespace) -> int:
    from fakeprint.engine.routing import fit_router

    route = fit_router(args.pristine, args.perturbed, args.data, args.out, images=args.images,
                       threshold=args.threshold, seed=args.seed)
    print(json.dumps(route, indent=2))
    return 0
