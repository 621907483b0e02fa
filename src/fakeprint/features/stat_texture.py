"""The groups of feature sets v3-v7, as methods ``StatFeatures`` inherits: steganalysis-style rich-model residuals
of the grey level and the colours (v3-v5), local binary patterns and their pairs (v5, v6), the palette, HSV,
layout and wavelet statistics (v7). Each takes the model input and the intermediate results the groups share
(``shared``), and returns B x its size numbers (``statistics.SIZES``); the module docstring of
``features.statistics`` says what each measures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fakeprint.features.stat_ops import (
    LBP_NEIGHBOURS,
    LBP_UNIFORM,
    SRM_CHROMA_KERNELS,
    SRM_KERNELS,
    SRM_RGB_VIEWS,
    SRM_YCC_VIEWS,
    _column,
    _correlate,
    _quantise,
    _rgb_triples,
    _scatter_counts,
    _triples,
)


class TextureGroups:
    """Mixed into ``StatFeatures``: the v3-v7 groups (see the module's docstring)."""

    # ----------------------------------------------------------------------------------------- groups (v3)
    def _srm(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self._levels_of(x, shared)
        grey = k.sum(1, keepdim=True)  # 0-765, exact: residuals of grey * 3, so the steps are 3 q
        cols = []
        for _name, rows, q in SRM_KERNELS:
            # triples along rows of the residual along rows; along columns of a 1-D kernel's transpose (a 2-D: itself)
            for kern, axis in ((rows, 2), (_column(rows) if len(rows) == 1 else rows, 1)):
                r = _quantise(_correlate(grey, kern), 3 * q)[:, 0]
                cols.append(_triples(r, axis))
        for kern in (((1, -2, 1),), _column(((1, -2, 1),))):  # the R, G, B 2nd-order residuals at one pixel
            cols.append(_rgb_triples(k, kern, 2))
        return torch.cat(cols, 1)

    # ----------------------------------------------------------------------------------------- groups (v4)
    def _srm_rgb(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self._levels_of(x, shared)
        return torch.cat([_rgb_triples(k, kern, q) for kern, q in SRM_RGB_VIEWS], 1)

    def _srm_chroma(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self._levels_of(x, shared)
        d = torch.cat([k[:, :1] - k[:, 1:2], k[:, 2:] - k[:, 1:2]], 1)  # R - G, B - G: exact integers
        rows, cols = [], []
        for kern, q in SRM_CHROMA_KERNELS:
            rh = _quantise(_correlate(d, kern), q)
            rv = _quantise(_correlate(d, _column(kern)), q)
            for c in range(2):
                rows.append(_triples(rh[:, c], 2))
                cols.append(_triples(rv[:, c], 1))
        shared["chroma_rows"], shared["chroma_cols"] = torch.cat(rows, 1), torch.cat(cols, 1)
        return (shared["chroma_rows"] + shared["chroma_cols"]) / 2

    # ----------------------------------------------------------------------------------------- groups (v5)
    def _ycc_of(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """The grey level (0-765) and R - G, B - G as three planes of exact integers, made once per call."""
        if "ycc" not in shared:
            k = self._levels_of(x, shared)
            shared["ycc"] = torch.cat([k.sum(1, keepdim=True), k[:, :1] - k[:, 1:2], k[:, 2:] - k[:, 1:2]], 1)
        return shared["ycc"]

    def _srm_ycc(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        ycc = self._ycc_of(x, shared)
        return torch.cat([_rgb_triples(ycc, kern, (3 * q, q, q)) for kern, q in SRM_YCC_VIEWS], 1)

    def _lbp_codes_of(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        """The 8-bit patterns (float 0-255) of the grey level, R - G and B - G: B x 3 x (H - 2) x (W - 2), made once."""
        if "lbp" not in shared:
            img = self._ycc_of(x, shared)
            h, w = int(img.shape[2]) - 2, int(img.shape[3]) - 2
            centre = img[:, :, 1:-1, 1:-1]
            code = torch.zeros_like(centre)
            for bit, (dy, dx) in enumerate(LBP_NEIGHBOURS):
                code += (img[:, :, dy:dy + h, dx:dx + w] >= centre).to(code.dtype) * float(1 << bit)
            shared["lbp"] = code
        return shared["lbp"]

    def _lbp(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        code = self._lbp_codes_of(x, shared)
        b, h, w = code.shape[0], int(code.shape[2]), int(code.shape[3])
        offsets = torch.arange(0, 768, 256, device=x.device, dtype=code.dtype).view(1, 3, 1, 1)
        return _scatter_counts((code + offsets).reshape(b, -1).long(), 768) / (h * w)

    # ----------------------------------------------------------------------------------------- groups (v6)
    def _lbp_pairs(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        table = torch.tensor(LBP_UNIFORM, device=x.device)
        u = table[self._lbp_codes_of(x, shared).long()]  # B x 3 x h x w, codes 0-9
        b = u.shape[0]
        offsets = torch.arange(0, 600, 200, device=x.device).view(1, 3, 1, 1)
        rows = (u[:, :, :, :-1] * 10 + u[:, :, :, 1:] + offsets).reshape(b, -1)
        cols = (u[:, :, :-1] * 10 + u[:, :, 1:] + offsets + 100).reshape(b, -1)
        # each histogram a fraction of its own pairs (on a non-square image rows and columns have different counts)
        return _scatter_counts(rows, 600) / (rows.shape[1] // 3) + _scatter_counts(cols, 600) / (cols.shape[1] // 3)

    # ----------------------------------------------------------------------------------------- groups (v7)
    def _colour_joint(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        q = torch.div(self._levels_of(x, shared), 32, rounding_mode="floor")  # 8 levels a channel
        idx = (q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]).reshape(x.shape[0], -1).long()
        return (_scatter_counts(idx, 512) / idx.shape[1]).sqrt()

    def _hsv_joint(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        k = self._levels_of(x, shared)
        r, g, b = k[:, 0], k[:, 1], k[:, 2]
        mx, mn = k.amax(1), k.amin(1)
        d = mx - mn
        dd = d.clamp_min(1)
        # hue in sixths of the circle, 0 <= h < 6: the max channel decides the sector (R first, then G), grey pixels 0
        h = torch.where(mx == r, (g - b) / dd, torch.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4))
        h = torch.where(h < 0, h + 6, h)
        h = torch.where(d > 0, h, torch.zeros_like(h))
        hq = (h * 2).floor().clamp(0, 11)
        sq = (d * 4 / mx.clamp_min(1)).floor().clamp(0, 3)  # saturation (max - min) / max, 0 for black
        vq = torch.div(mx, 64, rounding_mode="floor")  # value: 4 bins of 64 levels
        idx = (hq * 16 + sq * 4 + vq).reshape(x.shape[0], -1).long()
        return (_scatter_counts(idx, 192) / idx.shape[1]).sqrt()

    def _layout(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        m = F.adaptive_avg_pool2d(x, 4)
        sd = (F.adaptive_avg_pool2d(x * x, 4) - m * m).clamp_min(0).sqrt()
        return torch.cat([m.reshape(x.shape[0], -1), sd.reshape(x.shape[0], -1)], 1)

    def _wavelet(self, x: torch.Tensor, shared: dict[str, torch.Tensor]) -> torch.Tensor:
        scale = torch.tensor([1 / 3, 1.0, 1.0], device=x.device).view(1, 3, 1, 1)
        a = self._ycc_of(x, shared) * scale  # the mean of R, G, B (0-255), R - G and B - G (-255..255)
        b, out = x.shape[0], []
        for _level in range(3):
            a = a[:, :, :int(a.shape[2]) // 2 * 2, :int(a.shape[3]) // 2 * 2]  # an odd row or column is left out
            p, q, r, s = a[:, :, 0::2, 0::2], a[:, :, 0::2, 1::2], a[:, :, 1::2, 0::2], a[:, :, 1::2, 1::2]
            for band in ((p - q + r - s) / 2, (p + q - r - s) / 2, (p - q - r + s) / 2):  # along rows, columns, both
                v = band.reshape(b, 3, -1)
                m2 = (v * v).mean(2)
                out += [(v.abs().mean(2) + 1e-3).log(), (m2 + 1e-3).log(), ((v ** 4).mean(2) / (m2 * m2 + 1e-6)
                                                                            + 1e-3).log()]
            a = (p + q + r + s) / 2
        return torch.stack(out, 2).reshape(b, -1)  # channel-major: grey's 27, then R - G's, then B - G's
