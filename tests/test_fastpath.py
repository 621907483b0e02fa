"""The fast training path: the decoded cache, device batches, batched augmentation, bf16 autocast on CPU,
and a smoke run of the throughput benchmark."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import private_copy
from fakeprint.data import cache as cache_module
from fakeprint.data.cache import load_split
from fakeprint.data.demo import make_demo_dataset
from fakeprint.data.loader import DeviceBatches
from fakeprint.engine.config import load_config
from fakeprint.engine.training.loop import train_one_epoch
from fakeprint.engine.training.setup import Dist, build_optimizer
from fakeprint.features.augment import augment
from fakeprint.features.preprocess import normalize, to_float
from fakeprint.models import create_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fastpath") / "data"
    make_demo_dataset(root, n_train=30, n_val=10, n_test=0, seed=3)
    return root


@pytest.fixture
def data(master, tmp_path) -> Path:
    return private_copy(master, tmp_path)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Counts the decoding passes of ``load_split`` (one per cache build)."""
    calls: list[int] = []
    real = cache_module._decode_all

    def spy(paths, *args, **kwargs):
        calls.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_decode_all", spy)
    return calls


def _load(data: Path, cache_dir: Path | None):
    return load_split(data, "train", cache_dir=cache_dir, workers=1, progress=False)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rewrite(path: Path, seed: int) -> np.ndarray:
    """Replace an image with other content (and a later mtime); returns the new pixels."""
    pixels = np.random.default_rng(seed).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    return pixels


# --------------------------------------------------------------------------------------------- cache

def test_cache_first_load_builds_second_memory_maps(data, tmp_path, decodes):
    first = _load(data, tmp_path / "cache")
    assert decodes == [30]
    assert not isinstance(first.images, np.memmap)
    assert len(list((tmp_path / "cache").glob("*/train.npy"))) == 1
    second = _load(data, tmp_path / "cache")
    assert decodes == [30], "a fresh cache must not be decoded again"
    assert isinstance(second.images, np.memmap)
    assert second.ids == first.ids
    np.testing.assert_array_equal(second.labels, first.labels)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.images[7], _pixels(data / "train" / f"{second.ids[7]}.png"))


def test_cache_changed_image_is_rebuilt(data, tmp_path, decodes):
    before = _load(data, tmp_path / "cache")
    new = _rewrite(data / "train" / f"{before.ids[3]}.png", seed=1)
    after = _load(data, tmp_path / "cache")
    assert len(decodes) == 2
    np.testing.assert_array_equal(after.images[3], new)
    np.testing.assert_array_equal(after.images[4], before.images[4])


def test_cache_added_image_is_rebuilt(data, tmp_path, decodes):
    before = _load(data, tmp_path / "cache")
    new = _rewrite(data / "train" / "extra.png", seed=2)
    with open(data / "train.csv", "a") as f:
        f.write("extra,4\n")
    after = _load(data, tmp_path / "cache")
    assert len(decodes) == 2
    assert len(after) == len(before) + 1 and after.ids[-1] == "extra" and after.labels[-1] == 4
    np.testing.assert_array_equal(after.images[-1], new)


@pytest.mark.parametrize("damage", ["npy", "manifest"])
def test_corrupted_cache_is_rebuilt(data, tmp_path, decodes, damage):
    good = np.array(_load(data, tmp_path / "cache").images)
    (npy,) = (tmp_path / "cache").glob("*/train.npy")
    if damage == "npy":
        raw = bytearray(npy.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # same size: only the hash can tell
        npy.write_bytes(bytes(raw))
    else:
        npy.with_suffix(".json").write_text("{not json")
    rebuilt = _load(data, tmp_path / "cache")
    assert len(decodes) == 2
    np.testing.assert_array_equal(rebuilt.images, good)
    again = _load(data, tmp_path / "cache")
    assert len(decodes) == 2 and isinstance(again.images, np.memmap), "the rebuilt cache must be trusted again"


def test_read_only_data_folder_falls_back_to_home_cache(data, tmp_path, decodes, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("FAKEPRINT_CACHE", raising=False)
    real_access = os.access
    locked = {data.resolve(), (data / ".fakeprint-cache").resolve()}

    def access(path, mode, **kw):  # root ignores permission bits: make the check see a read-only folder
        if mode & os.W_OK and Path(path).resolve() in locked:
            return False
        return real_access(path, mode, **kw)

    monkeypatch.setattr(cache_module.os, "access", access)
    os.chmod(data, 0o555)
    try:
        first = _load(data, None)
        second = _load(data, None)
    finally:
        os.chmod(data, 0o755)
    assert not (data / ".fakeprint-cache").exists()
    assert len(list((home / ".cache" / "fakeprint").glob("*/train.npy"))) == 1
    assert len(decodes) == 1 and isinstance(second.images, np.memmap)
    np.testing.assert_array_equal(second.images, first.images)


# ------------------------------------------------------------------------------------- device batches

def _epoch(b: DeviceBatches) -> list[torch.Tensor]:
    return [x for x, _ in b]


def _make(n: int, bs: int, **kw) -> DeviceBatches:
    return DeviceBatches(torch.arange(n), torch.arange(n) % 5, bs, **kw)


def test_each_epoch_is_a_permutation():
    b = _make(103, 10, drop_last=False, seed=4)
    for epoch in range(3):
        b.set_epoch(epoch)
        got = torch.cat(_epoch(b))
        assert torch.equal(got.sort().values, torch.arange(103))
        assert len(_epoch(b)) == len(b) == 11
    b = _make(103, 10, drop_last=True, seed=4)
    got = torch.cat(_epoch(b))
    assert len(got) == 100 == len(b) * 10 and len(got.unique()) == 100
    for x, y in b:
        assert torch.equal(y, x % 5), "labels must travel with their images"


def test_epochs_differ_and_seed_reproduces():
    a, b, c = _make(64, 8, seed=1), _make(64, 8, seed=1), _make(64, 8, seed=2)
    first = torch.cat(_epoch(a))
    assert torch.equal(first, torch.cat(_epoch(b))), "same seed and epoch: same order"
    assert not torch.equal(first, torch.cat(_epoch(c))), "another seed: another order"
    a.set_epoch(1)
    assert not torch.equal(first, torch.cat(_epoch(a))), "another epoch: another order"
    a.set_epoch(0)
    assert torch.equal(first, torch.cat(_epoch(a))), "an epoch's order is a function of (seed, epoch)"


@pytest.mark.parametrize(("n", "bs", "world"), [(101, 10, 2), (101, 11, 3), (64, 8, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ddp_shards_are_disjoint_and_cover(n, bs, world, drop_last):
    full = _make(n, bs, seed=5, drop_last=drop_last)
    full.set_epoch(2)
    perm = full.indices()
    ranks = [_make(n, bs, seed=5, drop_last=drop_last, rank=r, world_size=world) for r in range(world)]
    served = []
    for b in ranks:
        b.set_epoch(2)
        got = _epoch(b)
        assert len(got) == len(b), "every rank must run exactly len(batches) steps, or DDP hangs"
        served.append(torch.cat(got))
    assert len({len(b) for b in ranks}) == 1
    shards = torch.cat([b.indices() for b in ranks])
    union = torch.cat(served)
    if drop_last:
        per_rank = n // world
        assert len(shards.unique()) == len(shards) == per_rank * world, "shards overlap"
        assert set(shards.tolist()) == set(perm[: per_rank * world].tolist()), "shards must cover the epoch"
        assert len(union.unique()) == len(union) == (per_rank // bs) * bs * world
    else:
        assert set(union.tolist()) == set(range(n)), "shards must cover every sample"
        assert len(union) - len(union.unique()) < world, "only the wrap-round padding may repeat"


# ---------------------------------------------------------------------------------------- augment

def _copies(n: int = 64, seed: int = 0) -> torch.Tensor:
    """n copies of one random (asymmetric) image, uint8 N x H x W x 3."""
    one = torch.randint(0, 256, (1, 100, 100, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return one.expand(n, -1, -1, -1).contiguous()


def _cfg(**kw) -> dict:
    base = {"hflip": False, "vflip": False, "rot90": False, "rotation": 0.0, "translate": 0, "color_jitter": 0.0,
            "rotation_interp": "nearest"}
    return base | kw


def test_flip_parameters_differ_per_sample():
    x = to_float(_copies())
    out = augment(x, _cfg(hflip=True), torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, x[0].flip(2)) for o in out]
    kept = [torch.equal(o, x[0]) for o in out]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54, "each sample draws its own flip"


def test_rotation_parameters_differ_per_sample():
    x = to_float(_copies())
    out = augment(x, _cfg(rotation=15.0), torch.Generator().manual_seed(0))
    distinct = {o.numpy().tobytes() for o in out}
    assert len(distinct) > 48, "each sample draws its own angle"
    corner_zeroed = (out[:, :, 0, 0] == 0).all(dim=1).float().mean()
    assert corner_zeroed > 0.5, "rotated images get zero fill in their corners"


def test_augment_off_is_identity():
    x = to_float(torch.randint(0, 256, (8, 100, 100, 3), dtype=torch.uint8))
    out = augment(x, _cfg(), torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_flips_folded_into_rotation_match_flip_then_rotate():
    n, rot = 32, 15.0
    x = to_float(torch.randint(0, 256, (n, 100, 100, 3), generator=torch.Generator().manual_seed(1),
                               dtype=torch.uint8))
    out = augment(x, _cfg(hflip=True, vflip=True, rotation=rot), torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)  # the same draws, in augment's order, applied one by one
    h = torch.rand(n, generator=g) < 0.5
    v = torch.rand(n, generator=g) < 0.5
    angle = (torch.rand(n, generator=g) * 2 * rot - rot) * (torch.pi / 180)
    ref = torch.where(h.view(n, 1, 1, 1), x.flip(3), x)
    ref = torch.where(v.view(n, 1, 1, 1), ref.flip(2), ref)
    theta = torch.stack([angle.cos(), -angle.sin(), torch.zeros(n), angle.sin(), angle.cos(), torch.zeros(n)], 1)
    grid = F.affine_grid(theta.view(n, 2, 3), list(x.shape), align_corners=False)
    ref = F.grid_sample(ref, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    mismatch = (out != ref).float().mean().item()
    assert mismatch < 1e-3, f"{mismatch:.2%} of values differ (only nearest-neighbour ties may)"


@pytest.mark.parametrize("cfg", [_cfg(hflip=True, rotation=15.0), _cfg(vflip=True, rot90=True, translate=4),
                                 _cfg(hflip=True, rotation=10.0, rotation_interp="bilinear", color_jitter=0.3)])
def test_augment_shape_dtype_range_and_determinism(cfg):
    x = to_float(torch.randint(0, 256, (6, 100, 100, 3), dtype=torch.uint8))
    a = augment(x, cfg, torch.Generator().manual_seed(3))
    b = augment(x, cfg, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 100, 100) and a.dtype == torch.float32
    assert torch.equal(a, b), "same generator state: same augmentation"
    assert a.min() >= 0 and a.max() <= 1
    z = normalize(a)
    assert z.shape == a.shape and z.dtype == torch.float32 and torch.isfinite(z).all()


def test_bf16_autocast_training_step_close_to_fp32():
    torch.manual_seed(0)
    base = create_model("threecnn", 5)
    x = torch.randint(0, 256, (8, 100, 100, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    y = torch.arange(8) % 5  # one step of 8
    cfg = load_config("threecnn", {"progress": False})
    results = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model = copy.deepcopy(base)
        seen = []
        model.classifier.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        torch.manual_seed(1)  # the same dropout masks
        stats = train_one_epoch(model, DeviceBatches(x, y, 8, seed=0), opt=build_optimizer(cfg, model), sched=None,
                                per_step=False, loss_fn=torch.nn.CrossEntropyLoss(), cfg=cfg,
                                device=torch.device("cpu"), amp_dtype=dtype, scaler=None, ema=None,
                                gen=torch.Generator().manual_seed(3), d=Dist(), desc=name)
        assert seen and all(d == (dtype or torch.float32) for d in seen), f"{name}: logits were {seen}"
        assert all(torch.isfinite(p).all() for p in model.parameters())
        results[name] = stats["train_loss"]
    assert np.isfinite(results["bf16"])
    assert abs(results["bf16"] - results["fp32"]) < 0.05 * results["fp32"] + 0.02, results


# ---------------------------------------------------------------------------------------- benchmark

def test_train_throughput_benchmark_smoke(tmp_path):
    data = make_demo_dataset(tmp_path / "data", n_train=50, n_val=0, n_test=0, seed=4)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--data", str(data), "--images", "40",
         "--model", "fpnet_tiny", "--device", "cpu", "--batch-size", "4", "--steps", "2", "--warmup", "1",
         "--rounds", "2", "--workers", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    env = result["environment"]
    for key in ("device", "torch", "fakeprint", "commit", "python", "cpu_count", "load_avg_start", "load_avg_end"):
        assert key in env, key
    assert env["torch"] == torch.__version__
    assert result["model"] == "fpnet_tiny" and result["images"] == 40 and result["batch_size"] == 4
    assert result["cache_build_images"] == 50 and result["cache_build_s"] > 0
    ips = result["images_per_s"]
    assert ips["report_style"] > 0 and ips["fakeprint"] > 0
    assert result["ratio"] == pytest.approx(ips["fakeprint"] / ips["report_style"], rel=0.01)
    assert result["peak_memory_mb"]["report_style"] > 0 and result["peak_memory_mb"]["fakeprint"] > 0
    for path in ("report_style", "fakeprint"):
        rounds = result[path]["rounds"]
        assert len(rounds) == 2 and sum(r["images"] for r in rounds) == 2 * 4


def test_micro_batches_sum_to_the_same_step_as_the_whole_batch():
    """micro_batch only changes how a batch is pushed through the network: without BatchNorm or dropout, the
    summed slice gradients give the same update, with MixUp and distillation targets too."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                               torch.nn.Flatten(), torch.nn.Linear(24, 5))
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 256, (11, 12, 12, 3), generator=g, dtype=torch.uint8)
    y, soft = torch.arange(11) % 5, torch.randn(11, 5, generator=g)
    results = {}
    for micro in (0, 3):
        cfg = load_config("threecnn", {"progress": False, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                                       "mixup": 0.4, "micro_batch": micro, "distill_weight": 0.6})
        model = copy.deepcopy(base)
        stats = train_one_epoch(model, DeviceBatches(x, y, 11, seed=0, targets=soft), opt=build_optimizer(cfg, model),
                                sched=None, per_step=False, loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                cfg=cfg, device=torch.device("cpu"), amp_dtype=None, scaler=None, ema=None,
                                gen=torch.Generator().manual_seed(3), d=Dist(), desc=str(micro))
        results[micro] = (stats, [p.detach().clone() for p in model.parameters()])
    whole, sliced = results[0], results[3]
    assert all(not torch.equal(a, b) for a, b in zip(whole[1], base.parameters(), strict=True))  # it did train
    for a, b in zip(whole[1], sliced[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole[0]["train_loss"] == pytest.approx(sliced[0]["train_loss"], rel=1e-5)
    assert whole[0]["train_acc"] == sliced[0]["train_acc"] and sliced[0]["images"] == 11


def test_micro_slices_are_near_equal_and_never_leave_one_image_alone():
    from fakeprint.engine.training.loop import micro_slices

    assert micro_slices(32, 0) == [slice(0, 32)] and micro_slices(8, 8) == [slice(0, 8)]
    for n, micro in ((32, 8), (33, 8), (9, 8), (11, 3), (100, 7)):
        sizes = [s.stop - s.start for s in micro_slices(n, micro)]
        assert sum(sizes) == n and max(sizes) <= micro and min(sizes) >= 2 and max(sizes) - min(sizes) <= 1
    assert [s.stop - s.start for s in micro_slices(32, 8)] == [8, 8, 8, 8]


@pytest.mark.parametrize("backend,micro", [("torch", "2"), ("torch-plain", None)])
def test_cpu_inference_benchmark_smoke(tmp_path, backend, micro):
    from conftest_service import make_checkpoint

    run = make_checkpoint(tmp_path)
    cmd = [sys.executable, str(REPO / "benchmarks" / "cpu_inference.py"), "--checkpoint", str(run), "--images", "6",
           "--batch-size", "4", "--repeats", "1", "--backend", backend, "--tta"]
    proc = subprocess.run(cmd + (["--micro-batch", micro] if micro else []), capture_output=True, text=True,
                          timeout=180, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model"] == "fpnet_tiny" and result["images"] == 6 and result["tta"] is True
    assert result["micro_batch"] == (2 if backend == "torch" else 0) and result["images_per_s"]["median"] > 0


def test_cpu_inference_benchmark_measures_an_ensemble(tmp_path):
    from conftest_service import make_checkpoint

    runs = [make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)]
    cmd = [sys.executable, str(REPO / "benchmarks" / "cpu_inference.py"), "--images", "6", "--batch-size", "4",
           "--repeats", "1", "--tta"]
    for r in runs:
        cmd += ["--checkpoint", str(r)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["model"] == "ensemble(fpnet_tiny, fpnet_tiny)" and len(result["checkpoint"]) == 2
    onnx = subprocess.run(cmd + ["--backend", "onnx"], capture_output=True, text=True, timeout=180, env=env)
    assert onnx.returncode != 0 and "torch only" in onnx.stderr and "Traceback" not in onnx.stderr
