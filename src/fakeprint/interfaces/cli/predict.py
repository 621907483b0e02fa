"""`fakeprint predict`: classify image files, or write a submission for a dataset split."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fakeprint.core.errors import FakeprintError
from fakeprint.interfaces.cli.common import add_tta


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("predict", help="classify image files, or write a submission for a dataset split")
    s.add_argument("items", nargs="*", metavar="[CKPT ...] IMAGE",
                   help="checkpoints (optional: run folders, NAME.safetensors, MODEL.onnx, or shipped models: "
                        "'default', 'accurate', 'fast', 'robust', 'routed'; several: an ensemble), then image files or folders of images")
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
    add_tta(s)
    s.add_argument("--json", action="store_true", help="image files: one JSON list on stdout")
    s.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    s.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto",
                   help="auto (default): onnx for a .onnx model, else torch; onnx with a checkpoint exports it in memory")
    s.set_defaults(fn=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from fakeprint.engine.onnx import load_backend

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
    from fakeprint.engine.predict import combine, predict_with_progress

    members = [load_backend(c, args.backend, args.device) for c in ckpts or [None]]
    clf = combine(members)

    if args.data:
        from fakeprint.core.csvio import write_csv
        from fakeprint.data.cache import load_split

        if items:
            raise FakeprintError("give either --data (a dataset split) or image files, not both")
        ds = load_split(Path(args.data), args.split or "test")
        pred = predict_with_progress(clf, ds.images, f"predicting {ds.name}", tta=args.tta)
        out = Path(args.out or "submission.csv")
        write_csv(out, ["image_id", "label"], ([i, int(lab)] for i, lab in zip(ds.ids, pred.labels, strict=True)))
        print(f"wrote {len(ds.ids)} predictions to {out}")
        if args.probs:  # dataset ids, which read_csv has checked: written exactly, like the submission's
            _write_probs(Path(args.probs), ds.ids, pred, clf.classes, "refuse")
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
        _write_probs(Path(args.probs), items, pred, clf.classes, "neutralise")  # the user's file names
    if args.json:
        rows = []
        for i, d, pr in zip(items, pred.as_dicts(), pred.probs, strict=True):
            top = [{"label": clf.classes[c], "label_index": int(c), "probability": float(pr[c])}
                   for c in pr.argsort()[::-1][:k]]
            rows.append({"image": i} | d | {"top": top})
        print(json.dumps(rows, indent=2))
    else:
        flags = [None] * len(items) if pred.uncertain is None else list(pred.uncertain)
        for i, (path, lab, pr, unc) in enumerate(zip(items, pred.labels, pred.probs, flags, strict=True)):
            order = pr.argsort()[::-1][:k] if args.top_k else range(len(clf.classes))
            probs = " ".join(f"{clf.classes[c]}:{pr[c]:.3f}" for c in order)
            why = pred.why(i)
            print(f"{path}\t{clf.classes[lab]}\t{probs}"
                  + (f"\tuncertain ({', '.join(why)})" if unc and why else "\tuncertain" if unc else ""))
        backend = "+".join(sorted({getattr(m, "backend", "torch") for m in members}))
        where = ", ".join(str(m.path) for m in members)
        print(f"{len(items)} image(s) in {dt:.2f}s with {clf.name} ({where}, {backend}, TTA {clf.tta})",
              file=sys.stderr)
    return 0


def _is_checkpoint(item: str) -> bool:
    """A run folder (it holds checkpoints), a checkpoint or ONNX file, or a shipped model's name."""
    from fakeprint.models.checkpoint import SHIPPED_NAMES
    from fakeprint.models.ensemble_file import SHIPPED_ENSEMBLES

    p = Path(item)
    if item in SHIPPED_NAMES + SHIPPED_ENSEMBLES and not p.exists():
        return True
    if p.is_dir():
        return any(p.glob("*.safetensors"))
    return item.endswith((".safetensors", ".json", ".onnx"))


def _warn_resized(items: list[str]) -> None:
    """Tell the user which inputs are not 100x100: they are resized (``data.dataset.resize_filter``), which blurs
    the traces of the generator."""
    from PIL import Image

    from fakeprint.data.dataset import IMAGE_SIZE

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
    """Image files as given; a folder stands for the image files in it (sorted, not recursive). Every file is
    checked before anything opens it: a FIFO or device is refused (it would block), and so is a link in a folder
    that leads out of it (as a dataset's are)."""
    from fakeprint.data.dataset import IMAGE_EXTS, check_image_file

    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and not f.is_dir())
            if not found:
                raise FakeprintError(f"{p}: a folder with no image files ({', '.join(IMAGE_EXTS)})")
            for f in found:
                check_image_file(f, inside=p)
            out += [str(f) for f in found]
        else:
            check_image_file(p)
            out.append(item)
    return out


def _write_probs(path: Path, names: list[str], pred, classes: list[str], formulas: str) -> None:
    """Every image's class probabilities (``image,p_0,...``); ``formulas`` as ``core.csvio.csv_bytes``."""
    from fakeprint.core.csvio import write_csv

    rows = ([n, *(f"{p:.6f}" for p in pr)] for n, pr in zip(names, pred.probs, strict=True))
    write_csv(path, ["image", *(f"p_{c}" for c in classes)], rows, formulas)
    print(f"wrote the class probabilities of {len(names)} image(s) to {path}", file=sys.stderr)
