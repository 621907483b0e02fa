"""The ``fakeprint`` command line. Every user mistake ends in one clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

from .errors import FakeprintError


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import count_parameters, create_model, describe, list_models

    print(f"{'model':<26}{'parameters':>12}{'trainable':>12}  description")
    for name in list_models():
        m = create_model(name)
        print(f"{name:<26}{count_parameters(m):>12,}{count_parameters(m, True):>12,}  {describe(name)}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.dataset import check_dataset

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


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import train

    if args.list_presets:
        from .config import preset_names, preset_summary

        width = max(len(n) for n in preset_names()) + 2
        for name in preset_names():
            print(f"{name:<{width}}{preset_summary(name)}")
        return 0
    if args.resume:
        from .config import parse_overrides
        from .train import RESUME_SETTINGS

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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import default_split, evaluate_checkpoint

    ckpts = args.checkpoint
    args.split = args.split or default_split(ckpts[0])
    if args.out:
        out = args.out
    elif len(ckpts) > 1:  # an ensemble belongs to no one run folder: the working directory
        out = str(Path.cwd() / f"eval-{args.split}-ensemble-of-{len(ckpts)}")
    else:
        from .checkpoint import output_dir, resolve_checkpoint

        first = Path(ckpts[0]) if str(ckpts[0]).endswith(".onnx") else resolve_checkpoint(ckpts[0])
        out = str(output_dir(first, f"eval-{args.split}"))
    m = evaluate_checkpoint(ckpts if len(ckpts) > 1 else ckpts[0], args.data, args.split, out, tta=args.tta,
                            device=args.device)
    if args.json:
        print(json.dumps({k: v for k, v in m.items() if k != "text"} | {"out": str(out)}, indent=2))
    else:
        print(m["text"])
        print(f"wrote {out}/metrics.json, {out}/report.md, {out}/confusion_matrix.png")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .onnx_backend import load_backend

    items = list(args.items)
    ckpts = list(args.model or [])
    while not args.model and items and _is_checkpoint(items[0]):
        ckpts.append(items.pop(0))  # leading checkpoints: one model, or several as an ensemble
    if args.data is None and args.split is not None:
        raise FakeprintError("--split applies with --data (a dataset split); image files need no split")
    if args.data is not None and args.json:
        raise FakeprintError("--json applies to image files; with --data the predictions go to --out (a submission) "
                             "and --probs (probabilities)")
    if args.data is None and args.out is not None:
        raise FakeprintError("--out is the submission file of --data; for image files use --json or --probs FILE")
    if args.top_k is not None and args.top_k < 1:
        raise FakeprintError(f"--top-k must be at least 1, got {args.top_k}")
    from .predict import combine, predict_with_progress

    members = [load_backend(c, args.backend, args.device) for c in ckpts or [None]]
    clf = combine(members)

    if args.data:
        from .checkpoint import atomic_write
        from .csvio import csv_bytes
        from .data.cache import load_split

        if items:
            raise FakeprintError("give either --data (a dataset split) or image files, not both")
        ds = load_split(Path(args.data), args.split or "test")
        pred = predict_with_progress(clf, ds.images, f"predicting {ds.name}", tta=args.tta)
        out = Path(args.out or "submission.csv")
        atomic_write(out, csv_bytes(["image_id", "label"], ([i, int(lab)] for i, lab in zip(ds.ids, pred.labels,
                                                                                             strict=True))))
        print(f"wrote {len(ds.ids)} predictions to {out}")
        if args.probs:
            _write_probs(Path(args.probs), ds.ids, pred, clf.classes)
        return 0
    items = _expand_folders(items)
    _warn_resized(items)
    if not items:
        raise FakeprintError("nothing to predict: give image files or folders, or --data DIR [--split test] --out FILE")
    t0 = time.perf_counter()
    pred = predict_with_progress(clf, items, "predicting", tta=args.tta)
    dt = time.perf_counter() - t0
    k = min(args.top_k or len(clf.classes), len(clf.classes))
    if args.probs:
        _write_probs(Path(args.probs), items, pred, clf.classes)
    if args.json:
        rows = []
        for i, d, pr in zip(items, pred.as_dicts(), pred.probs, strict=True):
            top = [{"label": clf.classes[c], "label_index": int(c), "probability": float(pr[c])}
                   for c in pr.argsort()[::-1][:k]]
            rows.append({"image": i} | d | {"top": top})
        print(json.dumps(rows, indent=2))
    else:
        flags = [None] * len(items) if pred.uncertain is None else list(pred.uncertain)
        for path, lab, pr, unc in zip(items, pred.labels, pred.probs, flags, strict=True):
            order = pr.argsort()[::-1][:k] if args.top_k else range(len(clf.classes))
            probs = " ".join(f"{clf.classes[c]}:{pr[c]:.3f}" for c in order)
            print(f"{path}\t{clf.classes[lab]}\t{probs}" + ("\tuncertain" if unc else ""))
        backend = "+".join(sorted({getattr(m, "backend", "torch") for m in members}))
        where = ", ".join(str(m.path) for m in members)
        print(f"{len(items)} image(s) in {dt:.2f}s with {clf.name} ({where}, {backend}, TTA {clf.tta})",
              file=sys.stderr)
    return 0


def _is_checkpoint(item: str) -> bool:
    """A run folder (it holds checkpoints), a checkpoint or ONNX file, or a shipped model's name."""
    from .checkpoint import SHIPPED_NAMES

    p = Path(item)
    if item in SHIPPED_NAMES and not p.exists():
        return True
    if p.is_dir():
        return any(p.glob("*.safetensors"))
    return item.endswith((".safetensors", ".json", ".onnx"))


def _warn_resized(items: list[str]) -> None:
    """Tell the user which inputs are not 100x100: they are resized (bilinear), which blurs generator traces."""
    from PIL import Image

    from .data.dataset import IMAGE_SIZE

    odd = []
    for item in items:
        try:
            with Image.open(item) as im:
                if im.size != (IMAGE_SIZE, IMAGE_SIZE):
                    odd.append(f"{item} ({im.width}x{im.height})")
        except Exception:  # noqa: BLE001 - unreadable files get their own error when decoded
            continue
    if odd:
        more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
        print(f"warning: resized to {IMAGE_SIZE}x{IMAGE_SIZE} (the model's input; resizing blurs the traces it reads): "
              + ", ".join(odd[:3]) + more, file=sys.stderr)


def _expand_folders(items: list[str]) -> list[str]:
    """Image files as given; a folder stands for the image files in it (sorted, not recursive)."""
    from .data.dataset import IMAGE_EXTS

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FakeprintError(f"{p}: a folder with no image files ({', '.join(IMAGE_EXTS)})")
            out += found
        else:
            out.append(item)
    return out


def _write_probs(path: Path, names: list[str], pred, classes: list[str]) -> None:
    from .checkpoint import atomic_write
    from .csvio import csv_bytes

    rows = ([n, *(f"{p:.6f}" for p in pr)] for n, pr in zip(names, pred.probs, strict=True))
    atomic_write(path, csv_bytes(["image", *(f"p_{c}" for c in classes)], rows))
    print(f"wrote the class probabilities of {len(names)} image(s) to {path}", file=sys.stderr)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_checkpoint

    cal = calibrate_checkpoint(args.checkpoint, args.data, args.split)
    print(json.dumps(cal, indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .config import load_config
    from .data.demo import make_demo_dataset
    from .evaluate import evaluate_checkpoint
    from .train import train

    t0 = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    if not (data / "test.csv").is_file():
        print(f"generating the demo dataset in {data} ...", file=sys.stderr)
        make_demo_dataset(data, seed=args.seed)
    run = out / "run"
    if (run / "metrics.csv").exists():
        import shutil

        shutil.rmtree(run)
    overrides = [f"seed={args.seed}"] + ([f"epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config("demo", overrides)
    train(data, cfg, run)
    m = evaluate_checkpoint(run, data, "validation", run / "eval-validation")
    from .predict import load

    clf = load(run)
    from .data.cache import load_split

    test = load_split(data, "test")
    pred = clf.predict(test.images)
    sub = out / "submission.csv"
    from .csvio import write_csv

    write_csv(sub, ["image_id", "label"], ([i, int(lab)] for i, lab in zip(test.ids, pred.labels, strict=True)))
    dt = time.perf_counter() - t0
    print(m["text"])
    print(f"demo finished in {dt:.0f}s: accuracy {m['accuracy'] * 100:.2f}% on the demo's validation split "
          f"(last epoch, never trained on)\n"
          f"  dataset:     {data}\n  run folder:  {run} (config.yaml, metrics.csv, last/best checkpoints, curves.png)\n"
          f"  evaluation:  {run / 'eval-validation'} (metrics.json, report.md, confusion_matrix.png)\n"
          f"  submission:  {sub}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fakeprint", description="Tell which image generator made an image.")
    p.add_argument("--version", action="version", version=f"fakeprint {__version__}")
    p.add_argument("--follow-external-links", action="store_true",
                   help="read dataset images that are symbolic links to files outside the dataset folder "
                        "(refused by default)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("demo", help="generate the synthetic demo dataset, train, evaluate and predict on it")
    s.add_argument("--out", default="fakeprint-demo", help="folder for the dataset, run and submission")
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_cmd_demo)

    s = sub.add_parser("models", help="list the registered models with their parameter counts")
    s.set_defaults(fn=_cmd_models)

    s = sub.add_parser("data", help="dataset tools")
    dsub = s.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    c = dsub.add_parser("check", help="report a dataset's layout, classes, images and every problem found")
    c.add_argument("dir")
    c.add_argument("--no-decode", action="store_true", help="skip opening every image")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_cmd_data_check)

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

    s = sub.add_parser("evaluate", help="accuracy, confusion matrix and classification report of a checkpoint")
    s.add_argument("checkpoint", nargs="+", help="a checkpoint, or several: their probabilities are averaged (or a shipped model: default, accurate, fast)")
    s.add_argument("--data", required=True)
    s.add_argument("--split", default=None, choices=("internal", "validation", "train"),
                   help="internal (the run's held-out images in its split.csv), validation or train; default: "
                        "internal when the run held images out, else validation (as analyze)")
    s.add_argument("--out", default=None, help="folder for metrics.json, report.md, confusion_matrix.png (default: "
                   "eval-SPLIT beside the checkpoint; for several checkpoints, ./eval-SPLIT-ensemble-of-N)")
    _add_tta(s)
    s.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the text report")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.set_defaults(fn=_cmd_evaluate)

    s = sub.add_parser("predict", help="classify image files, or write a submission for a dataset split")
    s.add_argument("items", nargs="*", metavar="[CKPT ...] IMAGE",
                   help="checkpoints (optional: run folders, NAME.safetensors, MODEL.onnx, or shipped models: "
                        "'default', 'accurate', 'fast'; several: an ensemble), then image files or folders of images")
    s.add_argument("--model", action="append", default=None,
                   help="checkpoint (default: the leading arguments that are checkpoints, or the shipped model); "
                        "repeat it, or give several leading checkpoints, for an ensemble (their averaged "
                        "probabilities, each with its own TTA; no 'uncertain' flag: the average is not calibrated)")
    s.add_argument("--data", default=None, help="a dataset folder: predict one of its splits into a submission file")
    s.add_argument("--split", default=None, choices=("test", "validation", "train"),
                   help="with --data: the split to predict (default test)")
    s.add_argument("--out", default=None, help="with --data: the submission file (default submission.csv)")
    s.add_argument("--probs", default=None, metavar="FILE",
                   help="also write every image's class probabilities as CSV (image,p_0,...), e.g. to ensemble elsewhere")
    s.add_argument("--top-k", type=int, default=None, metavar="K", help="show only the K most probable classes")
    _add_tta(s)
    s.add_argument("--json", action="store_true", help="image files: one JSON list on stdout")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto (default): onnx for a .onnx model, else torch; onnx with a checkpoint exports it in memory")
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("calibrate", help="fit temperature scaling and the uncertain flag on held-out images",
                       description="Fit a temperature and an uncertain-flag threshold (the 5th percentile of the top "
                                   "probability) on a held-out split, store them in the checkpoint's metadata, and print "
                                   "the calibration error before and after (cross-fitted) and the share of plain-colour, "
                                   "noise and synthetic images flagged. Training does this for the last checkpoint.")
    s.add_argument("checkpoint", help="a run folder or NAME.safetensors (or a shipped model: default, accurate, fast)")
    s.add_argument("--data", required=True, help="the dataset the run trained on")
    s.add_argument("--split", default="internal", choices=("internal", "validation"),
                   help="held-out images to fit on (default internal: the run's split.csv)")
    s.set_defaults(fn=_cmd_calibrate)

    for module in _COMMAND_MODULES:
        importlib.import_module(f"fakeprint.commands.{module}").register(sub)
    return p


# Further commands live in fakeprint/commands/<name>.py, each with ``register(subparsers)`` that adds its
# parser and sets ``fn`` (which takes the parsed args and returns an exit code). Imports inside ``fn``
# keep ``fakeprint --help`` fast.
_COMMAND_MODULES = ("study", "analyze", "label_issues", "export", "serve")


def _add_tta(s: argparse.ArgumentParser) -> None:
    """``--tta [MODE]`` and ``--no-tta``: by default the test-time augmentation recorded in the checkpoint."""
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tta", nargs="?", const="flip", default=None, choices=("none", "flip", "dihedral"),
                   help="test-time augmentation: none, flip (the image and its mirror; the value of a bare --tta) "
                        "or dihedral (8 flips and quarter turns); default: the one the checkpoint's figures used")
    g.add_argument("--no-tta", dest="tta", action="store_const", const="none",
                   help="no test-time augmentation, whatever the checkpoint says")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.follow_external_links:
        from .data.dataset import LINKS_ENV

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
