"""Round 8 on a lent GPU: the hybrid (dilated ThreeCNN + statistics MLP) and the statistics MLP, side by side.

Round 7 (docs/results.md) found that an MLP on hand-made image statistics reaches 88.80% on the internal split
and makes different mistakes from the CNNs; a fixed geometric blend with the shipped CNN gave 91.84-92.48%.
This round trains that blend as one network (``hybrid_w32``), with the choices that matter for it side by side:
how many images are rotated (rotations change the statistics the test images have), whether each sample drops
a branch, a second seed, the full-width CNN, and the statistics MLP alone (``statmlp``).

1. checks the dataset (12,500 images) and decodes it into the uint8 cache;
2. probes every run's real training step at once (one process each, as they will run);
3. trains them side by side, each with ``max_minutes`` and a fixed schedule fitted to it (at most
   ``--max-epochs``: 69, the shipped default's);
4. packs every run's last checkpoint, metrics and logs into ``--results`` (the internal-split evaluation of
   each is done afterwards on the CPU, so no device time goes to it).

Usage (on the GPU machine, from the repository root):
    PYTHONPATH=src python3 experiments/gpu_round8.py --data /tmp/unibuc --out /tmp/r8 --results "$OUT" --minutes 6
A smoke test of the whole path on generated data: add ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_campaign import fit_epochs, ready_data, train_side_by_side  # noqa: E402

HYBRID = "hybrid_w32"
B128 = {"batch_size": 128, "lr": 4.0e-3, "ema": 0.996}


def runs() -> dict[str, tuple[str, dict[str, Any]]]:
    """run id -> (preset, overrides)."""
    return {
        "hybrid_rp05_s0": (HYBRID, {"seed": 0}),                          # the preset as it is
        "hybrid_rp05_s1": (HYBRID, {"seed": 1}),
        "hybrid_rp10_s0": (HYBRID, {"seed": 0, "rotation_prob": 1.0}),    # every image rotated (the CNN's recipe)
        "hybrid_rp00_s0": (HYBRID, {"seed": 0, "rotation": 0}),           # horizontal flips only
        "hybrid_nodrop_s0": (HYBRID, {"seed": 0, "model_args": {"width": 32, "c3": 128, "feature_set": "v2",
                                                                  "branch_drop": 0.0}}),
        "hybrid_w64_s0": (HYBRID, {"seed": 0, "model_args": {"width": 64, "c3": 256, "feature_set": "v2",
                                                               "branch_drop": 0.2}}),
        "statmlp_s0": ("statmlp", {"seed": 0}),
        # a second call: at batch 32 the statistics' many small kernels held each process to ~990 images/s (29
        # epochs in 7 minutes); batch 128 (lr x2, EMA over the same number of epochs) to reach full schedules,
        # with the CNN alone under the same changes as the control
        "hybrid_b128_s0": (HYBRID, {"seed": 0} | B128),
        "hybrid_b128_s1": (HYBRID, {"seed": 1} | B128),
        "hybrid_b128_rp00_s0": (HYBRID, {"seed": 0, "rotation": 0} | B128),
        "cnn_b128_s0": ("threecnn_dilated_w32", {"seed": 0} | B128),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="work folder (runs, logs)")
    ap.add_argument("--results", type=Path, required=True, help="where round8.json and the tars go")
    ap.add_argument("--minutes", type=float, default=6.0, help="max_minutes of every run")
    ap.add_argument("--max-epochs", type=int, default=69)
    ap.add_argument("--only", nargs="*", default=None, help="run ids (default: all)")
    ap.add_argument("--probe-seconds", type=float, default=8.0)
    ap.add_argument("--expect-images", type=int, default=12500)
    ap.add_argument("--smoke", action="store_true", help="generated data, tiny budgets: test the whole path")
    args = ap.parse_args()

    from fakeprint.core.versions import git_commit, versions
    from fakeprint.data.dataset import dataset_identity
    from fakeprint.engine.config import load_config
    from fakeprint.studies import recipes as R

    t_start = time.time()
    logs = args.out / "logs"
    for p in (args.out, args.results, logs):
        p.mkdir(parents=True, exist_ok=True)
    args.data = ready_data(args.data, args.expect_images, args.out, smoke_train=300 if args.smoke else 0)

    plan = runs()
    rids = args.only or list(plan)
    unknown = [r for r in rids if r not in plan]
    if unknown:
        raise SystemExit(f"unknown run ids: {', '.join(unknown)} (known: {', '.join(plan)})")
    cfgs: dict[str, dict[str, Any]] = {}
    for rid in rids:
        preset, over = plan[rid]
        extra = {"max_minutes": args.minutes, "progress": False, "threads": 2, "workers": 1} | over
        extra["epochs"] = min(args.max_epochs, int(load_config(preset)["epochs"]))
        if args.smoke:
            extra |= {"epochs": 2, "max_minutes": 0.5}
        cfgs[rid] = load_config(preset, extra)
    speeds = fit_epochs(cfgs, args.data, args.out, args.minutes, args.probe_seconds, args.smoke)
    report: dict[str, Any] = {
        "campaign": "round 8: the hybrid (dilated ThreeCNN + statistics MLP) and the statistics MLP, side by side",
        "smoke": args.smoke, "data": dataset_identity(args.data), "machine": R.machine(), "commit": git_commit(),
        "versions": versions(), "probe_images_per_s": speeds, "minutes": args.minutes,
        "runs": {r: {"preset": plan[r][0], "overrides": plan[r][1], "epochs": cfgs[r]["epochs"]} for r in rids}}
    (args.results / "round8.json").write_text(json.dumps(report, indent=2) + "\n")
    train_side_by_side(cfgs, args.data, args.out, args.results, args.minutes, report, "round8.json", t_start)


if __name__ == "__main__":
    main()
