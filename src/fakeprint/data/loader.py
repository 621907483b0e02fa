"""Device batches: slices of one uint8 tensor (on the GPU when there is one), shuffled per epoch.

The permutation of each epoch is a pure function of (seed, epoch), so every DDP rank draws the same one
and takes its own shard, and a resumed run draws exactly the permutation the uninterrupted run would.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch


def tensor_view(images: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``images``' memory (contiguous first). A read-only array (a memory-mapped cache, a
    decoded batch) is used as it is: fakeprint only reads these tensors, so torch's "not writable" warning
    is silenced instead of paying for a copy."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(images))


def to_device_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Copy a (memory-mapped) uint8 array into one tensor on ``device`` (on the CPU: ``tensor_view``, no copy)."""
    t = tensor_view(images)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class DeviceBatches:
    """Iterate ``(images_uint8, labels)`` batches (``(images_uint8, labels, targets)`` when ``targets``, one
    row per image, is given). ``sampler``: ``shuffle`` (a permutation per epoch),
    ``balanced`` (class-balanced sampling with replacement) or ``sequential``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 sampler: str = "shuffle", drop_last: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1, targets: torch.Tensor | None = None):
        self.images, self.labels, self.targets = images, labels, targets
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        n = self.images.shape[0]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.sampler == "shuffle":
            idx = torch.randperm(n, generator=g)
        elif self.sampler == "balanced":
            labels = self.labels.cpu()
            counts = torch.bincount(labels).float()
            weights = (1.0 / counts.clamp_min(1))[labels]
            idx = torch.multinomial(weights, n, replacement=True, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per_rank = self._per_rank()
            if not self.drop_last:  # pad by wrapping so every rank has the same count
                idx = torch.cat([idx, idx[: per_rank * self.world_size - len(idx)]])
            idx = idx[self.rank : per_rank * self.world_size : self.world_size]
        return idx

    def _per_rank(self) -> int:
        """Samples each rank takes per epoch (the tail is dropped, or wrapped round so all ranks are equal)."""
        n = self.images.shape[0]
        if self.world_size == 1:
            return n
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        idx = self.indices().to(self.images.device)
        stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            b = idx[start : start + self.batch_size]
            labels = None if self.labels is None else self.labels[b]
            if self.targets is not None:  # per-image soft targets (a teacher's logits), same rows
                yield self.images[b], labels, self.targets[b]
            else:
                yield self.images[b], labels
