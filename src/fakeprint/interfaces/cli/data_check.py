"""`fakeprint data check DIR`: a dataset's layout, classes, images and every problem found."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("data", help="dataset tools")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="report a dataset's layout, classes, images and every problem found")
    c.add_argument("dir")
    c.add_argument("--no-decode", action="store_true", help="skip opening every image")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_cmd_data_check)


def _cmd_data_check(args: argparse.Namespace) -> int:
    from fakeprint.data.dataset import check_dataset

    report, problems = check_dataset(Path(args.dir), decode=not args.no_decode)
    if args.json:
        print(json.dumps(report | {"problems": [str(p) for p in problems]}, indent=2))
    else:
        print(f"dataset {report['root']}")
        for split, info in report["splits"].items():
            print(f"  {split}: {info['images']} images")
            if "class_counts" in info:
                print("    classes: " + ", ".join(f"{k}: {v}" for k, v in info["class_counts"].items()))
            if info.get("sizes"):
                print("    sizes: " + ", ".join(f"{k} ({v})" for k, v in info["sizes"].items()))
                print("    modes: " + ", ".join(f"{k} ({v})" for k, v in info["modes"].items()))
                print("    formats: " + ", ".join(f"{k} ({v})" for k, v in info["formats"].items()))
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        if problems:
            print(f"{len(problems)} problem(s):", file=sys.stderr)
            for p in problems:
                print(f"  {p}", file=sys.stderr)
        else:
            print("no problems found")
    return 1 if problems else 0
