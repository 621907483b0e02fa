"""`fakeprint study NAME --data DIR [--scale small|full] [--out DIR] [--seeds N]`: the report's studies."""

from __future__ import annotations

import argparse

STUDY_NAMES = ("augmentation", "residual", "ensemble", "optimizer", "failed", "class4", "recipes")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "study", help="run one of the report's studies (a grid of trainings) and tabulate it",
        description="Train every variant of a study on the same data, evaluate each on the internal split "
                    "(or validation.csv when the dataset has one) and write study.md, study.json, "
                    "accuracy.png and curves.png. Finished runs are reused, so an interrupted study continues.")
    s.add_argument("name", choices=STUDY_NAMES, help="which study (see docs/STUDIES.md)")
    s.add_argument("--data", required=True, help="dataset folder (train.csv + train/ ...)")
    # `tiny` (one epoch of tiny models) exists for the tests; it is left out of the help on purpose
    s.add_argument("--scale", default="small", choices=("small", "full", "tiny"), metavar="{small,full}",
                   help="small: CPU-sized models and budgets, about 10 min on 2 cores; full: the report's "
                        "presets and models at full length (for a GPU). Default small")
    s.add_argument("--out", default=None, help="study folder (default runs/study-NAME-SCALE)")
    s.add_argument("--seeds", type=int, default=1, help="train every variant with seeds 0..N-1 (default 1)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every run (e.g. device=cuda)")
    s.add_argument("--dry-run", action="store_true", help="print the runs and their configs, train nothing")
    s.add_argument("--budget-minutes", type=float, default=None,
                   help="recipes only: CPU-minutes of training per candidate (each gets the whole epochs its "
                        "measured speed fits into them); required for recipes")
    s.add_argument("--only", default=None, metavar="ID[,ID...]",
                   help="recipes only: these candidates, in this order (default: all; see docs/STUDIES.md)")
    s.set_defaults(fn=_cmd_study)


def _cmd_study(args: argparse.Namespace) -> int:
    from fakeprint.engine.config import parse_overrides
    from fakeprint.studies.grids import get_grid, variant_config
    from fakeprint.studies.study import run_study

    extra = parse_overrides(args.set)
    if args.name == "recipes":
        return _cmd_recipes(args, extra)
    if args.budget_minutes is not None or args.only is not None:
        from fakeprint.core.errors import FakeprintError

        raise FakeprintError("--budget-minutes and --only apply to the recipes study only")
    if args.dry_run:
        grid = get_grid(args.name, args.scale)
        print(f"study {args.name} ({args.scale}): {len(grid.variants)} variants x {args.seeds} seed(s) = "
              f"{grid.trainings() * args.seeds} training run(s)")
        for v in grid.variants:
            if v.kind == "average":
                print(f"  {v.id:<22} {v.label}: average of {', '.join(v.members)} (no training)")
                continue
            cfg = variant_config(grid, v, 0, extra)
            keys = ("model", "model_args", "epochs", "batch_size", "max_train_images", "optimizer", "lr", "loss",
                    "sampler", "hflip", "rotation", "color_jitter")
            print(f"  {v.id:<22} {v.label}: " + ", ".join(f"{k}={cfg[k]}" for k in keys))
        return 0
    report = run_study(args.name, args.data, args.scale, args.out, args.seeds, extra)
    from fakeprint.studies.study_report import study_markdown

    print(study_markdown(report))
    return 0


def _cmd_recipes(args: argparse.Namespace, extra: dict) -> int:
    from fakeprint.core.errors import FakeprintError
    from fakeprint.studies.recipes import candidates, recipe_config, recipes_markdown, run_recipes

    if args.seeds != 1:
        raise FakeprintError("study recipes: --seeds does not apply (give a seed with --set seed=N and another --out)")
    if args.scale not in ("small", "tiny"):
        raise FakeprintError("study recipes: --scale does not apply (its size is --budget-minutes)")
    only = [o.strip() for o in args.only.split(",") if o.strip()] if args.only else None
    if args.dry_run:
        for r in candidates(only):
            if r.members:
                print(f"  {r.id:<18} {r.label}")
                continue
            cfg = recipe_config(r, extra, args.scale == "tiny")
            keys = ("model", "model_args", "batch_size", "lr", "weight_decay", "hflip", "vflip", "rot90", "rotation",
                    "translate", "mixup", "cutmix", "loss")
            print(f"  {r.id:<18} {r.label}: " + ", ".join(f"{k}={cfg[k]}" for k in keys))
        return 0
    if args.budget_minutes is None:
        raise FakeprintError("study recipes needs --budget-minutes N (CPU-minutes of training per candidate)")
    report = run_recipes(args.data, args.budget_minutes, args.out, only, extra, tiny=args.scale == "tiny")
    print(recipes_markdown(report))
    return 0
