"""`fakeprint models`: the registered models with their parameter counts."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("models", help="list the registered models with their parameter counts")
    s.set_defaults(fn=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from fakeprint.models import count_parameters, create_model, describe, list_models

    print(f"{'model':<26}{'parameters':>12}{'trainable':>12}  description")
    for name in list_models():
        m = create_model(name)
        print(f"{name:<26}{count_parameters(m):>12,}{count_parameters(m, True):>12,}  {describe(name)}")
    return 0
