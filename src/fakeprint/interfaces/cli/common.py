"""Options several commands share."""

from __future__ import annotations

import argparse


def add_tta(s: argparse.ArgumentParser) -> None:
    """``--tta [MODE]`` and ``--no-tta``: by default the test-time augmentation recorded in the checkpoint."""
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tta", nargs="?", const="flip", default=None, choices=("none", "flip", "dihedral"),
                   help="test-time augmentation: none, flip (the image and its mirror; the value of a bare --tta) "
                        "or dihedral (8 flips and quarter turns); default: the one the checkpoint's figures used")
    g.add_argument("--no-tta", dest="tta", action="store_const", const="none",
                   help="no test-time augmentation, whatever the checkpoint says")
