"""The ``fakeprint`` command line: one module per command in this folder, each with ``register(subparsers)``
that adds its parser and sets ``fn`` (which takes the parsed args and returns an exit code). Imports inside ``fn``
keep ``fakeprint --help`` fast. Every user mistake ends in one clear message and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from fakeprint.core.errors import FakeprintError
from fakeprint.core.versions import __version__

# in the order ``fakeprint --help`` lists them
COMMANDS = ("demo", "models", "data_check", "train", "evaluate", "predict", "calibrate", "route", "export", "serve", "study",
            "analyze", "robustness", "label_issues")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fakeprint", description="Tell which image generator made an image.")
    p.add_argument("--version", action="version", version=f"fakeprint {__version__}")
    p.add_argument("--follow-external-links", action="store_true",
                   help="read dataset images that are symbolic links to files outside the dataset folder "
                        "(refused by default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"fakeprint.interfaces.cli.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.follow_external_links:
        from fakeprint.data.dataset import LINKS_ENV

        os.environ[LINKS_ENV] = "1"  # read by data.dataset.index_images (and inherited by worker processes)
    try:
        return int(args.fn(args) or 0)
    except FakeprintError as e:
        print(f"fakeprint: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fakeprint: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
