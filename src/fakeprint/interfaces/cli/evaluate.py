"""`fakeprint evaluate`: accuracy, confusion matrix and classification report of checkpoints."""

from __future__ import annotations

import argparse
import json

from fakeprint.interfaces.cli.common import add_tta


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="accuracy, confusion matrix and classification report of a checkpoint")
    s.add_argument("checkpoint", nargs="+", help="a checkpoint, or several: their probabilities are averaged (or a shipped model: default, accurate, fast, robust)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default=None, choices=("internal", "validation", "train"),
                   help="internal (the run's held-out images in its split.csv), validation or train; default: "
                        "internal when the run held images out, else validation (as analyze)")
    s.add_argument("--out", default=None, help="folder for metrics.json, report.md, confusion_matrix.png (default: "
                   "eval-SPLIT beside the checkpoint; for several checkpoints, ./eval-SPLIT-ensemble-of-N)")
    add_tta(s)
    s.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the text report")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.set_defaults(fn=_cmd_evaluate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fakeprint.engine.evaluate import default_split, evaluate_checkpoint

    ckpts = args.checkpoint
    args.split = args.split or default_split(ckpts[0])
    from fakeprint.models.checkpoint import results_dir

    out = args.out or str(results_dir(ckpts, f"eval-{args.split}"))
    m = evaluate_checkpoint(ckpts if len(ckpts) > 1 else ckpts[0], args.data, args.split, out, tta=args.tta,
                            device=args.device)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "text"} | {"out": str(out)}, indent=2))
    else:
        print(m["text"])
        print(f"wrote {out}/metrics.json, {out}/report.md, {out}/confusion_matrix.png")
    return 0
