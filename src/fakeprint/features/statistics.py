"""Hand-made image statistics as a parameter-free torch module: what ``experiments/feature_probe.py`` measured
with numpy (feature sets v1 and v2), computed on whole batches on any device.

A model that saw only these numbers (no convolution) scored 88.80% on the internal split with a small MLP,
and got right 26 of the 54 images that every CNN of rounds 3-6 got wrong (docs/results.md, round 7): the
statistics see the generators through other eyes than the CNNs. Groups, in order (feature set v1: the
first four, 539 numbers per image; v2: the first eight, 1,330; v3: nine, 2,580; v4: eleven, 3,705; v5: thirteen,
4,973; v6: fourteen, 5,573; v7: all, 6,454):

- ``colour``: for R, G, B, saturation, max and grey: mean, std, 7 percentiles, a 16-bin histogram;
- ``residual``: per channel, the image minus its 3x3 box mean: std, mean absolute value, log kurtosis;
- ``cooccurrence``: horizontal and vertical grey-level differences (0-255 scale) truncated to +-4: their
  9-bin histogram and the 81-bin co-occurrence of neighbouring differences;
- ``spectrum``: the power spectrum of the grey residual (50 rings, 10 x 10 blocks, in log) and of the
  centred grey image (50 rings);
- ``chroma`` (v2): Cb and Cr histograms, a chroma-weighted hue histogram, the residuals' channel correlations;
- ``cooccurrence_rgb`` (v2): ``cooccurrence`` for each of R, G, B;
- ``multiscale`` (v2): ``cooccurrence`` of the grey image at half resolution;
- ``gradient`` (v2): gradient-magnitude histogram and percentiles, log variance of the Laplacian;
- ``srm`` (v3): steganalysis-style rich-model residuals of the grey level (2nd and 3rd order differences, the
  3 x 3 "KB" and 5 x 5 "KV" kernels), each quantised and truncated to -2..2, and the co-occurrence of three
  neighbouring values (125 bins) along rows and along columns; and the co-occurrence of the R, G, B 2nd-order
  residuals at the same pixel (horizontal and vertical);
- ``srm_rgb`` (v4): the co-occurrence of the R, G, B residuals at the same pixel for 1st- and 3rd-order differences
  (along rows and along columns) and the KB kernel (5 x 125);
- ``srm_chroma`` (v4): residuals of the colour differences R - G and B - G (1st and 2nd order), quantised as
  ``srm``, and the co-occurrence of three neighbouring values: along rows for the residual along rows, along
  columns for the one along columns, the two histograms averaged (4 x 125). Colour-difference noise is where the
  generators differ most after the grey level's: chosen by 5-fold cross-validation on the internal split's
  training part (docs/results.md, round 10).
- ``srm_ycc`` (v5): the residuals of the grey level, R - G and B - G at one pixel, quantised (the grey level's step
  three times the colour differences', as it is the sum of three channels) and counted as one triple (125 bins), for
  the 1st- and 2nd-order differences along rows and along columns (4 x 125): how the noise of brightness and of
  colour go together;
- ``lbp`` (v5): local binary patterns of the grey level, R - G and B - G: for each pixel off the border, the 8 bits
  "this neighbour >= the pixel" (3 x 256 bins): the texture's shape whatever its contrast;
- ``lbp_pairs`` (v6): each pattern of ``lbp`` as its rotation-invariant uniform code (10 values: the number of
  neighbours set where the 8 bits change at most twice around the ring, else 9), and the co-occurrence of the codes
  of two neighbouring pixels, along rows and along columns (3 x 2 x 100): how texture patterns sit side by side.
- ``colour_joint`` (v7): the joint histogram of R, G and B at 8 levels each (512 bins), as the square root of each
  bin's fraction: the palette, which the per-channel statistics of ``colour`` cannot see;
- ``hsv_joint`` (v7): the joint histogram of hue (12 bins; 0 where the pixel is grey), saturation and value (4 bins
  each) of HSV (192 bins), square roots of fractions as ``colour_joint``;
- ``layout`` (v7): the mean and standard deviation of R, G and B in each cell of a 4 x 4 grid (96 numbers): where
  in the picture the colours are (composition);
- ``wavelet`` (v7): a three-level Haar decomposition of the grey level, R - G and B - G; for each level's three
  detail bands the log mean absolute value, log mean square and log kurtosis (81 numbers).
``srm_ycc`` and ``lbp`` were chosen by the same cross-validation (docs/results.md, round 12), ``lbp_pairs`` too
(round 13); the four groups of v7 together in round 20.

The input is the model's input (normalised as ``input_norm`` says); it is mapped back to [0, 1] and snapped
to the 1/255 grid, so the numbers are those of the uint8 image whatever the device or dtype. Computed in
float32 outside autocast. No parameters: nothing to train, nothing stored.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD
from fakeprint.features.stat_ops import (
    LBP_NEIGHBOURS,
    PERCENTILES,
    RINGS,
    SRM_CHROMA_KERNELS,
    SRM_KERNELS,
    SRM_RGB_VIEWS,
    SRM_T,
    SRM_YCC_VIEWS,
    _cooccurrence,
    _hist,
    _is_antisymmetric,
    _percentiles_of_counts,
    _saturation_values,
    _scatter_counts,
    _top_percentiles,
    _var,
    shared_or_computed,
)
from fakeprint.features.stat_texture import TextureGroups

GROUPS_V1 = ("colour", "residual", "cooccurrence", "spectrum")
GROUPS_V2 = GROUPS_V1 + ("chroma", "cooccurrence_rgb", "multiscale", "gradient")
GROUPS_V3 = GROUPS_V2 + ("srm",)
GROUPS_V4 = GROUPS_V3 + ("srm_rgb", "srm_chroma")
GROUPS_V5 = GROUPS_V4 + ("srm_ycc", "lbp")
GROUPS_V6 = GROUPS_V5 + ("lbp_pairs",)
GROUPS_V7 = GROUPS_V6 + ("colour_joint", "hsv_joint", "layout", "wavelet")
FEATURE_SETS = {"v1": GROUPS_V1, "v2": GROUPS_V2, "v3": GROUPS_V3, "v4": GROUPS_V4, "v5": GROUPS_V5, "v6": GROUPS_V6,
                "v7": GROUPS_V7}
SIZES = {"colour": 150, "residual": 9, "cooccurrence": 180, "spectrum": 200, "chroma": 51,
         "cooccurrence_rgb": 540, "multiscale": 180, "gradient": 20, "srm": 1250, "srm_rgb": 625, "srm_chroma": 500,
         "srm_ycc": 500, "lbp": 768, "lbp_pairs": 600, "colour_joint": 512, "hsv_joint": 192, "layout": 96,
         "wavelet": 81}
# groups whose mirror image's statistics forward_and_mirror computes again (cheap, and not a permutation of the
# image's: the gradient's percentiles; the layout's cells and the wavelet's last level on widths not divisible by 8)
RECOMPUTED_ON_MIRROR = ("gradient", "layout", "wavelet")


class StatFeatures(TextureGroups, nn.Module):
    """B x 3 x H x W model input -> B x ``dim`` statistics (float32). See the module's docstring."""

    def __init__(self, feature_set: str = "v2", input_norm: str = "imagenet"):
        super().__init__()
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set must be one of {sorted(FEATURE_SETS)}, got {feature_set!r}")
        if input_norm not in ("imagenet", "none"):
            raise ValueError(f"input_norm must be imagenet or none, got {input_norm!r}")
        self.groups = FEATURE_SETS[feature_set]
        self.dim = sum(SIZES[g] for g in self.groups)
        self.input_norm = input_norm
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._rings: dict[tuple, tuple[torch.Tensor, ...]] = {}  # per-size constants, made once

    def _ring_index(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Ring of each frequency of an fftshifted H x W spectrum (RINGS rings up to half the shorter side),
        and the number of frequencies in each ring. Made with numpy: constants, also under ONNX tracing."""
        h, w = int(h), int(w)  # plain ints, also when an exporter traces the shapes
        key = (h, w, device, "rings")
        if key not in self._rings:
            yy, xx = np.mgrid[-(h // 2):h - h // 2, -(w // 2):w - w // 2]
            idx = np.clip((np.sqrt(yy ** 2 + xx ** 2) * (RINGS / (min(h, w) // 2))).astype(np.int64), 0, RINGS - 1)
            counts = np.maximum(np.bincount(idx.ravel(), minlength=RINGS), 1).astype(np.float32)
            self._rings[key] = (torch.from_numpy(idx.ravel()).to(device), torch.from_numpy(counts).to(device))
        return self._rings[key]

    def _radial(self, power: torch.Tensor) -> torch.Tensor:
        b, h, w = power.shape
        idx, counts = self._ring_index(h, w, power.device)
        sums = torch.zeros(b, RINGS, device=power.device).scatter_add_(1, idx.expand(b, -1), power.reshape(b, -1))
        return (sums / counts + 1e-8).log()

    def _image(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        if self.input_norm == "imagenet":
            x = x * self.std + self.mean
        return (x * 255).round_().clamp_(0, 255) / 255  # the uint8 image, whatever happened on the way

    def _shared(self, kind: str, x: torch.Tensor, compute: Callable[[], tuple[torch.Tensor, ...]]
                ) -> tuple[torch.Tensor, ...]:
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return compute()
        return shared_or_computed((kind, self.input_norm), self.groups, self.dim, x, compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._shared("forward", x, lambda: (self._forward(x),))[0]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self._image(x)
            shared: dict[str, torch.Tensor] = {}  # what several groups use (the noise residual), made once
            # the reshape gives an exporter the width it cannot infer through the concatenation
            return torch.cat([getattr(self, "_" + g)(x, shared) for g in self.groups], 1).reshape(-1, self.dim)

    def forward_and_mirror(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics of ``x`` and of its mirror image ``x.flip(3)`` (what flip TTA asks for), the second
        mostly from the first: colour, residual and chroma statistics do not change when an image is mirrored,
        the co-occurrences only change places (a horizontal difference changes sign and a pair its order), the
        spectrum blocks come from the mirrored power spectrum; only the small groups of RECOMPUTED_ON_MIRROR are
        computed again. The same numbers as ``forward(x.flip(3))`` up to float rounding (tested); 1.6x (v3) to 2x
        (v2) faster than computing both on 2 CPU cores."""
        f, m = self._shared("mirror", x, lambda: self._forward_and_mirror(x))
        return f, m

    def _forward_and_mirror(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if int(x.shape[3]) % 2:  # odd widths: half-resolution blocks and spectra do not mirror onto themselves
                return self.forward(x), self.forward(x.flip(3))
            x = self._image(x)
            shared: dict[str, torch.Tensor] = {}
            parts = [getattr(self, "_" + g)(x, shared) for g in self.groups]
            perms = self._mirror_perms(x.device)
            mirrored = []
            for g, p in zip(self.groups, parts, strict=True):
                if g == "srm_chroma":  # the histogram along rows changes places, the one along columns does not
                    rows, cols = shared["chroma_rows"], shared["chroma_cols"]
                    mirrored.append((rows[:, perms[g]] + cols) / 2)
                elif g in perms:
                    mirrored.append(p[:, perms[g]])
                elif g == "spectrum":
                    h, w = int(x.shape[2]), int(x.shape[3])
                    power = shared["power"][:, :, (-torch.arange(w, device=x.device)) % w]  # frequency v -> -v
                    blocks = F.avg_pool2d((power + 1e-8).log().unsqueeze(1), (h // 10, w // 10)).reshape(x.shape[0], -1)
                    mirrored.append(torch.cat([p[:, :RINGS], blocks, p[:, RINGS + blocks.shape[1]:]], 1))
                elif g in RECOMPUTED_ON_MIRROR:
                    mirrored.append(getattr(self, "_" + g)(x.flip(3), {}))
                else:  # colour, residual, chroma, colour_joint, hsv_joint
                    mirrored.append(p)
            return torch.cat(parts, 1), torch.cat(mirrored, 1)

    def _mirror_perms(self, device: torch.device) -> dict[str, torch.Tensor]:
        """For each group whose statistics only change places when the image is mirrored: the index of each
        mirrored statistic among the image's (numpy: constants)."""
        key = (device, "mirror")
        if key not in self._rings:
            nine = np.arange(9)
            a, c = np.divmod(np.arange(81), 9)
            cooc = np.concatenate([8 - nine, 9 + (8 - c) * 9 + (8 - a), 90 + np.arange(90)])  # h9, h81, v9, v81
            perms = {"cooccurrence": cooc, "multiscale": cooc,
                     "cooccurrence_rgb": np.concatenate([cooc + 180 * i for i in range(3)])}
            n = 2 * SRM_T + 1
            t = np.arange(n ** 3)
            ta, tb, tc = t // (n * n), (t // n) % n, t % n
            reverse = (tc * n + tb) * n + ta  # a symmetric kernel's row triple (a, b, c) becomes (c, b, a)
            negate = ((n - 1 - tc) * n + (n - 1 - tb)) * n + (n - 1 - ta)  # an antisymmetric one's, negated
            srm, off = [], 0
            for _name, rows, _q in SRM_KERNELS:
                srm += [off + (negate if _is_antisymmetric(rows) else reverse), off + n ** 3 + t]  # columns unchanged
                off += 2 * n ** 3
            srm.append(off + np.arange(2 * n ** 3))  # R, G, B triples at one pixel: unchanged
            perms["srm"] = np.concatenate(srm)
            flip = n ** 3 - 1 - t  # each of the three residuals negated, not reordered (one pixel)

            def at_one_pixel(views: tuple) -> np.ndarray:  # antisymmetric along rows: negated; anything else: unchanged
                return np.concatenate([i * n ** 3 + (flip if _is_antisymmetric(kern) else t)
                                       for i, (kern, _q) in enumerate(views)])

            perms["srm_rgb"] = at_one_pixel(SRM_RGB_VIEWS)
            chroma, off = [], 0
            for rows, _q in SRM_CHROMA_KERNELS:
                for _channel in range(2):
                    chroma.append(off + (negate if _is_antisymmetric(rows) else reverse))
                    off += n ** 3
            perms["srm_chroma"] = np.concatenate(chroma)  # for the histograms along rows (forward_and_mirror)
            perms["srm_ycc"] = at_one_pixel(SRM_YCC_VIEWS)
            # lbp: a mirrored pattern is the pattern with its bits moved to the mirrored neighbours (an involution)
            to = [LBP_NEIGHBOURS.index((dy, 2 - dx)) for dy, dx in LBP_NEIGHBOURS]
            codes = np.arange(256)
            mirrored = sum(((codes >> b) & 1) << to[b] for b in range(8))
            perms["lbp"] = np.concatenate([mirrored + 256 * i for i in range(3)])
            # lbp_pairs: a mirrored pattern keeps its uniform code; a pair along rows changes its order, along
            # columns nothing changes
            a, c = np.divmod(np.arange(100), 10)
            perms["lbp_pairs"] = np.concatenate([np.concatenate([c * 10 + a, 100 + np.arange(100)]) + 200 * i
                                                 for i in range(3)])
            self._rings[key] = {g: torch.from_numpy(np.ascontiguousarray(v)).to(device) for g, v in perms.items()}
        return self._rings[key]

    @staticmethod
    def _levels_of(x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """The image's levels as exact integers 0-255 (float), made once per call."""
        if "levels" not in shared:
            shared["levels"] = (x * 255).round()
        return shared["levels"]

    def _residual_of(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        if "residual" not in shared:
            shared["residual"] = self._residual_map(x)
        return shared["residual"]

    # ----------------------------------------------------------------------------------------- groups (v1)
    def _colour(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean, std, PERCENTILES and a 16-bin histogram of R, G, B, saturation, max and grey: every channel takes
        few values (the 1/255 grid; the grey level k / 765; the saturation one value per pair of levels), so all
        four statistics come from each image's counts of those values, without a sort."""
        b = x.shape[0]
        k = self._levels_of(x, shared)
        kmax, kmin = k.amax(1), k.amin(1)
        n = int(k.shape[2]) * int(k.shape[3])
        # R, G, B and max counted together: level + 256 * channel
        offsets = torch.arange(0, 1024, 256, device=x.device, dtype=k.dtype).view(1, 4, 1, 1)
        idx = (torch.cat([k, kmax.unsqueeze(1)], 1) + offsets).reshape(b, -1).long()
        rgbm = self._level_stats(_scatter_counts(idx, 1024).reshape(b * 4, 256), 256, n).reshape(b, 4, -1)
        grey = self._level_stats(_scatter_counts(k.sum(1).reshape(b, -1).long(), 766), 766, n)
        values, rank = self._saturation_table(x.device)
        pair = rank[(kmax * 256 + kmin).reshape(b, -1).long()]
        sat = self._level_stats(_scatter_counts(pair, len(values)), "saturation", n)
        return torch.cat([rgbm[:, 0], rgbm[:, 1], rgbm[:, 2], sat, rgbm[:, 3], grey], 1)

    def _level_values(self, levels: int | str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The values of a channel's levels in ascending order (float32, as ``forward`` makes them: k / 255, the
        grey level k / 765, or the saturation table) and the 0/1 matrix that maps them to 16 histogram bins."""
        key = (device, "levels", levels)
        if key not in self._rings:  # numpy: constants, also under ONNX tracing
            values = (_saturation_values()[0] if levels == "saturation"
                      else np.arange(int(levels), dtype=np.float32) / np.float32(int(levels) - 1))
            bins = np.clip(np.floor(values * np.float32(16)), 0, 15).astype(np.int64)  # as ``_hist``
            onehot = np.zeros((len(values), 16), np.float32)
            onehot[np.arange(len(values)), bins] = 1.0
            self._rings[key] = (torch.from_numpy(values).to(device), torch.from_numpy(onehot).to(device))
        return self._rings[key]

    def _level_stats(self, counts: torch.Tensor, levels: int | str, n: int) -> torch.Tensor:
        """Rows of counts over a channel's levels -> mean, std, PERCENTILES, 16-bin histogram (25 numbers)."""
        values, onehot = self._level_values(levels, counts.device)
        mean = counts @ values / n
        # the variance about the mean (E[v^2] - mean^2 would cancel in float32)
        std = (counts * (values - mean.unsqueeze(1)) ** 2).sum(1).div(n).sqrt()
        pct = _percentiles_of_counts(counts, n, PERCENTILES, lambda i: values[i])
        hist = counts @ onehot / n
        return torch.cat([mean.unsqueeze(1), std.unsqueeze(1), pct, hist], 1)

    def _saturation_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, "saturation")
        if key not in self._rings:
            values, rank = _saturation_values()
            self._rings[key] = (torch.from_numpy(values).to(device), torch.from_numpy(rank).to(device))
        return self._rings[key]

    @staticmethod
    def _residual_map(x: torch.Tensor) -> torch.Tensor:
        """The image minus its 3 x 3 box mean (edges replicated): the nine shifted views summed in the order of
        ``avg_pool2d``'s window (the same float32 numbers), three times faster than it on the CPU."""
        h, w = int(x.shape[2]), int(x.shape[3])
        p = F.pad(x, (1, 1, 1, 1), mode="replicate")
        box = p[:, :, :h, :w].clone()
        for dy, dx in ((0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)):
            box = box.add_(p[:, :, dy:dy + h, dx:dx + w])
        return x - box / 9

    def _residual(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        r = self._residual_of(x, shared).reshape(b, 3, -1)
        c, sd = self._centred_of(x, shared)
        c2 = c * c
        var = c2.mean(2)
        kurt = (c2 * c2).mean(2) / (var ** 2 + 1e-12)
        # per channel: std, mean absolute value, log kurtosis
        return torch.stack([sd, r.abs().mean(2), (kurt + 1e-6).log()], 2).reshape(b, 9)

    def _centred_of(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise residual of each channel minus its mean (B x 3 x HW), and its standard deviation (B x 3)."""
        if "centred" not in shared:
            r = self._residual_of(x, shared).reshape(x.shape[0], 3, -1)
            c = r - r.mean(2, keepdim=True)
            shared["centred"], shared["sd"] = c, (c * c).mean(2).sqrt()
        return shared["centred"], shared["sd"]

    def _cooccurrence(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(_cooccurrence((x.sum(1) * 255).round(), 3), 1)

    def _dft(self, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Cosine and sine matrices of the fftshifted 1-D DFTs along H and along W, and a mask that is 0 at the
        zero frequency (float32, made in float64 with numpy: constants, also under ONNX tracing)."""
        h, w = int(h), int(w)
        key = (h, w, device, "dft")
        if key not in self._rings:
            mats = []
            for n in (h, w):
                k = ((np.arange(n) - n // 2) % n).reshape(-1, 1)  # row i holds frequency i - n//2 (fftshift)
                ang = 2 * np.pi * k * np.arange(n).reshape(1, -1) / n
                mats += [torch.from_numpy(np.cos(ang).astype(np.float32)).to(device),
                         torch.from_numpy(np.sin(ang).astype(np.float32)).to(device)]
            dc = np.ones((h, w), np.float32)
            dc[h // 2, w // 2] = 0.0
            self._rings[key] = (*mats, torch.from_numpy(dc).to(device))
        return self._rings[key]

    def _power(self, img: torch.Tensor) -> torch.Tensor:
        """|DFT|^2 of B x H x W images, fftshifted (the zero frequency at H//2, W//2): matrix products rather
        than ``torch.fft``, so that the module exports to ONNX."""
        ch, sh, cw, sw, _ = self._dft(img.shape[1], img.shape[2], img.device)
        a, b = img @ cw.T, img @ sw.T
        return (ch @ a - sh @ b) ** 2 + (ch @ b + sh @ a) ** 2

    def _spectrum(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        b, h, w = x.shape[0], int(x.shape[2]), int(x.shape[3])
        dc = self._dft(h, w, x.device)[4]  # the zero frequency is noise in both spectra: masked to exactly zero
        power = self._power(self._residual_of(x, shared).mean(1)) * dc
        shared["power"] = power
        blocks = F.avg_pool2d((power + 1e-8).log().unsqueeze(1), (h // 10, w // 10)).reshape(b, -1)
        grey = x.mean(1)
        power2 = self._power(grey - grey.mean((1, 2), keepdim=True)) * dc
        return torch.cat([self._radial(power), blocks, self._radial(power2)], 1)

    # ----------------------------------------------------------------------------------------- groups (v2)
    def _chroma(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        r, g, bl = x[:, 0], x[:, 1], x[:, 2]
        y = 0.299 * r + 0.587 * g + 0.114 * bl
        cb, cr = (bl - y) / 1.772 + 0.5, (r - y) / 1.402 + 0.5
        mx, mn = x.amax(1), x.amin(1)
        chroma = mx - mn
        is_r, is_g = mx == r, mx == g  # the hue's sector: one division for all three
        num = torch.where(is_r, g - bl, torch.where(is_g, bl - r, r - g))
        hue = num / (chroma + 1e-6) + torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
        hue = torch.remainder(hue / 6.0, 1.0)
        hue_w = _hist(hue.reshape(b, -1), 16, weights=chroma.reshape(b, -1))
        res, sd = self._centred_of(x, shared)
        sd = sd + 1e-8
        corr = [(res[:, i] * res[:, j]).mean(1) / (sd[:, i] * sd[:, j]) for i, j in ((0, 1), (1, 2), (0, 2))]
        return torch.cat([_hist(cb.clamp(0, 1).reshape(b, -1), 16), _hist(cr.clamp(0, 1).reshape(b, -1), 16),
                          hue_w / (hue_w.sum(1, keepdim=True) + 1e-6), torch.stack(corr, 1)], 1)

    def _cooccurrence_rgb(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self._levels_of(x, shared)
        b, h, w = k.shape[0], int(k.shape[2]), int(k.shape[3])
        parts = _cooccurrence(k.reshape(b * 3, h, w))  # the three channels as one batch: h9, h81, v9, v81 each
        return torch.cat([p.reshape(b, 3, -1) for p in parts], 2).reshape(b, -1)  # channel by channel

    def _multiscale(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat(_cooccurrence((F.avg_pool2d(x, 2).sum(1) * (4 * 255)).round(), 12), 1)

    def _gradient(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        grey = x.mean(1)
        gx, gy = grey[:, :, 1:] - grey[:, :, :-1], grey[:, 1:, :] - grey[:, :-1, :]
        mag = (gx[:, :-1, :] ** 2 + gy[:, :, :-1] ** 2).sqrt().reshape(b, -1)
        lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1] - grey[:, 1:-1, :-2]
               - grey[:, 1:-1, 2:]).reshape(b, -1)
        return torch.cat([_hist((mag * 4).clamp(0, 1 - 1e-6), 16), (_var(lap) + 1e-8).log()[:, None],
                          _top_percentiles(mag, (50, 90, 99))], 1)


