"""The embedded demo dataset: five synthetic "generators" that share one distribution of scene content
and differ only in generator-like artifacts, written in the report's layout (CSV + folders of PNGs).

- 0 ``nearest-upsampler``: the scene rendered at half resolution and upsampled by pixel repetition.
- 1 ``deconv-checkerboard``: a faint period-2 checkerboard, the trace of a strided transposed convolution.
- 2 ``spectral-peak``: a faint periodic grating, a single peak in the Fourier spectrum.
- 3 ``noise-texture``: i.i.d. sensor-like noise.
- 4 ``smooth-decoder``: a slightly blurred render with coarse quantisation (the subtle class).

Colour and content carry no information: a model must find the traces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GENERATORS = ("nearest-upsampler", "deconv-checkerboard", "spectral-peak", "noise-texture", "smooth-decoder")
SIZE = 100


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth random content in [0, 1]: a gradient, soft blobs and low-frequency colour noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    base = rng.uniform(0.2, 0.8, 3)
    gx, gy = rng.uniform(-0.4, 0.4, (2, 3))
    img[:] = base + gx * (xx[..., None] - 0.5) + gy * (yy[..., None] - 0.5)
    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(0, 1, 2)
        r = rng.uniform(0.05, 0.3)
        colour = rng.uniform(-0.5, 0.5, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * colour
    low = rng.uniform(-0.08, 0.08, (6, 6, 3)).astype(np.float32)
    low_img = np.asarray(Image.fromarray(((low + 0.5) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                         np.float32) / 255 - 0.5
    return np.clip(img + low_img, 0, 1)


def render(label: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One ``size x size x 3`` uint8 image from generator ``label``."""
    if label == 0:
        half = _scene(rng, size // 2)
        img = half.repeat(2, axis=0).repeat(2, axis=1)
    else:
        img = _scene(rng, size)
    yy, xx = np.mgrid[0:size, 0:size]
    if label == 1:
        checker = ((yy + xx) % 2 * 2 - 1).astype(np.float32)
        img = img + checker[..., None] * rng.uniform(0.012, 0.025)
    elif label == 2:
        period = rng.uniform(3.5, 4.5)
        angle = rng.choice([0.0, np.pi / 2, np.pi / 4])
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        img = img + wave[..., None].astype(np.float32) * rng.uniform(0.015, 0.03)
    elif label == 3:
        img = img + rng.normal(0, rng.uniform(0.02, 0.04), img.shape).astype(np.float32)
    elif label == 4:
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        img = sum(pad[i : i + size, j : j + size] for i in range(3) for j in range(3)) / 9
        levels = rng.integers(20, 40)
        img = np.round(img * levels) / levels
    if label != 3:
        img = img + rng.normal(0, 0.004, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_demo_dataset(out: str | Path, n_train: int = 2500, n_val: int = 500, n_test: int = 250,
                      seed: int = 0) -> Path:
    """Write a balanced five-class demo dataset in the report's layout; returns its folder."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        if n <= 0:  # no such split at all (an empty CSV would be a broken dataset)
            continue
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        labels = np.arange(n) % len(GENERATORS)
        rng.shuffle(labels)
        rows = []
        for i, label in enumerate(labels):
            image_id = f"{split[:2]}{i:05d}"
            Image.fromarray(render(int(label), rng)).save(folder / f"{image_id}.png", compress_level=1)
            rows.append(f"{image_id},{label}" if split != "test" else image_id)
        header = "image_id,label" if split != "test" else "image_id"
        (out / f"{split}.csv").write_text("\n".join([header, *rows]) + "\n")
    return out
