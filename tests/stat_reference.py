"""Fixed images for the statistics' reference numbers (tests/data/stat_reference_v7.npz, written by the statistics
before they were made faster): made by integer arithmetic only, so that every machine and numpy makes the same."""

from __future__ import annotations

import numpy as np


def _hash_noise(n: int, seed: int) -> np.ndarray:
    """``n`` pseudo-random values 0-255 from a fixed integer hash (no random generator involved)."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(seed * 7919)
    h = (i * np.uint64(2654435761) + np.uint64(seed * 97 + 13)) % np.uint64(2 ** 32)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(1274126177) % np.uint64(2 ** 32)
    return ((h >> np.uint64(11)) % np.uint64(256)).astype(np.int64)


def reference_images() -> np.ndarray:
    """4 x 100 x 100 x 3 uint8: a noisy gradient, strong noise, a nearly flat colour with faint noise, and blocks."""
    yy, xx = np.mgrid[0:100, 0:100]
    out = np.empty((4, 100, 100, 3), np.int64)
    for c in range(3):
        noise = [_hash_noise(10_000, 4 * c + k).reshape(100, 100) for k in range(4)]
        out[0, ..., c] = (xx * (2 + c) + yy) % 200 + noise[0] // 8
        out[1, ..., c] = noise[1]
        out[2, ..., c] = 120 + 10 * c + noise[2] // 64
        out[3, ..., c] = ((yy // 10 + xx // 10 + c) % 3) * 90 + noise[3] // 32
    return np.clip(out, 0, 255).astype(np.uint8)
