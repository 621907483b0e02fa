"""Round 6 on a lent GPU: CPU-fast distilled students of the round-3 teachers, and more teachers, side by side.

Issue 10 wants the shipped default model above 93.5%, at least 200 images/s batched on 2 CPU cores with its
test-time augmentation. Round 4 distilled a width-40 dilated ThreeCNN from the three round-3 ``dilated_fast``
runs on the CPU (89.12% after 30 epochs, two hours); here the same students train for as many epochs as the
lease allows, at widths 40, 36 and 32 (the CPU speed decides which can ship), with second seeds, beside new
teachers (a fourth ``dilated_fast`` seed, the full-width network distilled from the three, a width-96 one);
a second call (phase B) adds seeds of the width-32 student, the same network undistilled and a width-24 one.

1. checks the dataset (12,500 images) and the teachers' checkpoints, decodes the images into the uint8 cache;
2. probes every run's real training step at once (one process each, as they will run);
3. trains them side by side, each with ``max_minutes`` and a fixed schedule fitted to it from the probe;
4. packs every run's last checkpoint, metrics and logs into ``--results`` right away (the internal-split
   evaluation of every TTA mode is done afterwards on the CPU, so no device time goes to it).

Usage (on the GPU machine, from the repository root; the teachers' ``last.{safetensors,json}`` in
``--teachers/dilated_fast_s{0,1,2}/``):
    PYTHONPATH=src python3 experiments/gpu_round6.py --data /tmp/unibuc --teachers /tmp/teachers --out /tmp/r6 \
        --results "$OUT" --minutes 5.5
A smoke test of the whole path on generated data: add ``--smoke`` (teachers are then trained for 2 epochs).
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

TEACHER_IDS = ("dilated_fast_s0", "dilated_fast_s1", "dilated_fast_s2")


def runs(teachers: Path) -> dict[str, dict[str, Any]]:
    """run id -> overrides of the ``threecnn_dilated_fast`` preset (every run: a fixed schedule fitted to the
    time limit from the probe, at most ``epochs``)."""
    distill = {"distill_weight": 0.7, "distill_temperature": 2.0,
               "distill_from": [str(teachers / t / "last.safetensors") for t in TEACHER_IDS]}
    width = {w: {"model_args": {"width": w, "c3": 4 * w}} for w in (24, 32, 36, 40, 96)}
    return {
        "student_w40_s0": width[40] | distill | {"seed": 0},
        "student_w40_s1": width[40] | distill | {"seed": 1},
        "student_w36_s0": width[36] | distill | {"seed": 0},
        "student_w36_s1": width[36] | distill | {"seed": 1},
        "student_w32_s0": width[32] | distill | {"seed": 0},
        "born_again_w64_s0": distill | {"seed": 0},  # the teachers' own network (width 64, c3 256) distilled
        "dilated_fast_s3": {"seed": 3},
        "wide_w96_s0": width[96] | {"seed": 0},
        # phase B (a second lease call, ``--only`` these, ``--max-epochs 69``: student_w32_s0's epochs): the
        # fastest student's further seeds, the same network without distillation, and a narrower one
        "student_w32_s1": width[32] | distill | {"seed": 1},
        "student_w32_s2": width[32] | distill | {"seed": 2},
        "plain_w32_s0": width[32] | {"seed": 0},
        "student_w24_s0": width[24] | distill | {"seed": 0},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--teachers", type=Path, required=True, help="folder of dilated_fast_s{0,1,2}/last.*")
    ap.add_argument("--out", type=Path, required=True, help="work folder (runs, logs)")
    ap.add_argument("--results", type=Path, required=True, help="where round6.json and the tars go")
    ap.add_argument("--minutes", type=float, default=5.5, help="max_minutes of every run")
    ap.add_argument("--max-epochs", type=int, default=100)
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
    if args.smoke:  # tiny stand-in teachers
        from fakeprint.engine.training.train import train

        for i, t in enumerate(TEACHER_IDS):
            if not (args.teachers / t / "last.safetensors").is_file():
                train(args.data, load_config("threecnn_dilated_fast", {
                    "epochs": 1, "seed": i, "progress": False, "model_args": {"width": 8, "c3": 16}}),
                    args.teachers / t)
    missing = [t for t in TEACHER_IDS if not (args.teachers / t / "last.safetensors").is_file()
               or not (args.teachers / t / "last.json").is_file()]
    if missing:
        raise SystemExit(f"{args.teachers}: teacher checkpoints missing: {', '.join(missing)} "
                         "(each needs last.safetensors and last.json)")

    plan = runs(args.teachers)
    rids = args.only or list(plan)
    cfgs: dict[str, dict[str, Any]] = {}
    for rid in rids:
        extra = {"max_minutes": args.minutes, "progress": False, "threads": 2, "workers": 1,
                 "epochs": args.max_epochs} | plan[rid]
        if args.smoke:
            extra |= {"epochs": 2, "max_minutes": 0.5}
        cfgs[rid] = load_config("threecnn_dilated_fast", extra)
    speeds = fit_epochs(cfgs, args.data, args.out, args.minutes, args.probe_seconds, args.smoke)
    report: dict[str, Any] = {
        "campaign": "round 6: distilled students and more teachers side by side, each under max_minutes",
        "smoke": args.smoke, "data": dataset_identity(args.data), "machine": R.machine(), "commit": git_commit(),
        "versions": versions(), "probe_images_per_s": speeds, "minutes": args.minutes,
        "runs": {r: {"preset": "threecnn_dilated_fast", "overrides": plan[r], "epochs": cfgs[r]["epochs"]}
                 for r in rids}}
    (args.results / "round6.json").write_text(json.dumps(report, indent=2) + "\n")
    train_side_by_side(cfgs, args.data, args.out, args.results, args.minutes, report, "round6.json", t_start)


if __name__ == "__main__":
    main()
