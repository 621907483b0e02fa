"""`fakeprint label-issues --data DIR [--folds k] [--config ...] [--set ...]`: rank likely mislabelled images."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "label-issues", help="rank likely mislabelled training images (k-fold out-of-fold probabilities + cleanlab)",
        description="Train k models on k stratified folds of train.csv, classify each held-out fold, and rank "
                    "likely mislabelled images with cleanlab's find_label_issues. Writes label_issues.csv "
                    "(image_id,given_label,suggested_label,self_confidence,rank), label_issues.png, "
                    "oof_probs.csv and label_issues.json.")
    s.add_argument("--data", required=True, help="dataset folder (train.csv + train/)")
    s.add_argument("--folds", type=int, default=5, help="number of stratified folds (default 5)")
    s.add_argument("--config", default="demo",
                   help="training preset or YAML file for the fold models (default demo: a fast fpnet_tiny recipe)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    s.add_argument("--out", default="runs/label-issues", help="output folder (default runs/label-issues)")
    s.add_argument("--seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    s.add_argument("--top", type=int, default=24, help="candidates shown in the gallery (default 24)")
    s.set_defaults(fn=_cmd_label_issues)


def _cmd_label_issues(args: argparse.Namespace) -> int:
    from fakeprint.studies.label_issues import find_issues

    r = find_issues(args.data, args.out, folds=args.folds, config=args.config, overrides=args.set, seed=args.seed,
                    top=args.top)
    print(f"{r['issues']} likely label issue(s) among {r['images']} images (out-of-fold accuracy "
          f"{r['oof_accuracy'] * 100:.2f}%); per given label: "
          + ", ".join(f"{k}: {v}" for k, v in r["issues_per_given_label"].items()))
    for i, t in enumerate(r["top"][:10]):
        print(f"  {i + 1:>3}. {t['image_id']}  given {t['given_label']} -> suggested {t['suggested_label']}  "
              f"(p_given {t['self_confidence']:.3f})")
    print(f"wrote {r['out']}/label_issues.csv and label_issues.png")
    return 0
