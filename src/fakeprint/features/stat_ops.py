"""The building blocks of the hand-made statistics: residual kernels, histograms and percentiles of counts,
co-occurrences, local binary patterns (``statistics.StatFeatures`` composes them into feature groups)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

# steganalysis-style residuals of the grey level (rich models): name, kernel (integers), quantisation step
SRM_KERNELS = (
    ("2nd", ((1, -2, 1),), 2),
    ("3rd", ((-1, 3, -3, 1),), 3),
    ("KB", ((-1, 2, -1), (2, -4, 2), (-1, 2, -1)), 4),
    ("KV", ((-1, 2, -2, 2, -1), (2, -6, 8, -6, 2), (-2, 8, -12, 8, -2), (2, -6, 8, -6, 2), (-1, 2, -2, 2, -1)), 12),
)


# srm_rgb (v4): the R, G, B residuals at one pixel, for these kernels (along rows, then along columns) and steps
SRM_RGB_KERNELS = ((((-1, 1),), 1), (((-1, 3, -3, 1),), 3), (SRM_KERNELS[2][1], 4))


# srm_chroma (v4): residuals of R - G and B - G, along rows and along columns
SRM_CHROMA_KERNELS = ((((-1, 1),), 1), (((1, -2, 1),), 2))


# srm_ycc (v5): the grey level's, R - G's and B - G's residuals at one pixel, along rows and along columns; the step
# of R - G and B - G (the grey level's: three times it)
SRM_YCC_KERNELS = ((((-1, 1),), 1), (((1, -2, 1),), 2))


# lbp (v5): the eight neighbours (dy, dx) of a pixel, bit 0 first, clockwise from the top left
LBP_NEIGHBOURS = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))


# lbp_pairs (v6): an 8-bit pattern's rotation-invariant uniform code: its number of set bits where the bits change at
# most twice around the ring (LBP_NEIGHBOURS go round it), else 9
LBP_UNIFORM = tuple(bin(c).count("1") if bin(c ^ ((c >> 1) | ((c & 1) << 7))).count("1") <= 2 else 9
                    for c in range(256))


def _column(rows: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    """A 1-D kernel along rows, transposed: the same kernel along columns."""
    return tuple((v,) for v in rows[0])


def _views(kernels: tuple) -> tuple:
    """(kernel, step) pairs in order: each 1-D kernel along rows then along columns, each 2-D kernel once."""
    return tuple((kern, q) for rows, q in kernels for kern in ((rows, _column(rows)) if len(rows) == 1 else (rows,)))


SRM_RGB_VIEWS = _views(SRM_RGB_KERNELS)


SRM_YCC_VIEWS = _views(SRM_YCC_KERNELS)


SRM_T = 2  # residuals rounded and truncated to -T..T: 5 values, 125 triples


PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


RINGS = 50


def _hist(v: torch.Tensor, bins: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise histogram of B x N values in [0, 1] into ``bins`` equal bins; rows sum to 1 (unweighted) or
    hold the weights' sums (weighted)."""
    idx = (v * bins).floor().clamp_(0, bins - 1).long()
    w = torch.ones_like(v) if weights is None else weights
    out = torch.zeros(v.shape[0], bins, device=v.device, dtype=v.dtype).scatter_add_(1, idx, w)
    return out / int(v.shape[1]) if weights is None else out


def _scatter_counts(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Row-wise counts (float32) of B x N integer indices in [0, bins)."""
    ones = torch.ones(1, device=idx.device, dtype=torch.float32).expand(idx.shape)  # no pass to fill a tensor of ones
    return torch.zeros(idx.shape[0], bins, device=idx.device).scatter_add_(1, idx, ones)


def _counts(idx: torch.Tensor, bins: int) -> torch.Tensor:
    """Row-wise histogram of B x N integer bin indices in [0, bins), as fractions."""
    return _scatter_counts(idx, bins) / int(idx.shape[1])


def _var(v: torch.Tensor) -> torch.Tensor:
    """Row-wise population variance, two passes (faster than ``Tensor.var`` on the CPU)."""
    c = v - v.mean(1, keepdim=True)
    return (c * c).mean(1)


def _percentiles(v: torch.Tensor, qs: tuple[int, ...]) -> torch.Tensor:
    """Row-wise percentiles of B x N values with linear interpolation (numpy's default)."""
    s = v.sort(dim=1).values
    n = int(v.shape[1])
    cols = []
    for q in qs:
        pos = q / 100 * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        cols.append(s[:, lo] + (pos - lo) * (s[:, hi] - s[:, lo]))
    return torch.stack(cols, 1)


def _percentiles_of_counts(counts: torch.Tensor, n: int, qs: tuple[int, ...], value) -> torch.Tensor:
    """Row-wise percentiles (as ``_percentiles``) of ``n`` values a row given as counts over value levels in
    ascending order; ``value`` maps level indices (a long tensor) to the levels' values."""
    cdf = counts.cumsum(1)
    pos = [q / 100 * (n - 1) for q in qs]
    lo = [int(math.floor(p)) for p in pos]
    ranks = lo + [min(r + 1, n - 1) for r in lo]
    if torch.onnx.is_in_onnx_export():  # ONNX has no searchsorted: count the levels below each rank
        at = torch.stack([(cdf <= r).sum(1) for r in ranks], 1)
    else:  # the number of levels whose cumulative count is <= rank i: the level of order statistic i
        want = torch.tensor(ranks, dtype=cdf.dtype, device=cdf.device).expand(cdf.shape[0], -1).contiguous()
        at = torch.searchsorted(cdf, want, right=True)
    v = value(at)
    k = len(qs)
    frac = torch.tensor([p - r for p, r in zip(pos, lo, strict=True)], dtype=v.dtype, device=v.device)
    return v[:, :k] + frac * (v[:, k:] - v[:, :k])


def _top_percentiles(v: torch.Tensor, qs: tuple[int, ...]) -> torch.Tensor:
    """``_percentiles`` for percentiles of 50 and above without a sort: order statistics in the top quarter from
    one sorted ``topk`` of the largest values, the others as the largest of the smallest (an unsorted ``topk``).
    The same numbers, several times faster."""
    n = int(v.shape[1])
    need = set()
    plan = []
    for q in qs:
        if q < 50:
            raise ValueError("_top_percentiles serves percentiles of 50 and above")
        pos = q / 100 * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        plan.append((pos - lo, lo, hi))
        need.update((lo, hi) if pos > lo else (lo,))
    upper = [i for i in need if n - i <= n // 4 + 1]
    top = v.topk(n - min(upper), 1).values if upper else None  # descending: rank i at n - 1 - i
    at = {i: top[:, n - 1 - i] if i in upper else v.topk(i + 1, 1, largest=False, sorted=False).values.amax(1)
          for i in sorted(need)}
    cols = [at[lo] if frac == 0 else at[lo] + frac * (at[hi] - at[lo]) for frac, lo, hi in plan]
    return torch.stack(cols, 1)


def _cooccurrence(k: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
    """Histogram (9) and pair co-occurrence (81) of horizontal and vertical differences of the image
    ``k / n`` (0-255 scale) rounded and truncated to +-4. ``k`` holds exact integers (sums of ``n`` uint8
    values), so that the rounded differences, ties included, are the same in every implementation."""
    b, h, w = k.shape
    out = []
    for dy, dx in ((0, 1), (1, 0)):
        q = k[:, dy:, dx:] - k[:, :h - dy, :w - dx]
        if n != 1:  # a difference of integers is already one
            q = q.div_(n).round_()
        q = q.clamp_(-4, 4).add_(4)
        out.append(_counts(q.reshape(b, -1).long(), 9))
        a, c = (q[:, :, :-1], q[:, :, 1:]) if dx else (q[:, :-1, :], q[:, 1:, :])
        out.append(_counts(torch.add(c, a, alpha=9).reshape(b, -1).long(), 81))
    return out


@functools.lru_cache(maxsize=1)
def _saturation_values() -> tuple[np.ndarray, np.ndarray]:
    """The saturation (max - min) / (max + 1e-6) takes at most 32,896 values, one per pair of levels min <= max:
    those values in ascending order (float32, the operations of ``StatFeatures._colour`` in the same precision;
    tested equal) and the rank of each pair's value, indexed max * 256 + min (made with numpy: constants, also
    under ONNX tracing)."""
    lv = np.arange(256, dtype=np.float32) / np.float32(255)  # the levels as ``forward`` makes them
    a, c = np.meshgrid(lv, lv, indexing="ij")  # pair (max a, min c)
    sat = ((a - c) / (a + np.float32(1e-6))).reshape(-1)
    values = np.unique(sat[(a >= c).reshape(-1)])  # sorted
    rank = np.minimum(np.searchsorted(values, sat), len(values) - 1)  # pairs with min > max: never used
    return values.astype(np.float32), rank.astype(np.int64)


def _is_antisymmetric(rows: tuple[tuple[int, ...], ...]) -> bool:
    """A 1-D kernel that changes sign when reversed (odd orders): a mirrored image's residual is negated."""
    return len(rows) == 1 and tuple(rows[0]) == tuple(-v for v in reversed(rows[0]))


def _correlate(img: torch.Tensor, kernel: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """``F.conv2d(img, kernel)`` per channel (valid, no padding) for a small integer kernel, as a sum of shifted
    views: exact on integer images, and many times faster than a convolution with one channel in and out."""
    kh, kw = len(kernel), len(kernel[0])
    h, w = int(img.shape[2]) - kh + 1, int(img.shape[3]) - kw + 1
    out = None
    for dy, row in enumerate(kernel):
        for dx, c in enumerate(row):
            if c:
                view = img[:, :, dy:dy + h, dx:dx + w]
                # one pass a tap: the product and the sum together (exact: integers far below 2^24)
                out = view * float(c) if out is None else out.add_(view, alpha=float(c))
    assert out is not None
    return out


def _quantise(r: torch.Tensor, step: float) -> torch.Tensor:
    """Residuals (exact integers) / step, rounded and truncated to -SRM_T..SRM_T, shifted to 0..2 SRM_T."""
    return r.div(step).round_().clamp_(-SRM_T, SRM_T).add_(SRM_T)  # one new tensor, the rest in place


def _rgb_triples(k: torch.Tensor, kernel: tuple[tuple[int, ...], ...],
                 step: float | tuple[float, float, float]) -> torch.Tensor:
    """Co-occurrence ((2T+1)^3 bins, fractions) of the three channels' residuals (``kernel``, quantised by ``step``,
    or by one step per channel) at one pixel of B x 3 x H x W levels (R, G, B; or srm_ycc's planes)."""
    n = 2 * SRM_T + 1
    r = _correlate(k, kernel)
    r = (torch.cat([_quantise(r[:, c:c + 1], q) for c, q in enumerate(step)], 1) if isinstance(step, tuple)
         else _quantise(r, step)).reshape(k.shape[0], 3, -1)
    return _counts(((r[:, 0] * n + r[:, 1]) * n + r[:, 2]).long(), n ** 3)


def _triples(r: torch.Tensor, axis: int) -> torch.Tensor:
    """Co-occurrence (fractions, (2T+1)^3 bins) of three neighbouring values of B x H x W levels along ``axis``."""
    n = 2 * SRM_T + 1
    if axis == 2:
        a, b, c = r[:, :, :-2], r[:, :, 1:-1], r[:, :, 2:]
    else:
        a, b, c = r[:, :-2], r[:, 1:-1], r[:, 2:]
    idx = ((a * n + b) * n + c).reshape(r.shape[0], -1).long()
    return _counts(idx, n ** 3)


_SHARED = threading.local()


@dataclasses.dataclass
class _Entry:
    """What one ``StatFeatures`` call computed inside ``shared_statistics``; ``prints``: its rows' fingerprints,
    made the first time another call looks for its rows."""

    key: tuple
    groups: tuple[str, ...]
    x: torch.Tensor
    out: tuple[torch.Tensor, ...]
    prints: list[tuple[float, ...]] | None = None


@contextlib.contextmanager
def shared_statistics() -> Iterator[None]:
    """Within this block (in this thread), a ``StatFeatures`` given an input already seen, equal in every value
    and normalised the same way, by one of the same or a larger feature set takes its numbers from there instead
    of computing them again: each feature set's groups begin the next one's (v4's are the first 3,705 numbers of
    v5's), and each group is computed on its own. An ensemble of ``default`` (v4) and ``accurate`` (v5) computes
    the statistics once; run the larger set first. Entries live until the block ends."""
    before = getattr(_SHARED, "entries", None)
    _SHARED.entries = []
    try:
        yield
    finally:
        _SHARED.entries = before


def shared_or_computed(key: tuple, groups: tuple[str, ...], dim: int, x: torch.Tensor,
                       compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``compute()``, or, inside ``shared_statistics``, the first ``dim`` columns of what was computed under the
    same ``key`` (what is computed, the input's normalisation) by groups that begin with ``groups``, for an input
    equal to ``x``, or for inputs whose rows, taken together, hold every row of ``x`` (a routed ensemble computes
    every image's statistics once, then gives each member its share: ``engine.predict.RoutedClassifier``)."""
    entries: list[_Entry] | None = getattr(_SHARED, "entries", None)
    if entries is None:
        return compute()
    n = len(groups)
    same = [e for e in entries if e.key == key and e.groups[:n] == groups and e.x.shape[1:] == x.shape[1:]
            and e.x.dtype == x.dtype and e.x.device == x.device]
    for e in same:
        if e.x.shape == x.shape and torch.equal(e.x, x):
            return tuple(o[:, :dim] for o in e.out)
    rows = _rows_of(x, same) if same else None
    if rows is not None:
        return tuple(torch.stack([same[e].out[k][r, :dim] for e, r in rows]) for k in range(len(same[0].out)))
    out = compute()
    entries.append(_Entry(key, groups, x, out))
    return out


def _fingerprint(x: torch.Tensor) -> list[tuple[float, ...]]:
    """16 exact values of each row of ``x`` (candidates for equality, checked in full by ``_rows_of``), read in
    place whatever its memory layout."""
    size = int(np.prod(x.shape[1:]))
    pos = np.unravel_index(np.linspace(0, size - 1, 16).astype(np.int64), tuple(x.shape[1:]))
    return [tuple(r) for r in x[(slice(None), *(torch.from_numpy(p) for p in pos))].tolist()]


def _rows_of(x: torch.Tensor, entries: list[_Entry]) -> list[tuple[int, int]] | None:
    """(entry, row) of a row equal to each row of ``x``, in ``x``'s order; None unless every row is found."""
    index: dict[tuple, list[tuple[int, int]]] = {}
    for e, entry in enumerate(entries):
        if entry.prints is None:
            entry.prints = _fingerprint(entry.x)
        for r, f in enumerate(entry.prints):
            index.setdefault(f, []).append((e, r))
    found = []
    for i, f in enumerate(_fingerprint(x)):
        match = next(((e, r) for e, r in index.get(f, ()) if torch.equal(entries[e].x[r], x[i])), None)
        if match is None:
            return None
        found.append(match)
    return found
