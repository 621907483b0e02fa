"""`fakeprint train`: train a preset (``--set`` overrides, ``--resume``, ``--list-presets``)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from fakeprint.core.errors import FakeprintError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("train", help="train a model (a preset and key=value overrides)")
    s.add_argument("--data", help="dataset folder (train.csv + train/ ...)")
    s.add_argument("--config", default=None, help="a YAML preset file or a shipped preset name")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--out", help="run folder to create")
    s.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last resume point, with its "
                                                   "own config (no --config/--set beside it)")
    s.add_argument("--list-presets", action="store_true", help="list the shipped presets, one line each, and exit")
    s.add_argument("--on-bad-image", choices=("error", "skip"), default=None,
                   help="unreadable or missing images: refuse the dataset (default) or skip and list them")
    s.set_defaults(fn=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from fakeprint.engine.config import load_config
    from fakeprint.engine.training.train import train

    if args.list_presets:
        from fakeprint.engine.config import preset_names, preset_summary

        width = max(len(n) for n in preset_names(experiments=True)) + 2
        for name in preset_names():
            print(f"{name:<{width}}{preset_summary(name)}")
        print("\nthe campaign's presets (studies and history; docs/PRESETS.md):")
        for name in preset_names(experiments=True)[len(preset_names()):]:
            print(f"{name:<{width}}{preset_summary(name)}")
        return 0
    if args.resume:
        from fakeprint.engine.config import parse_overrides
        from fakeprint.engine.training.train import RESUME_SETTINGS

        given = [flag for flag, value in (("--config", args.config), ("--out", args.out),
                                          ("--on-bad-image", args.on_bad_image)) if value]
        changed = parse_overrides(args.set)
        if given or set(changed) - set(RESUME_SETTINGS):
            what = given + [f"--set {k}" for k in sorted(set(changed) - set(RESUME_SETTINGS))]
            raise FakeprintError(f"{' and '.join(what)} cannot be changed on --resume: a resumed run continues with "
                                 "the config and device it was started with (its config.yaml); start a new run "
                                 f"instead (only --set {'/'.join(RESUME_SETTINGS)} may change)")
        out = Path(args.resume)
        info = out / "run.json"
        data = args.data
        if data is None:
            try:
                data = json.loads(info.read_text())["data"]
            except (OSError, ValueError, KeyError):
                raise FakeprintError(f"{info}: cannot tell which dataset the run used; pass --data") from None
        cfg = load_config(None)  # replaced by the run's own config.yaml
        summary = train(data, cfg, out, resume=True, resume_overrides=changed)
    else:
        if not args.data or not args.out:
            raise FakeprintError("train needs --data DIR and --out RUN (or --resume RUN)")
        extra = [f"on_bad_image={args.on_bad_image}"] if args.on_bad_image else []
        cfg = load_config(args.config, [*args.set, *extra])
        summary = train(args.data, cfg, args.out)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
    return 0
