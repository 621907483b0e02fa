"""Training throughput: the report's data path against fakeprint's, same model, same machine, one run.

(a) report-style: a ``Dataset`` that opens every image with PIL and transforms it on its own (Resize 100,
    RandomHorizontalFlip, RandomRotation(15), ToTensor, Normalize ImageNet: torchvision's pipeline written
    with plain tensor ops, since torchvision is not a dependency), a ``DataLoader`` with worker processes,
    pinned memory (on CUDA), batch 16, shuffle, drop_last; the model in fp32, as the report trained it.
(b) fakeprint: the decoded uint8 cache -> one tensor on the device -> ``DeviceBatches`` -> ``augment`` ->
    model, run by ``fakeprint.engine.training.train.train_one_epoch`` itself with fakeprint's defaults for the device
    (on CUDA: bf16 autocast and channels_last) and the model laid out as ``fakeprint train`` lays it out
    (``training_layout``: channels-last where it pays, ReLUs moved after the max-pools they precede, an exact
    rewrite: the same parameters, outputs and gradients).

Same initial weights, same optimizer (Adam, lr 5e-4, weight decay 1e-4), same batch size. The paths are
interleaved (rounds in the order ab, ba, ab, ...) so that both see the same machine load; each round
starts with untimed warm-up steps, and the clock runs exactly around the timed training steps (with a
device synchronisation on both sides). Prints one JSON object.

    python benchmarks/train_throughput.py --images 2000 --out benchmarks/results/train_throughput-cpu-2core-threecnn.json
    python benchmarks/train_throughput.py --device cuda --images 12500 --epochs 2 --workers 4
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from _common import (
    DEFAULT_DATA,
    Chunk,
    cpu_seconds,
    emit,
    environment,
    forever,
    load_average,
    log,
    memory_kind,
    peak_memory_mb,
    pick,
    process_peak_rss_mb,
    reset_peak_memory,
    setup_backends,
    stratified_subset,
    sync,
)
from fakeprint.data.cache import load_split
from fakeprint.data.dataset import NUM_CLASSES, dataset_identity, resolve_split
from fakeprint.data.loader import DeviceBatches, to_device_tensor
from fakeprint.engine.config import load_config, parse_overrides, preset_names
from fakeprint.engine.runtime import autocast_dtype
from fakeprint.engine.training.loop import train_one_epoch
from fakeprint.engine.training.losses import make_loss
from fakeprint.engine.training.setup import Dist, build_optimizer, training_layout, use_channels_last
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD
from fakeprint.models import create_model

# ------------------------------------------------------------------------ (a) the report's data path

_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """torchvision's ``ToTensor``: PIL RGB -> float32 3 x H x W in [0, 1]."""
    return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1).contiguous().float().div(255.0)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's ``Resize(size)``: the shorter side to ``size`` (bilinear, antialiased); an image
    already of that size is returned as it is."""
    h, w = x.shape[-2:]
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    new = (size, new_long) if h <= w else (new_long, size)
    if (h, w) == new:
        return x
    return F.interpolate(x[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """torchvision's tensor ``rotate``: about the centre, nearest neighbour, zero fill, same size."""
    a = math.radians(degrees)
    h, w = x.shape[-2:]
    cos, sin = math.cos(a), math.sin(a)
    theta = torch.tensor([[[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]]], dtype=x.dtype)
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


def report_transform(im: Image.Image) -> torch.Tensor:
    """Resize(100), RandomHorizontalFlip(), RandomRotation(15), ToTensor(), Normalize(ImageNet), per sample,
    with torch's random generator as torchvision draws it. ToTensor comes first because the other steps are
    tensor ops here; flips and nearest-neighbour rotation commute with it exactly."""
    x = resize(to_tensor(im), 100)
    if torch.rand(1) < 0.5:
        x = x.flip(-1)
    x = rotate(x, float(torch.empty(1).uniform_(-15.0, 15.0).item()))
    return (x - _MEAN) / _STD


def report_transform_pil(im: Image.Image) -> torch.Tensor:
    """The same pipeline as torchvision runs it on a PIL image (PIL resize, transpose, rotate)."""
    if min(im.size) != 100:
        w, h = im.size
        im = im.resize((100, int(100 * h / w)) if w <= h else (int(100 * w / h), 100), Image.Resampling.BILINEAR)
    if torch.rand(1) < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = im.rotate(float(torch.empty(1).uniform_(-15.0, 15.0).item()), resample=Image.Resampling.NEAREST)
    return (to_tensor(im) - _MEAN) / _STD


class ReportStyleDataset(Dataset):
    """Every item: open the file with PIL, convert to RGB, transform alone."""

    def __init__(self, paths: list[Path], labels: np.ndarray, ops: str = "tensor"):
        self.paths, self.labels = paths, labels
        self.transform = report_transform if ops == "tensor" else report_transform_pil

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as im:
            rgb = im.convert("RGB")
        return self.transform(rgb), int(self.labels[i])


def report_train_steps(model: nn.Module, batches, opt: torch.optim.Optimizer, loss_fn, device: torch.device) -> int:
    """The report's loop body: copy the batch to the device, forward, loss, backward, step (fp32)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)  # accumulated on the device: no per-step sync (kind to (a))
        seen += len(y)
    loss_sum.item()
    return seen


# ----------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder (train.csv + train/)")
    p.add_argument("--model", default="threecnn", help="a registered model; its preset's config when one exists")
    p.add_argument("--images", type=int, default=2000, help="a stratified subset of train of this many images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the report-style path (report: 4)")
    p.add_argument("--epochs", type=float, default=None,
                   help="timed steps per path: this many epochs of --images (default on CUDA: 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per path (default on CPU: 48)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per path and round (CPU 2, CUDA 20)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds (orders ab, ba, ab, ...)")
    p.add_argument("--report-ops", choices=("tensor", "pil"), default="tensor",
                   help="report-style transforms as tensor ops (default) or as torchvision runs them on PIL")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override fakeprint's config for path (b), e.g. amp=bf16, compile=true, threads=1, "
                        "\"channels_last='on'\" (quoted: YAML reads a bare on as true)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = pick(args.device)
    preset = args.model if args.model in preset_names() else None
    same = {"model": args.model, "batch_size": args.batch_size, "optimizer": "adam", "lr": 5e-4,
            "weight_decay": 1e-4, "progress": False, "device": args.device, "seed": args.seed}
    cfg = load_config(preset, same | parse_overrides(args.set))
    setup_backends(cfg, device)
    result: dict = {"benchmark": "train_throughput", "environment": environment(device)}
    bs = args.batch_size

    # ---- data: decode once into a fresh cache (timed), then the memory map every later run uses
    root = Path(args.data)
    with tempfile.TemporaryDirectory(prefix="fakeprint-bench-cache-") as tmp:
        log(f"building the decoded cache of {root} in a fresh temporary folder ...")
        t0 = time.perf_counter()
        load_split(root, "train", cache_dir=Path(tmp), workers=cfg["workers"], on_bad_image=cfg["on_bad_image"],
                   progress=False)
        cache_build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = load_split(root, "train", cache_dir=Path(tmp), workers=cfg["workers"],
                          on_bad_image=cfg["on_bad_image"], progress=False)
        cache_load_s = time.perf_counter() - t0
        idx = stratified_subset(full.labels, args.images, args.seed)
        split = full.subset(idx, "bench")  # a copy in memory: the temporary folder can go
    files, _ = resolve_split(root, "train")
    path_of = dict(zip(files.ids, files.paths, strict=True))
    paths = [path_of[i] for i in split.ids]
    n = len(split)
    if n < bs:
        raise SystemExit(f"--images {n} is smaller than the batch size {bs}")
    if args.steps is not None:
        steps = args.steps
    elif args.epochs is not None or device.type == "cuda":
        steps = max(1, int((args.epochs or 1.0) * (n // bs)))
    else:
        steps = 48  # 768 images per path: the whole run stays within 5 minutes on 2 busy cores
    warmup = args.warmup if args.warmup is not None else (20 if device.type == "cuda" else 2)
    rounds = max(1, min(args.rounds, steps))
    per_round = [steps // rounds + (r < steps % rounds) for r in range(rounds)]

    # ---- the same model twice, same initial weights, same optimizer
    torch.manual_seed(args.seed)
    base = create_model(cfg["model"], NUM_CLASSES, **cfg["model_args"])
    report_model = copy.deepcopy(base).to(device)
    fp_model = copy.deepcopy(base).to(device)
    channels_last = use_channels_last(cfg, device, fp_model)
    fp_model = training_layout(cfg, device, fp_model)  # what fakeprint's training runs: layout, ReLUs after pools
    report_opt, fp_opt = build_optimizer(cfg, report_model), build_optimizer(cfg, fp_model)
    fp_train_model = torch.compile(fp_model) if cfg["compile"] else fp_model

    # (a) report-style
    ds = ReportStyleDataset(paths, split.labels, args.report_ops)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers, drop_last=True,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    report_loss = nn.CrossEntropyLoss()
    # (b) fakeprint
    x_train = to_device_tensor(split.images, device)
    y_train = torch.from_numpy(split.labels).to(device)
    batches = DeviceBatches(x_train, y_train, bs, sampler=cfg["sampler"], drop_last=True, seed=cfg["seed"])
    fp_loss = make_loss(cfg, y_train, NUM_CLASSES, device)
    amp_dtype = autocast_dtype(device, cfg["amp"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None

    def run_report(r: int, timed_steps: int) -> dict:
        reset_peak_memory(device)
        workers_cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
        it = forever(loader)  # a fresh epoch: its workers start here, before the clock
        report_train_steps(report_model, Chunk(it, warmup), report_opt, report_loss, device)
        sync(device)
        c0, t0 = cpu_seconds(), time.perf_counter()
        seen = report_train_steps(report_model, Chunk(it, timed_steps), report_opt, report_loss, device)
        sync(device)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        it.close()  # shuts the workers down (and so counts their CPU time as our children's)
        return {"images": seen, "seconds": dt, "main_cpu_s": cpu, "peak": peak_memory_mb(device),
                "worker_cpu_s_segment": cpu_seconds(resource.RUSAGE_CHILDREN) - workers_cpu}

    def run_fakeprint(r: int, timed_steps: int) -> dict:
        reset_peak_memory(device)
        batches.set_epoch(r)
        it = forever(batches)
        torch.manual_seed(args.seed * 7919 + r)  # dropout, as train() seeds it per epoch
        gen = torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + r)
        common = dict(opt=fp_opt, sched=None, per_step=False, loss_fn=fp_loss, cfg=cfg, device=device,
                      amp_dtype=amp_dtype, scaler=scaler, ema=None, gen=gen, d=Dist())
        train_one_epoch(fp_train_model, Chunk(it, warmup), **common, desc="warm-up")
        sync(device)
        c0, t0 = cpu_seconds(), time.perf_counter()
        stats = train_one_epoch(fp_train_model, Chunk(it, timed_steps), **common, desc="timed")
        sync(device)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        return {"images": int(stats["images"]), "seconds": dt, "main_cpu_s": cpu, "peak": peak_memory_mb(device)}

    log(f"{cfg['model']} on {n} images, batch {bs}, {steps} timed steps per path in {rounds} round(s), "
        f"{warmup} warm-up steps per round; device {result['environment']['device']}")
    paths_run = {"report_style": run_report, "fakeprint": run_fakeprint}
    rec: dict[str, dict] = {k: {"images": 0, "seconds": 0.0, "main_cpu_s": 0.0, "rounds": [], "peak_memory_mb": 0.0}
                            for k in paths_run}
    for r, timed in enumerate(per_round):
        order = ["report_style", "fakeprint"] if r % 2 == 0 else ["fakeprint", "report_style"]
        for name in order:
            seg = paths_run[name](r, timed)
            for k in ("images", "seconds", "main_cpu_s"):
                rec[name][k] += seg[k]
            rec[name]["peak_memory_mb"] = max(rec[name]["peak_memory_mb"], seg.pop("peak"))
            rec[name]["rounds"].append({"steps": timed, **{k: round(v, 3) for k, v in seg.items()},
                                        "images_per_s": round(seg["images"] / seg["seconds"], 2),
                                        "load_avg_1min": (load_average() or [None])[0]})
            log(f"round {r + 1}/{rounds} {name:>12}: {seg['images'] / seg['seconds']:8.1f} images/s "
                f"({timed} steps, {seg['seconds']:.1f} s, load {load_average()[:1]})")

    ips = {k: v["images"] / v["seconds"] for k, v in rec.items()}
    result |= {
        "model": cfg["model"],
        "data": dataset_identity(root),
        "images": n,
        "batch_size": bs,
        "timed_steps_per_path": steps,
        "warmup_steps_per_round": warmup,
        "rounds": rounds,
        "images_per_s": {k: round(v, 2) for k, v in ips.items()},
        "ratio": round(ips["fakeprint"] / ips["report_style"], 3),
        "main_process_cpu_ms_per_image": {k: round(1e3 * v["main_cpu_s"] / v["images"], 2) for k, v in rec.items()},
        "peak_memory_mb": {k: round(v["peak_memory_mb"], 1) for k, v in rec.items()}
        | {"process": round(process_peak_rss_mb(), 1), "kind": memory_kind(device)},
        "cache_build_s": round(cache_build_s, 3),
        "cache_build_images": len(full),
        "cache_load_s": round(cache_load_s, 3),
        "report_style": {
            "workers": args.workers, "pin_memory": device.type == "cuda", "transforms": args.report_ops,
            "precision": "fp32", "memory_format": "contiguous", "loss": "CrossEntropyLoss",
            "rounds": rec["report_style"]["rounds"],
        },
        "fakeprint": {
            "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off",
            "channels_last": channels_last, "compile": bool(cfg["compile"]),
            "augment": {k: cfg[k] for k in ("hflip", "vflip", "rotation", "rotation_interp", "rot90", "translate",
                                            "color_jitter", "normalize")},
            "overrides": args.set, "rounds": rec["fakeprint"]["rounds"],
        },
        "optimizer": {"name": cfg["optimizer"], "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]},
        "argv": sys.argv[1:] if argv is None else argv,
    }
    if device.type == "cpu":
        result["peak_memory_mb"]["report_workers_max_rss"] = round(process_peak_rss_mb(resource.RUSAGE_CHILDREN), 1)
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
