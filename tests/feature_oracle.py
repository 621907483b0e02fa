"""The hand-made image statistics written out in numpy, one group at a time: the oracle that
``features.statistics.StatFeatures`` is tested against (tests/test_hybrid.py, tests/test_feature_oracle.py)."""

from __future__ import annotations

import numpy as np

GROUPS = ("colour", "residual", "cooccurrence", "spectrum")


EXTRA_GROUPS = ("chroma", "cooccurrence_rgb", "multiscale", "gradient")  # feature set v2 = GROUPS + these


def _hist(values: np.ndarray, bins: int) -> np.ndarray:
    """Row-wise histogram of values in [0, 1]: N x bins, each row summing to 1."""
    n, p = values.shape
    idx = np.minimum((values * bins).astype(np.int64), bins - 1) + bins * np.arange(n)[:, None]
    return np.bincount(idx.ravel(), minlength=n * bins).reshape(n, bins) / p


def _radial(power: np.ndarray, rad: np.ndarray, nbins: int) -> np.ndarray:
    """Mean of N x H x W power over rings of integer radius ``rad`` (H x W), in log scale."""
    n = len(power)
    counts = np.bincount(rad.ravel(), minlength=nbins)
    sums = np.stack([np.bincount(rad.ravel(), weights=p.ravel(), minlength=nbins) for p in power])
    assert sums.shape == (n, nbins)
    return np.log(sums / counts + 1e-8)


def features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """The statistics of N x H x W x 3 uint8 images, by group (each N x k float32)."""
    b = batch.astype(np.float32) / 255.0
    n, h, w, _ = b.shape
    out: dict[str, list[np.ndarray]] = {g: [] for g in GROUPS}
    mx, mn, grey = b.max(-1), b.min(-1), b.mean(-1)
    sat = (mx - mn) / (mx + 1e-6)
    for ch in (b[..., 0], b[..., 1], b[..., 2], sat, mx, grey):
        f = ch.reshape(n, -1)
        out["colour"] += [f.mean(1, keepdims=True), f.std(1, keepdims=True),
                          np.percentile(f, [1, 5, 25, 50, 75, 95, 99], axis=1).T, _hist(f, 16)]
    # noise residual: the image minus its 3x3 box mean, per channel
    p = np.pad(b, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    res = b - sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9
    for c in range(3):
        r = res[..., c].reshape(n, -1)
        var = r.var(1)
        kurt = ((r - r.mean(1, keepdims=True)) ** 4).mean(1) / (var ** 2 + 1e-12)
        out["residual"] += [r.std(1)[:, None], np.abs(r).mean(1)[:, None], kurt[:, None]]
    # neighbouring differences of the grey image (0-255), truncated to +-4: histogram and co-occurrence
    out["cooccurrence"] += _cooccurrence(grey * 255)
    # power spectra: of the grey residual (radial and 10 x 10 blocks) and of the grey image (radial)
    yy, xx = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
    rad = np.sqrt(yy ** 2 + xx ** 2).astype(np.int64).clip(0, h // 2 - 1)
    spec = np.abs(np.fft.fftshift(np.fft.fft2(res.mean(-1)), axes=(1, 2))) ** 2
    out["spectrum"] += [_radial(spec, rad, h // 2),
                        np.log(spec + 1e-8).reshape(n, 10, h // 10, 10, w // 10).mean((2, 4)).reshape(n, -1)]
    centred = grey - grey.mean((1, 2), keepdims=True)
    out["spectrum"].append(_radial(np.abs(np.fft.fftshift(np.fft.fft2(centred), axes=(1, 2))) ** 2, rad, h // 2))
    return {g: np.concatenate(v, 1).astype(np.float32) for g, v in out.items()}


def _cooccurrence(grey255: np.ndarray) -> list[np.ndarray]:
    """Histogram (9) and pair co-occurrence (81) of horizontal and vertical differences truncated to +-4."""
    n, h, w = grey255.shape
    out = []
    for dy, dx in ((0, 1), (1, 0)):
        q = np.clip(np.round(grey255[:, dy:, dx:] - grey255[:, :h - dy, :w - dx]), -4, 4).astype(np.int64) + 4
        out.append(_hist(q.reshape(n, -1) / 9.0 + 1e-6, 9))
        a, c2 = (q[:, :, :-1], q[:, :, 1:]) if dx else (q[:, :-1, :], q[:, 1:, :])
        out.append(_hist((a * 9 + c2).reshape(n, -1) / 81.0 + 1e-6, 81))
    return out


def extra_features(batch: np.ndarray) -> dict[str, np.ndarray]:
    """Feature set v2's additions: chroma and hue, per-channel co-occurrences, the same at half resolution,
    gradient and Laplacian statistics, and the correlation of the channels' noise residuals."""
    b = batch.astype(np.float32) / 255.0
    n, h, w, _ = b.shape
    r, g, bl = b[..., 0], b[..., 1], b[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb, cr = (bl - y) / 1.772 + 0.5, (r - y) / 1.402 + 0.5
    mx, mn = b.max(-1), b.min(-1)
    chroma = mx - mn
    hue = np.where(mx == r, (g - bl) / (chroma + 1e-6), np.where(mx == g, 2 + (bl - r) / (chroma + 1e-6),
                                                                  4 + (r - g) / (chroma + 1e-6)))
    hue = (hue / 6.0) % 1.0
    hue_w = np.stack([np.bincount(np.minimum((hh * 16).astype(np.int64), 15).ravel(), weights=cc.ravel(),
                                  minlength=16) for hh, cc in zip(hue, chroma, strict=True)])
    out: dict[str, list[np.ndarray]] = {k: [] for k in EXTRA_GROUPS}
    out["chroma"] += [_hist(np.clip(cb, 0, 1).reshape(n, -1), 16), _hist(np.clip(cr, 0, 1).reshape(n, -1), 16),
                      hue_w / (hue_w.sum(1, keepdims=True) + 1e-6)]
    p = np.pad(b, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    res = (b - sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9).reshape(n, -1, 3)
    res = res - res.mean(1, keepdims=True)
    sd = res.std(1) + 1e-8
    corr = [(res[..., i] * res[..., j]).mean(1) / (sd[:, i] * sd[:, j]) for i, j in ((0, 1), (1, 2), (0, 2))]
    out["chroma"].append(np.stack(corr, 1))
    for c in range(3):
        out["cooccurrence_rgb"] += _cooccurrence(b[..., c] * 255)
    half = (b.reshape(n, h // 2, 2, w // 2, 2, 3).mean((2, 4)).mean(-1)) * 255
    out["multiscale"] += _cooccurrence(half)
    grey = b.mean(-1)
    gx, gy = grey[:, :, 1:] - grey[:, :, :-1], grey[:, 1:, :] - grey[:, :-1, :]
    mag = np.sqrt(gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2).reshape(n, -1)
    lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
           - grey[:, 1:-1, 2:]).reshape(n, -1)
    out["gradient"] += [_hist(np.clip(mag * 4, 0, 1 - 1e-6), 16), np.log(lap.var(1) + 1e-8)[:, None],
                        np.percentile(mag, [50, 90, 99], axis=1).T]
    return {k: np.concatenate(v, 1).astype(np.float32) for k, v in out.items()}


def all_features(images: np.ndarray, feature_set: str = "v1", chunk: int = 500) -> dict[str, np.ndarray]:
    def one(batch):
        f = features(batch)
        return f | extra_features(batch) if feature_set == "v2" else f
    parts = [one(images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {g: np.concatenate([p[g] for p in parts]) for g in parts[0]}
