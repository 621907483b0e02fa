"""Round 2 of the recipe study on a lent GPU: long schedules, run side by side, inside a fixed device-time budget.

A GPU lease here is short (minutes) and one call runs at most 10 minutes, so this driver plans from
measurements instead of guesses:

1. checks the dataset (12,500 images for the real data) and decodes it once into the uint8 cache;
2. **probe**: every phase-A candidate runs its real training step on random images *at the same time*
   (one process each, as in the phase), so each gets its images/s under the contention it will meet;
3. **phase A**: the candidates train side by side, one process each, on the internal split's training
   part. CPU-transferable candidates (``--fixed``) train ``--epochs`` epochs (fewer only if the probe says
   they would not fit, and then the table says so); the others as many epochs as fit into the phase;
4. **phase B**: the distilled student (teachers: every phase-A run, fixed in advance) with two seeds;
5. every run's **last** checkpoint is evaluated on the internal split (no epoch selection), and the fixed
   ensemble of the phase-A runs; ``campaign.json`` / ``campaign.md`` and the weights go to ``--results``.

Usage (on the GPU machine, from the repository root):
    PYTHONPATH=src python3 experiments/gpu_campaign.py --data /tmp/unibuc --out /tmp/campaign --results "$OUT"
A smoke test of the whole path on generated data: add ``--smoke`` (tiny budgets, the demo dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import yaml

PHASE_A = ("baseline", "rot_translate", "rot_translate_droppath", "wide_fullres_reg", "fpnet_m_reg", "threecnn_dilated")
FIXED = ("baseline", "rot_translate", "rot_translate_droppath")  # fpnet_s2d: the epochs a 2-core CPU run can afford
TEACHERS = ("rot_translate", "rot_translate_droppath", "wide_fullres_reg", "fpnet_m_reg", "threecnn_dilated")
STUDENT = "distill_long"
ENSEMBLE = "ensemble_long"
SAFETY = 0.78           # share of the phase that the planned epochs may fill (evaluation, checkpoints, start-up)
START_S = 25.0         # a process's start-up: imports, cache, CUDA context, cuDNN autotuning
WEIGHT_TAR_LIMIT = 15_500_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def count_images(data: Path) -> int:
    return sum(1 for p in (data / "train").iterdir() if p.is_file()) if (data / "train").is_dir() else 0


def ready_data(data: Path, expect_images: int, out: Path, smoke_train: int = 0) -> Path:
    """The dataset a driver trains on, checked (train.csv and ``expect_images`` images) and decoded once into the
    uint8 cache. With ``smoke_train``, a generated demo dataset of that many training images in ``out/demo-data``
    instead, without validation.csv (the internal split, as on the real data)."""
    import torch

    from fakeprint.data.cache import load_split

    if smoke_train:
        from fakeprint.data.demo import make_demo_dataset

        data = out / "demo-data"
        if not (data / "train.csv").is_file():
            make_demo_dataset(data, n_train=smoke_train, n_val=0, n_test=0)
        (data / "validation.csv").unlink(missing_ok=True)
        expect_images = count_images(data)
    n_images = count_images(data)
    if n_images != expect_images or not (data / "train.csv").is_file():
        raise SystemExit(f"{data}: expected train.csv and {expect_images} images in train/, found "
                         f"{n_images}: unpack every train-part-K.tar there first")
    log(f"{n_images} images in {data}; GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    load_split(data, "train", workers=min(16, os.cpu_count() or 1), progress=False)  # the cache, once
    log("cache ready")
    return data


def write_cfg(cfg: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------------ probe

def probe(cfg_path: Path, start_at: float, seconds: float) -> None:
    """Print the training images/s of the config at ``cfg_path``, timed from ``start_at`` (epoch seconds) for
    ``seconds``: ``recipes.measure_speed`` (the real step on random images)."""
    from fakeprint.studies.recipes import measure_speed

    cfg = yaml.safe_load(cfg_path.read_text())
    print(json.dumps({"images_per_s": measure_speed(cfg, steps=10, seconds=seconds, start_at=start_at)}))


def probe_all(cfgs: dict[str, Path], seconds: float, work: Path) -> dict[str, float]:
    start_at = time.time() + START_S
    procs = {rid: subprocess.Popen([sys.executable, __file__, "probe", str(p), str(start_at), str(seconds)],
                                   stdout=subprocess.PIPE, stderr=open(work / f"probe-{rid}.log", "w"), text=True)  # noqa: SIM115
             for rid, p in cfgs.items()}
    speeds = {}
    for rid, pr in procs.items():
        out, _ = pr.communicate()
        if pr.returncode != 0:
            raise SystemExit(f"probe of {rid} failed: see {work / f'probe-{rid}.log'}")
        speeds[rid] = json.loads(out.strip().splitlines()[-1])["images_per_s"]
    return speeds


# -------------------------------------------------------------------------------------------------- run

def launch(rid: str, cfg_path: Path, data: Path, run_dir: Path, logs: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "fakeprint", "train", "--data", str(data), "--config", str(cfg_path),
           "--out", str(run_dir)]
    return subprocess.Popen(cmd, stdout=open(logs / f"{rid}.out", "w"), stderr=open(logs / f"{rid}.log", "w"))


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """Wait for every process until ``deadline`` (epoch seconds); kill the rest. Returns each run's status."""
    status = {}
    for rid, pr in procs.items():
        try:
            rc = pr.wait(timeout=max(1.0, deadline - time.time()))
            status[rid] = "finished" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            pr.kill()
            pr.wait()
            status[rid] = "killed at the phase deadline"
        log(f"{rid}: {status[rid]}")
    return status


def mean_ips(run_dir: Path) -> float:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return sum(float(r["train_images_per_s"]) for r in rows) / max(len(rows), 1)


def pack(results: Path, name: str, files: list[tuple[Path, str]]) -> None:
    with tarfile.open(results / name, "w") as tar:
        for path, arc in files:
            if path.is_file():
                tar.add(path, arcname=arc)


def pack_weights(results: Path, runs: Path, rids: list[str], first: int, which: tuple[str, ...] = ("last",)) -> None:
    """The ``which`` checkpoints (default: the last) of ``rids`` in tars ``weights-<first>.tar``,
    ``weights-<first + 1>.tar``, ... each under the transfer limit of one returned file."""
    batch: list[tuple[Path, str]] = []
    size, k = 0, first
    for rid in rids:
        files = [(runs / rid / f"{w}{ext}", f"{rid}/{w}{ext}") for w in which for ext in (".safetensors", ".json")]
        files = [(path, arc) for path, arc in files if path.is_file()]
        if not files:
            continue
        s = sum(path.stat().st_size for path, _ in files)
        if batch and size + s > WEIGHT_TAR_LIMIT:
            pack(results, f"weights-{k}.tar", batch)
            batch, size, k = [], 0, k + 1
        batch += files
        size += s
    if batch:
        pack(results, f"weights-{k}.tar", batch)


def fit_epochs(cfgs: dict[str, dict[str, Any]], data: Path, out: Path, minutes: float, probe_seconds: float,
               smoke: bool) -> dict[str, float]:
    """Probe every run's training step at once (as they will run, one process each) and cut each config's
    ``epochs`` to what fits into ``minutes`` (never more than it asks for): a fixed schedule must end inside
    the time limit, or it stops before its decay. Returns the probed images/s."""
    from fakeprint.studies import recipes as R

    rids = list(cfgs)
    paths = {rid: write_cfg(cfgs[rid] | {"epochs": 1}, out / "cfg" / f"probe-{rid}.yaml") for rid in rids}
    speeds = probe_all(paths, probe_seconds, out / "logs")
    n_train = R.training_part_size(data, cfgs[rids[0]])
    log("probe (images/s, all at once): " + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()))
    if not smoke:
        for rid in rids:
            fit = int((minutes * 60 - 30) * 0.85 * speeds[rid] / n_train)
            cfgs[rid]["epochs"] = max(1, min(int(cfgs[rid]["epochs"]), fit))
    log("epochs: " + ", ".join(f"{k} {c['epochs']}" for k, c in cfgs.items()))
    return speeds


def train_side_by_side(cfgs: dict[str, dict[str, Any]], data: Path, out: Path, results: Path, minutes: float,
                       report: dict[str, Any], report_name: str, t_start: float) -> None:
    """Train every config at once (one process each) until ``minutes`` and a 90 s grace are up, then pack each
    run's last checkpoint (``weights-K.tar``) and its small files and logs (``runs-small.tar``) into ``results``,
    and write ``report`` (with each run's status and the wall time) there as ``report_name``."""
    rids = list(cfgs)
    logs, run_root = out / "logs", out / "runs"
    procs = {rid: launch(rid, write_cfg(cfgs[rid], out / "cfg" / f"{rid}.yaml"), data, run_root / rid, logs)
             for rid in rids}
    report["status"] = wait_all(procs, time.time() + minutes * 60 + 90)
    pack_weights(results, run_root, rids, first=0, which=("last",))
    small = [(p, str(p.relative_to(out))) for p in sorted(run_root.glob("*/*"))
             if p.is_file() and p.suffix in (".csv", ".json", ".yaml", ".txt", ".md")]
    small += [(p, str(p.relative_to(out))) for p in sorted(logs.glob("*"))]
    pack(results, "runs-small.tar", small)
    report["wall_time_s"] = time.time() - t_start
    (results / report_name).write_text(json.dumps(report, indent=2) + "\n")
    log(f"done in {report['wall_time_s']:.0f} s")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "probe":
        probe(Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True, help="work folder (runs, logs)")
    ap.add_argument("--results", type=Path, required=True, help="where campaign.json/.md and weight tars go")
    ap.add_argument("--epochs", type=int, default=80, help="epochs of the CPU-transferable candidates and student")
    ap.add_argument("--max-epochs", type=int, default=150, help="cap for the budgeted (GPU-only) candidates")
    ap.add_argument("--phase-a-seconds", type=float, default=230.0)
    ap.add_argument("--phase-b-seconds", type=float, default=140.0)
    ap.add_argument("--probe-seconds", type=float, default=8.0)
    ap.add_argument("--total-seconds", type=float, default=560.0,
                    help="the whole call's budget: phase B shrinks to fit it (device calls end at 600 s)")
    ap.add_argument("--reserve-seconds", type=float, default=90.0,
                    help="kept back from --total-seconds for the last evaluations and packing")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per training process")
    ap.add_argument("--expect-images", type=int, default=12500)
    ap.add_argument("--smoke", action="store_true", help="generated data, tiny budgets: test the whole path")
    args = ap.parse_args()


    from fakeprint.core.versions import git_commit, versions
    from fakeprint.data.dataset import dataset_identity
    from fakeprint.studies import recipes as R

    t_start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    args.data = ready_data(args.data, args.expect_images, args.out, smoke_train=800 if args.smoke else 0)
    if args.smoke:
        args.epochs, args.max_epochs = 3, 4
        global START_S
        START_S = 12.0

    common = {"threads": args.threads, "progress": False, "workers": 1}
    cfgs: dict[str, dict[str, Any]] = {}
    for rid in (*PHASE_A, STUDENT):
        r = next(c for c in R.CANDIDATES if c.id == rid)
        cfgs[rid] = R.recipe_config(r, common, tiny=args.smoke)
    n_train = R.training_part_size(args.data, cfgs[PHASE_A[0]])

    # ---- probe and plan phase A
    paths = {rid: write_cfg(cfgs[rid] | {"epochs": 1}, args.out / "cfg" / f"probe-{rid}.yaml") for rid in PHASE_A}
    speeds = probe_all(paths, args.probe_seconds, logs)
    log("probe (images/s, all at once): " + ", ".join(f"{k} {v:.0f}" for k, v in speeds.items()))
    usable = (args.phase_a_seconds - START_S) * SAFETY
    plan: dict[str, dict[str, Any]] = {}
    for rid in PHASE_A:
        fit = int(usable * speeds[rid] / n_train)
        want = args.epochs if rid in FIXED else args.max_epochs
        plan[rid] = {"epochs": max(1, min(want, fit)), "fits": fit, "wanted": want,
                     "probe_images_per_s": speeds[rid], "kind": "fixed" if rid in FIXED else "budget"}
    log("plan: " + ", ".join(f"{k} {v['epochs']} epochs" for k, v in plan.items()))

    # ---- phase A
    runs = args.out / "runs"
    deadline = time.time() + args.phase_a_seconds + 25.0
    procs = {rid: launch(rid, write_cfg(cfgs[rid] | {"epochs": plan[rid]["epochs"]}, args.out / "cfg" / f"{rid}.yaml"),
                         args.data, runs / rid, logs) for rid in PHASE_A}
    status = wait_all(procs, deadline)
    teachers = [rid for rid in TEACHERS if status[rid] == "finished"]
    report: dict[str, Any] = {
        "campaign": "recipe study round 2 (long schedules, side by side on one GPU)", "smoke": args.smoke,
        "data": dataset_identity(args.data), "machine": R.machine(), "commit": git_commit(), "versions": versions(),
        "selection": "last epoch (no selection)", "train_images": n_train, "plan": plan, "status": status,
        "teachers": teachers, "rows": {},
    }

    def evaluate(rids: list[str]) -> None:
        for rid in rids:
            if (runs / rid / "summary.json").is_file():
                report["rows"][rid] = R.evaluate_last_cached(args.data, runs / rid)
        report["wall_time_s"] = time.time() - t_start
        (args.results / "campaign.json").write_text(json.dumps(report, indent=2) + "\n")

    # ---- phase B: the student, two seeds, teachers fixed in advance (every finished phase-A run), launched at
    # once; phase A is evaluated while it trains. Its budget shrinks to what --total-seconds leaves.
    procs: dict[str, subprocess.Popen] = {}
    left = args.total_seconds - (time.time() - t_start) - args.reserve_seconds
    budget_b = min(args.phase_b_seconds, left)
    if teachers and budget_b > START_S + 20:
        ref = "rot_translate" if "rot_translate" in teachers else teachers[0]
        ips = mean_ips(runs / ref)
        fit = int((budget_b - START_S) * SAFETY * ips / n_train)
        epochs_b = max(1, min(args.epochs, fit))
        plan[STUDENT] = {"epochs": epochs_b, "fits": fit, "wanted": args.epochs, "kind": "fixed",
                         "speed_from": f"{ref} in phase A ({ips:.0f} images/s under phase A's contention)"}
        teacher_ckpts = [str(runs / t / "last.safetensors") for t in teachers]
        for seed in (0, 1):
            rid = STUDENT if seed == 0 else f"{STUDENT}_seed1"
            cfg = cfgs[STUDENT] | {"epochs": epochs_b, "seed": seed, "distill_from": teacher_ckpts}
            procs[rid] = launch(rid, write_cfg(cfg, args.out / "cfg" / f"{rid}.yaml"), args.data, runs / rid, logs)
    elif teachers:
        status[STUDENT] = f"not started: {left:.0f} s left of --total-seconds"
    deadline = time.time() + budget_b + 25.0
    pack_weights(args.results, runs, [*TEACHERS, "baseline"], first=2)  # phase A's weights, in case time runs out
    evaluate(list(PHASE_A))
    if len(teachers) >= 2:
        report["rows"][ENSEMBLE] = R.evaluate_ensemble(args.data, [runs / t for t in teachers]) | {"members": teachers}
    log("phase A (own views): " + ", ".join(f"{k} {v['tta']['own']['accuracy']:.4f}" for k, v in report["rows"].items()))
    if procs:
        status |= wait_all(procs, deadline)
        evaluate(list(procs))
        students = [rid for rid in procs if rid in report["rows"]]
        if students and len(teachers) >= 2:
            report["rows"]["ensemble_long_and_students"] = R.evaluate_ensemble(
                args.data, [runs / t for t in (*teachers, *students)]) | {"members": [*teachers, *students]}
        pack_weights(args.results, runs, [r for r in procs if (runs / r / "last.safetensors").is_file()], first=0)
    report["wall_time_s"] = time.time() - t_start
    (args.results / "campaign.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results / "campaign.md").write_text(markdown(report))

    # ---- what comes back beside campaign.json/.md and the weight tars: the small files of every run
    small = [(p, str(p.relative_to(args.out))) for p in sorted(runs.glob("*/*"))
             if p.is_file() and p.suffix in (".csv", ".json", ".yaml", ".txt", ".md", ".png") and p.name != "split.csv"]
    small += [(p, str(p.relative_to(args.out))) for p in sorted(logs.glob("*"))]
    small += [(runs / PHASE_A[0] / "split.csv", "runs/split.csv")] + [(p, f"cfg/{p.name}") for p in (args.out / "cfg").glob("*.yaml")]
    pack(args.results, "runs-small.tar", small)
    log(f"done in {time.time() - t_start:.0f} s")


def markdown(report: dict[str, Any]) -> str:
    n = report["rows"][next(iter(report["rows"]))]["n"] if report["rows"] else "?"
    lines = [f"# Recipe study round 2 on {report['machine']}", "",
             f"Internal split ({n} images), last epoch (no epoch selection). TTA columns: none, horizontal flip, "
             "8-view dihedral, and **own**: each model over the flips and turns it was trained with (an ensemble: "
             "each member so).", "",
             "| candidate | epochs (kind) | minutes | images/s | training acc. | none | flip | 8-view | own | "
             "class-4 recall (own) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rid, r in report["rows"].items():
        t = r["tta"]
        p = report["plan"].get(rid.replace("_seed1", ""), {})
        ep = f"{r['epochs']} ({p.get('kind', '')})" if r.get("epochs") else "-"
        tr = f"{r['train_part_accuracy'] * 100:.2f}%" if r.get("train_part_accuracy") is not None else "-"
        ips = f"{r['images_per_s']:.0f}" if r.get("images_per_s") else "-"
        pct = {m: f"{t[m]['accuracy'] * 100:.2f}%" if m in t else "-" for m in ("none", "flip", "dihedral", "own")}
        lines.append(f"| {rid} | {ep} | {r['train_minutes']:.1f} | {ips} | {tr} | {pct['none']} | {pct['flip']} | "
                     f"{pct['dihedral']} | **{pct['own']}** | {t['own']['class4_recall']:.3f} |")
    lines += ["", f"Status: {json.dumps(report['status'])}", f"Commit {report['commit']}, "
              f"torch {report['versions'].get('torch')}, wall time {report['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
