"""Helpers shared by the benchmarks: the environment header of every JSON result, peak memory, output.

Every benchmark prints one JSON object whose first keys say where and on what the numbers were taken
(``environment``): device, versions, git commit, CPU count and the load average at the start and the end
(on a shared machine the load is part of the result).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fakeprint
from fakeprint.engine.training.setup import setup_backends  # noqa: F401  (re-exported for the benchmarks)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data" / "unibuc-deepfake"


def git_commit(cwd: Path = REPO) -> str:
    """``git rev-parse HEAD`` of the repository, with ``-dirty`` when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The CPU's widest vector instructions and whether it has native bf16 (AVX512-BF16 or AMX), from /proc/cpuinfo:
    timings on AVX2-only cores and on bf16 cores are not comparable."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{isa}, " + (f"native bf16 ({', '.join(bf16)})" if bf16 else "no native bf16")


def cpu_generation() -> str:
    """The CPU's family and model numbers from /proc/cpuinfo, with AMD's core generation where they name one (family
    25: Zen 3/4, 26: Zen 5): hosts whose model name is just "AMD EPYC" differ by up to 30% in these benchmarks."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("cpu family", "model\t", "vendor_id")))
    except (OSError, ValueError):
        return "unknown"
    info = {k.strip(): v.strip() for k, v in info.items()}
    family, model = info.get("cpu family", "?"), info.get("model", "?")
    zen = {"25": "Zen 3/4", "26": "Zen 5"}.get(family) if info.get("vendor_id") == "AuthenticAMD" else None
    return f"family {family} model {model}" + (f" ({zen})" if zen else "")


def kernels() -> str:
    """Which vector kernels torch runs (``torch.backends.cpu.get_cpu_capability``; ``ATEN_CPU_CAPABILITY=avx2`` and
    ``ONEDNN_MAX_CPU_ISA=AVX2`` make an AVX-512 host run the AVX2 kernels that most users' cores have)."""
    cap = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return cap + (f", oneDNN at most {onednn}" if onednn else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what ``uptime`` prints)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment(device: torch.device) -> dict[str, Any]:
    """The header of every benchmark result."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "fakeprint": fakeprint.__version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_isa": cpu_isa(),
        "cpu_generation": cpu_generation(),
        "kernels": kernels(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_start": load_average(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def pick(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; refuses cuda when there is none."""
    from fakeprint.engine.runtime import pick_device

    return pick_device(device)


def sync(device: torch.device) -> None:
    """Wait for the device: put this on both sides of every timed region."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------- memory

def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator statistics, or the process's peak RSS (Linux ``clear_refs``)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then stays the process's peak so far (reported as such)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: ``max_memory_allocated`` since the last reset. CPU: peak RSS since the last reset (VmHWM),
    or the process's lifetime peak (``ru_maxrss``) where the kernel cannot reset it."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return process_peak_rss_mb()


def process_peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Lifetime peak RSS (``resource.getrusage``), of this process or of its largest waited-for child."""
    kb = resource.getrusage(who).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU time of this process (or of its terminated, waited-for children)."""
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM, reset per phase)"


# ----------------------------------------------------------------------------------------- data/steps

def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``n`` items with the class proportions of ``labels`` (all of them if n >= len)."""
    labels = np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    for i in np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]:
        quota[i] += 1  # largest remainders first: exactly n in total
    picked = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked))


def forever(batches: Iterable) -> Iterator:
    """Batches from epoch after epoch of ``batches``: a ``DataLoader`` (each pass starts its workers and
    reshuffles) or a ``DeviceBatches`` (moved to its next epoch's permutation after each pass)."""
    while True:
        yield from batches
        if hasattr(batches, "set_epoch") and hasattr(batches, "epoch"):
            batches.set_epoch(batches.epoch + 1)


class Chunk:
    """The next ``n`` items of an iterator, as an iterable with a length (what a training loop expects)."""

    def __init__(self, iterator: Iterator, n: int):
        self.iterator, self.n = iterator, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return itertools.islice(self.iterator, self.n)


# ------------------------------------------------------------------------------------------- output

def emit(result: dict[str, Any], out: str | Path | None) -> None:
    """Print the result as JSON on stdout; with ``out``, also write it there (atomically)."""
    result.setdefault("environment", {})["load_avg_end"] = load_average()
    text = json.dumps(result, indent=2) + "\n"
    sys.stdout.write(text)
    sys.stdout.flush()
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)


def log(msg: str) -> None:
    """Progress for the human watching: on stderr, so stdout stays one JSON object."""
    print(msg, file=sys.stderr, flush=True)
