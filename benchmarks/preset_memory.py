"""Peak memory of each report preset at its own batch size: a few training steps on the device, then one
evaluation pass at ``eval_batch_size``, each preset in a fresh process.

What is resident is what ``fakeprint train`` keeps resident: the whole training set as one uint8 tensor on
the device (``--train-images``, default the 11,250 images of the report's training split), the validation
set likewise, the model, the optimizer state; then the activations of a step. GPU: ``max_memory_allocated``
and ``max_memory_reserved`` (what the caching allocator took from the card; the CUDA context comes on
top). CPU: peak RSS of the process (VmHWM), beside its RSS before anything was allocated.

EnsembleCNN is measured with randomly initialised frozen members (its memory does not depend on them).

    python benchmarks/preset_memory.py --device cuda --out benchmarks/results/preset_memory-h100.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from _common import (
    Chunk,
    emit,
    environment,
    forever,
    log,
    memory_kind,
    peak_memory_mb,
    pick,
    reset_peak_memory,
    setup_backends,
    sync,
)
from fakeprint.data.dataset import NUM_CLASSES
from fakeprint.data.loader import DeviceBatches
from fakeprint.engine.config import load_config, parse_overrides
from fakeprint.engine.runtime import autocast_dtype
from fakeprint.engine.training.ema import EMA
from fakeprint.engine.training.loop import evaluate_model, train_one_epoch
from fakeprint.engine.training.losses import make_loss
from fakeprint.engine.training.setup import Dist, build_optimizer, use_channels_last
from fakeprint.models import count_parameters, create_model

PRESETS = ("threecnn", "threecnn_dilated", "skipconcnn", "ensemblecnn")
GIB4 = 4 * 1024  # MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated preset names")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=3, help="training steps per preset (the first creates Adam's state)")
    p.add_argument("--train-images", type=int, default=11250, help="size of the resident training tensor")
    p.add_argument("--val-images", type=int, default=1250, help="size of the resident validation tensor")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation pass")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every preset's config")
    p.add_argument("--timeout", type=float, default=900, help="seconds per preset")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(preset: str, args: argparse.Namespace) -> dict:
    """One preset, in this (fresh) process."""
    device = pick(args.device)
    cfg = load_config(preset, {"progress": False, "device": args.device} | parse_overrides(args.set))
    setup_backends(cfg, device)
    sync(device)
    reset_peak_memory(device)
    baseline = peak_memory_mb(device)

    torch.manual_seed(0)
    model = create_model(cfg["model"], NUM_CLASSES, **cfg["model_args"]).to(device)
    channels_last = use_channels_last(cfg, device, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randint(0, 256, (args.train_images, 100, 100, 3), dtype=torch.uint8, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.train_images,), device=device)
    x_val = torch.randint(0, 256, (args.val_images, 100, 100, 3), dtype=torch.uint8, device=device)
    y_val = torch.randint(0, NUM_CLASSES, (args.val_images,), device=device)
    bs = int(cfg["batch_size"])
    batches = DeviceBatches(x, y, bs, sampler=cfg["sampler"], drop_last=True, seed=0)
    opt = build_optimizer(cfg, model)
    loss_fn = make_loss(cfg, y, NUM_CLASSES, device)
    amp_dtype = autocast_dtype(device, cfg["amp"])
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 and device.type == "cuda" else None
    ema = EMA(model, float(cfg["ema"])) if cfg["ema"] else None
    train_model = torch.compile(model) if cfg["compile"] else model
    gen = torch.Generator(device=device).manual_seed(0)

    t0 = time.perf_counter()
    train_one_epoch(train_model, Chunk(forever(batches), args.steps), opt=opt, sched=None, per_step=False,
                    loss_fn=loss_fn, cfg=cfg, device=device, amp_dtype=amp_dtype, scaler=scaler, ema=ema, gen=gen,
                    d=Dist(), desc=preset)
    sync(device)
    train_s = time.perf_counter() - t0
    out = {
        "preset": preset, "model": cfg["model"], "batch_size": bs, "eval_batch_size": int(cfg["eval_batch_size"]),
        "parameters": count_parameters(model), "trainable_parameters": count_parameters(model, True),
        "amp": str(amp_dtype).removeprefix("torch.") if amp_dtype else "off", "channels_last": channels_last,
        "compile": bool(cfg["compile"]), "torch_threads": torch.get_num_threads(), "steps": args.steps, "train_images_resident": args.train_images,
        "val_images_resident": args.val_images, "train_steps_s": round(train_s, 3),
        "baseline_mb": round(baseline, 1), "train_peak_mb": round(peak_memory_mb(device), 1),
    }
    if device.type == "cuda":
        out["train_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    if not args.no_eval:
        reset_peak_memory(device)  # the resident state stays in the new peak: it is there during evaluation
        t0 = time.perf_counter()
        evaluate_model(ema.model if ema is not None else model, x_val, y_val, cfg=cfg, device=device,
                       amp_dtype=amp_dtype, d=Dist(), num_classes=NUM_CLASSES)
        sync(device)
        out["eval_s"] = round(time.perf_counter() - t0, 3)
        out["eval_peak_mb"] = round(peak_memory_mb(device), 1)
        if device.type == "cuda":
            out["eval_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["device_used_mb_at_end"] = round((total - free) / 2**20, 1)  # context + reserved (+ others' use)
        peak_reserved = max(out["train_peak_reserved_mb"], out.get("eval_peak_reserved_mb", 0.0))
        out["under_4_gib"] = peak_reserved < GIB4
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return {}
    device = pick(args.device)
    result: dict = {"benchmark": "preset_memory", "environment": environment(device),
                    "memory_kind": memory_kind(device), "presets": []}
    passthrough = list(argv if argv is not None else sys.argv[1:])
    result["argv"] = passthrough
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        log(f"{preset} ...")
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", preset], capture_output=True,
                              text=True, timeout=args.timeout)
        if proc.returncode != 0:
            result["presets"].append({"preset": preset, "error": proc.stderr.strip().splitlines()[-1:]})
            log(proc.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        result["presets"].append(row)
        log(f"{preset}: train peak {row['train_peak_mb']:.0f} MiB"
            + (f", eval peak {row['eval_peak_mb']:.0f} MiB" if "eval_peak_mb" in row else ""))
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
