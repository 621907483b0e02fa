"""`fakeprint export` (placeholder until implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Not implemented yet: registers nothing."""
