"""The statistics models: StatFeatures (torch) against the numpy probe, the hybrid's branch drop, the presets,
and rotation_prob."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import feature_oracle as feature_probe
from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import load_config
from fakeprint.features.augment import augment
from fakeprint.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, to_float
from fakeprint.features.statistics import GROUPS_V2, SIZES, StatFeatures
from fakeprint.models import count_parameters, create_model


def _images(n: int = 6, seed: int = 0) -> np.ndarray:
    """Blocky random images with fine noise: every statistic has something to measure."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 25, 25, 3)).repeat(4, 1).repeat(4, 2)
    return np.clip(base + rng.integers(-6, 7, base.shape), 0, 255).astype(np.uint8)


def _cooccurrence_exact(k: np.ndarray, n: int) -> np.ndarray:
    """feature_probe._cooccurrence of the image k / n, with the differences of the integers k divided exactly."""
    b, h, w = k.shape
    out = []
    for dy, dx in ((0, 1), (1, 0)):
        q = np.clip(np.round((k[:, dy:, dx:] - k[:, :h - dy, :w - dx]) / n), -4, 4).astype(np.int64) + 4
        out.append(feature_probe._hist(q.reshape(b, -1) / 9.0 + 1e-6, 9))
        a, c = (q[:, :, :-1], q[:, :, 1:]) if dx else (q[:, :-1, :], q[:, 1:, :])
        out.append(feature_probe._hist((a * 9 + c).reshape(b, -1) / 81.0 + 1e-6, 81))
    return np.concatenate(out, 1)


def test_statistics_match_the_numpy_probe():
    imgs = _images()
    ref = feature_probe.all_features(imgs, "v2")
    # half resolution: the module rounds differences of each 2 x 2 block's exact integer sum / 12, the same
    # everywhere, ties included; the probe rounded differences of float means
    k = imgs.astype(np.int64).reshape(6, 50, 2, 50, 2, 3).sum((2, 4, 5))
    ref["multiscale"] = _cooccurrence_exact(k, 12)
    got = StatFeatures("v2")(normalize(to_float(torch.from_numpy(imgs)))).numpy()
    assert got.shape == (6, 1330)
    off = 0
    for g in GROUPS_V2:
        r, o = ref[g].copy(), got[:, off:off + SIZES[g]]
        off += SIZES[g]
        if g == "residual":  # the module keeps the kurtosis in log scale
            r[:, 2::3] = np.log(r[:, 2::3] + 1e-6)
        if g == "spectrum":  # the zero-frequency rings (0 and 150) are rounding noise in both
            r, o = np.delete(r, [0, 150], 1), np.delete(o, [0, 150], 1)
            np.testing.assert_allclose(o, r, atol=0.05, err_msg=g)
        else:
            np.testing.assert_allclose(o, r, atol=1e-4, err_msg=g)


def test_statistics_are_those_of_the_uint8_image_whatever_the_normalisation():
    x = to_float(torch.from_numpy(_images(3, seed=1)))
    a = StatFeatures("v1", input_norm="imagenet")(normalize(x))
    b = StatFeatures("v1", input_norm="none")(x)
    assert a.shape == (3, 539)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # each image's numbers are its own: the batch around it changes nothing
    torch.testing.assert_close(StatFeatures("v1", "none")(x[1:2]), b[1:2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b[0], b[1])


def test_statistics_refuse_unknown_settings():
    with pytest.raises(ValueError, match="feature_set"):
        StatFeatures("v9")
    with pytest.raises(ValueError, match="input_norm"):
        StatFeatures("v1", input_norm="zscore")


def test_rich_model_residuals_count_triples_of_quantised_residuals():
    from fakeprint.features.stat_ops import SRM_KERNELS

    m = StatFeatures("v3", input_norm="none")
    assert m.dim == 2580 and len(SRM_KERNELS) == 4
    flat = torch.full((2, 3, 20, 20), 0.5)  # no residual anywhere: every triple is (0, 0, 0), bin 62
    srm = m(flat)[:, -SIZES["srm"]:].reshape(2, 10, 125)
    assert torch.equal(srm[:, :, 62], torch.ones(2, 10)) and float(srm.sum()) == 20.0
    # the 2nd-order residual along rows, written out with numpy, on an image with every kind of value
    imgs = _images(2, seed=4)
    grey = imgs.astype(np.int64).sum(-1)
    r = np.clip(np.round((grey[:, :, :-2] - 2 * grey[:, :, 1:-1] + grey[:, :, 2:]) / 6), -2, 2).astype(np.int64) + 2
    idx = (r[:, :, :-2] * 25 + r[:, :, 1:-1] * 5 + r[:, :, 2:]).reshape(2, -1)
    want = np.stack([np.bincount(i, minlength=125) / i.size for i in idx])
    got = m(to_float(torch.from_numpy(imgs)))[:, -SIZES["srm"]:-SIZES["srm"] + 125].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    # the colour triple: R, G, B 2nd-order residuals (steps of 2) at one pixel, along rows first
    k = imgs.astype(np.int64)
    rc = np.clip(np.round((k[:, :, :-2] - 2 * k[:, :, 1:-1] + k[:, :, 2:]) / 2), -2, 2).astype(np.int64) + 2
    idx = (rc[..., 0] * 25 + rc[..., 1] * 5 + rc[..., 2]).reshape(2, -1)
    want = np.stack([np.bincount(i, minlength=125) / i.size for i in idx])
    np.testing.assert_allclose(m(to_float(torch.from_numpy(imgs)))[:, -250:-125].numpy(), want, atol=1e-6)


def _triple_hist(r: np.ndarray) -> np.ndarray:
    """Histogram (fractions, 125 bins) of rows of residual indices 0..4 taken as base-5 triples: B x N x 3."""
    idx = (r[..., 0] * 25 + r[..., 1] * 5 + r[..., 2]).reshape(len(r), -1)
    return np.stack([np.bincount(i, minlength=125) / i.size for i in idx])


def test_colour_noise_statistics_of_feature_set_v4():
    """srm_rgb: the R, G, B residuals at one pixel; srm_chroma: triples of neighbouring residuals of R - G and
    B - G, along rows and along columns averaged; both written out with numpy here."""
    m = StatFeatures("v4", input_norm="none")
    assert m.dim == 2580 + 625 + 500 == 3705
    imgs = _images(3, seed=7)
    f = m(to_float(torch.from_numpy(imgs))).numpy()
    rgb, chroma = f[:, 2580:3205], f[:, 3205:]
    k = imgs.astype(np.int64)

    def q(r, step):
        return np.clip(np.round(r / step), -2, 2).astype(np.int64) + 2

    # srm_rgb, first block: the 1st-order residual along rows (step 1); fourth: the 3rd order along columns (step 3)
    np.testing.assert_allclose(rgb[:, :125], _triple_hist(q(k[:, :, 1:] - k[:, :, :-1], 1)), atol=1e-6)
    r3 = -k[:, :-3] + 3 * k[:, 1:-2] - 3 * k[:, 2:-1] + k[:, 3:]
    np.testing.assert_allclose(rgb[:, 375:500], _triple_hist(q(r3, 3)), atol=1e-6)
    # srm_chroma, first block: R - G, 1st order; last block: B - G, 2nd order (step 2)
    for block, d, order in ((0, k[..., 0] - k[..., 1], 1), (3, k[..., 2] - k[..., 1], 2)):
        if order == 1:
            rows, cols = q(d[:, :, 1:] - d[:, :, :-1], 1), q(d[:, 1:] - d[:, :-1], 1)
        else:
            rows = q(d[:, :, :-2] - 2 * d[:, :, 1:-1] + d[:, :, 2:], 2)
            cols = q(d[:, :-2] - 2 * d[:, 1:-1] + d[:, 2:], 2)
        along_rows = _triple_hist(np.stack([rows[:, :, :-2], rows[:, :, 1:-1], rows[:, :, 2:]], -1))
        along_cols = _triple_hist(np.stack([cols[:, :-2], cols[:, 1:-1], cols[:, 2:]], -1))
        np.testing.assert_allclose(chroma[:, 125 * block:125 * (block + 1)], (along_rows + along_cols) / 2, atol=1e-6)
    grey = np.repeat(imgs[..., :1], 3, -1)  # no colour: R - G = B - G = 0, every triple (0, 0, 0), bin 62
    c = m(to_float(torch.from_numpy(grey)))[:, 3205:].reshape(3, 4, 125)
    assert torch.equal(c[:, :, 62], torch.ones(3, 4))


def _ycc_np(imgs: np.ndarray) -> np.ndarray:
    """The grey level (0-765), R - G and B - G of N x H x W x 3 uint8 images, as N x H x W x 3 integers."""
    k = imgs.astype(np.int64)
    return np.stack([k.sum(-1), k[..., 0] - k[..., 1], k[..., 2] - k[..., 1]], -1)


def _lbp_np(plane: np.ndarray) -> np.ndarray:
    """8-neighbour local binary patterns of N x H x W levels: bit b set where neighbour b >= the centre."""
    centre = plane[:, 1:-1, 1:-1]
    h, w = centre.shape[1:]
    return sum((plane[:, dy:dy + h, dx:dx + w] >= centre).astype(np.int64) << b
               for b, (dy, dx) in enumerate(((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))))


def test_brightness_and_colour_noise_statistics_of_feature_set_v5():
    """srm_ycc: the residuals of the grey level (step 3 q), R - G and B - G (step q) at one pixel as one triple, for
    the 1st and 2nd order along rows and along columns; lbp: the local binary patterns of the grey level, R - G and
    B - G; both written out with numpy here."""
    m = StatFeatures("v5", input_norm="none")
    assert m.dim == 3705 + 500 + 768 == 4973
    imgs = _images(3, seed=11)
    x = to_float(torch.from_numpy(imgs))
    f = m(x).numpy()
    torch.testing.assert_close(torch.from_numpy(f[:, :3705]), StatFeatures("v4", input_norm="none")(x), rtol=0, atol=0)
    ycc = _ycc_np(imgs)

    def q(r, steps):
        return np.clip(np.round(r / np.array(steps)), -2, 2).astype(np.int64) + 2

    views = [ycc[:, :, 1:] - ycc[:, :, :-1], ycc[:, 1:] - ycc[:, :-1],  # 1st order: rows, columns
             ycc[:, :, :-2] - 2 * ycc[:, :, 1:-1] + ycc[:, :, 2:], ycc[:, :-2] - 2 * ycc[:, 1:-1] + ycc[:, 2:]]
    for i, (r, step) in enumerate(zip(views, (1, 1, 2, 2), strict=True)):
        np.testing.assert_allclose(f[:, 3705 + 125 * i:3705 + 125 * (i + 1)], _triple_hist(q(r, (3 * step, step, step))),
                                   atol=1e-6)
    for i, plane in enumerate(np.moveaxis(ycc, -1, 0)):
        want = np.stack([np.bincount(c.ravel(), minlength=256) / c.size for c in _lbp_np(plane)])
        np.testing.assert_allclose(f[:, 4205 + 256 * i:4205 + 256 * (i + 1)], want, atol=1e-6)
    grey = np.repeat(imgs[..., :1], 3, -1)  # no colour: the two colour residuals are 0 (index 2) in every triple
    g = m(to_float(torch.from_numpy(grey)))
    assert torch.allclose(g[:, 3705:4205].reshape(3, 4, 5, 5, 5)[:, :, :, 2, 2].sum(2), torch.ones(3, 4))
    assert torch.equal(g[:, 4205 + 256:], torch.zeros(3, 512).index_fill_(1, torch.tensor([255, 511]), 1.0))


def test_pairs_of_texture_patterns_of_feature_set_v6():
    """lbp_pairs: each lbp pattern as its rotation-invariant uniform code (the number of neighbours set where the ring
    of bits changes at most twice, else 9), and the co-occurrence of two neighbouring pixels' codes along rows and
    along columns, for the grey level, R - G and B - G; written out with numpy here."""
    from fakeprint.features.stat_ops import LBP_UNIFORM

    assert [LBP_UNIFORM[c] for c in (0b0, 0b1, 0b11, 0b101, 0b11110000, 0b01111000, 0b10101010, 0xFF)] == [
        0, 1, 2, 9, 4, 4, 9, 8]
    assert sum(v < 9 for v in LBP_UNIFORM) == 58  # the 58 uniform patterns of 8 bits
    m = StatFeatures("v6", input_norm="none")
    assert m.dim == 4973 + 600 == 5573
    imgs = _images(3, seed=12)
    x = to_float(torch.from_numpy(imgs))
    f = m(x).numpy()
    torch.testing.assert_close(torch.from_numpy(f[:, :4973]), StatFeatures("v5", input_norm="none")(x), rtol=0, atol=0)
    table = np.array(LBP_UNIFORM)
    for im in (imgs, np.ascontiguousarray(imgs[:, :90])):  # and a non-square image: fewer column pairs than row pairs
        f = m(to_float(torch.from_numpy(im))).numpy()
        for i, plane in enumerate(np.moveaxis(_ycc_np(im), -1, 0)):
            u = table[_lbp_np(plane)]
            for j, pair in enumerate((u[:, :, :-1] * 10 + u[:, :, 1:], u[:, :-1] * 10 + u[:, 1:])):  # rows, columns
                want = np.stack([np.bincount(p.ravel(), minlength=100) / p.size for p in pair])
                np.testing.assert_allclose(f[:, 4973 + 200 * i + 100 * j:4973 + 200 * i + 100 * (j + 1)], want,
                                           atol=1e-6)
    flat = np.full((1, 100, 100, 3), 77, np.uint8)  # every neighbour equals the centre: every pattern 255, code 8
    g = m(to_float(torch.from_numpy(flat)))[0, 4973:].reshape(3, 2, 100)
    assert torch.equal(g[:, :, 88], torch.ones(3, 2)) and g.sum() == 6



def _haar_np(plane: np.ndarray) -> list[np.ndarray]:
    """Three levels of a Haar decomposition of N x H x W values: the detail bands (rows, columns, both) of each."""
    bands, a = [], plane
    for _ in range(3):
        a = a[:, :a.shape[1] // 2 * 2, :a.shape[2] // 2 * 2]
        p, q, r, s = a[:, 0::2, 0::2], a[:, 0::2, 1::2], a[:, 1::2, 0::2], a[:, 1::2, 1::2]
        bands += [(p - q + r - s) / 2, (p + q - r - s) / 2, (p - q - r + s) / 2]
        a = (p + q + r + s) / 2
    return bands


def test_palette_layout_and_wavelet_statistics_of_feature_set_v7():
    """colour_joint: the joint 8 x 8 x 8 histogram of R, G, B; hsv_joint: hue (12) x saturation (4) x value (4);
    layout: mean and std of R, G, B in a 4 x 4 grid; wavelet: log mean |d|, log mean d^2 and log kurtosis of the
    Haar detail bands of grey, R - G, B - G at three levels; histograms as square roots of fractions. Written out with
    numpy in exact integers here (the hue's sectors checked against the standard library's colorsys)."""
    import colorsys

    m = StatFeatures("v7", input_norm="none")
    assert m.dim == 5573 + 512 + 192 + 96 + 81 == 6454
    for imgs in (_images(3, seed=13), _images(2, seed=14)[:, :, :90]):  # and a width that the levels do not halve
        x = to_float(torch.from_numpy(np.ascontiguousarray(imgs)))
        f = m(x).numpy().astype(np.float64)
        torch.testing.assert_close(torch.from_numpy(f[:, :5573]).float(), StatFeatures("v6", input_norm="none")(x),
                                   rtol=0, atol=0)
        k = imgs.astype(np.int64)
        n = k.shape[1] * k.shape[2]
        q = k // 32
        joint = np.stack([np.bincount((q[i, ..., 0] * 64 + q[i, ..., 1] * 8 + q[i, ..., 2]).ravel(), minlength=512)
                          for i in range(len(k))]) / n
        np.testing.assert_allclose(f[:, 5573:6085], np.sqrt(joint), atol=1e-6)
        r, g, b = k[..., 0], k[..., 1], k[..., 2]
        mx, mn = k.max(-1), k.min(-1)
        d = np.maximum(mx - mn, 1)  # twice the hue in sixths of the circle, floored, in exact integers
        h2 = np.where(mx == r, (2 * (g - b) + 12 * d) // d % 12,
                      np.where(mx == g, (2 * (b - r) + 4 * d) // d, (2 * (r - g) + 8 * d) // d))
        h2 = np.where(mx > mn, h2, 0)
        code = h2 * 16 + np.minimum(4 * (mx - mn) // np.maximum(mx, 1), 3) * 4 + mx // 64
        hsv = np.stack([np.bincount(c.ravel(), minlength=192) for c in code]) / n
        for i, j in ((0, 0), (1, 7), (len(k) - 1, 5000)):  # three pixels against the standard library's HSV
            px = k[i].reshape(-1, 3)[j]
            hh, ss, vv = colorsys.rgb_to_hsv(*(px / 255))
            assert abs(code[i].ravel()[j] - (int(hh * 12 + 1e-9) % 12 * 16 + min(int(ss * 4 + 1e-9), 3) * 4
                                             + min(int(vv * 4), 3))) == 0
        np.testing.assert_allclose(f[:, 6085:6277], np.sqrt(hsv), atol=1e-6)
        h, w = k.shape[1:3]
        cells = [[imgs[:, (h * i) // 4:-(-h * (i + 1) // 4), (w * j) // 4:-(-w * (j + 1) // 4)] / 255
                  for j in range(4)] for i in range(4)]
        mean = np.stack([np.stack([c.mean((1, 2)) for c in row], -1) for row in cells], -2)  # N x 3 x 4 x 4
        std = np.stack([np.stack([c.std((1, 2)) for c in row], -1) for row in cells], -2)
        np.testing.assert_allclose(f[:, 6277:6373], np.concatenate([mean.reshape(len(k), -1),
                                                                     std.reshape(len(k), -1)], 1), atol=1e-5)
        planes = (k.mean(-1), k[..., 0] - k[..., 1], k[..., 2] - k[..., 1])
        want = []
        for plane in planes:
            for d in _haar_np(plane.astype(np.float64)):
                d = d.reshape(len(k), -1)
                m2, m4 = (d ** 2).mean(1), (d ** 4).mean(1)
                want += [np.log(np.abs(d).mean(1) + 1e-3), np.log(m2 + 1e-3), np.log(m4 / (m2 ** 2 + 1e-6) + 1e-3)]
        np.testing.assert_allclose(f[:, 6373:], np.stack(want, 1), atol=2e-4)
    grey = np.repeat(_images(2, seed=15)[..., :1], 3, -1)  # no colour: hue and saturation 0, R - G's bands all 0
    g = m(to_float(torch.from_numpy(grey)))
    assert torch.equal(g[:, 6085:6277].reshape(2, 12, 4, 4)[:, 1:].sum((1, 2, 3)), torch.zeros(2))
    assert torch.allclose(g[:, 6373 + 27:6373 + 54:3], torch.full((2, 9), float(np.log(1e-3))))

def test_residual_kernels_as_shifted_sums_are_the_convolutions():
    from fakeprint.features.stat_ops import SRM_KERNELS, _correlate

    img = torch.randint(0, 766, (2, 1, 13, 17), generator=torch.Generator().manual_seed(0)).float()
    for _name, rows, _q in SRM_KERNELS:
        for kern in (rows, tuple(zip(*rows, strict=True))):  # and transposed
            want = torch.nn.functional.conv2d(img, torch.tensor(kern, dtype=torch.float32)[None, None])
            assert torch.equal(_correlate(img, kern), want)


def test_the_fast_paths_give_the_numbers_of_the_plain_definitions():
    """Percentiles from counts and from topk equal those of a full sort (ties included), the box residual
    avg_pool2d's, and the saturation table every pixel's own value, bit for bit."""
    from fakeprint.features import stat_ops as stats


    g = torch.Generator().manual_seed(0)
    v = torch.randint(0, 40, (5, 999), generator=g).float() / 39  # many ties
    want = stats._percentiles(v, (50, 90, 99))
    torch.testing.assert_close(stats._top_percentiles(v, (50, 90, 99)), want, rtol=0, atol=0)
    counts = stats._scatter_counts((v * 39).round().long(), 40)
    got = stats._percentiles_of_counts(counts, 999, stats.PERCENTILES, lambda i: i.float() / 39)
    torch.testing.assert_close(got, stats._percentiles(v, stats.PERCENTILES), rtol=0, atol=0)
    with pytest.raises(ValueError, match="50 and above"):
        stats._top_percentiles(v, (25,))

    x = torch.rand(2, 3, 17, 23, generator=g)
    plain = x - torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    assert torch.equal(StatFeatures._residual_map(x), plain)

    values, rank = (torch.from_numpy(a) for a in stats._saturation_values())
    lv = torch.arange(256).float() / 255
    mx, mn = lv.view(-1, 1).expand(256, 256), lv.view(1, -1).expand(256, 256)
    ok = mx >= mn
    assert torch.equal(values[rank].view(256, 256)[ok], ((mx - mn) / (mx + 1e-6))[ok])
    assert bool((values[1:] > values[:-1]).all())


def test_hybrid_slices_itself_on_the_cpu_without_changing_its_outputs(monkeypatch):
    from fakeprint.engine.runtime import predict_logits
    from fakeprint.models import hybrid
    from fakeprint.models.memory import cpu_micro_batch

    torch.manual_seed(0)
    m = create_model("hybrid").eval()
    assert cpu_micro_batch(m) == 0  # predict_logits leaves the slicing to the model
    imgs = _images(10, seed=3)
    whole = predict_logits(m, imgs, torch.device("cpu"), batch_size=10, micro_batch=0)
    monkeypatch.setattr(hybrid, "STATS_CPU_SLICE", 3)
    m.cnn.__dict__["_fakeprint_micro_batch"] = {(3, 100, 100): 4}
    calls = []
    m.head.register_forward_hook(lambda _m, i, _o: calls.append(len(i[0])))
    sliced = predict_logits(m, imgs, torch.device("cpu"), batch_size=10)
    assert calls == [3, 3, 3, 1]
    torch.testing.assert_close(sliced, whole, atol=1e-5, rtol=1e-5)
    one_by_one = torch.cat([predict_logits(m, imgs[i:i + 1], torch.device("cpu")) for i in range(10)])
    torch.testing.assert_close(sliced, one_by_one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_set", ["v3", "v4", "v5", "v6", "v7"])
@pytest.mark.parametrize("width", [100, 95])  # 95: odd, computed twice
def test_the_mirror_images_statistics_are_made_from_the_images(width, feature_set):
    """forward_and_mirror (flip TTA) gives forward(x) and, from it, forward(x.flip(3)): every group, every place."""
    m = StatFeatures(feature_set, input_norm="none")
    x = to_float(torch.from_numpy(np.ascontiguousarray(_images(4, seed=5)[:, :, :width])))
    f, f_m = m.forward_and_mirror(x)
    assert torch.equal(f, m(x))
    want = m(x.flip(3))
    assert not torch.allclose(want, f, atol=1e-3)  # mirroring changes some statistics: the test can fail
    torch.testing.assert_close(f_m, want, atol=1e-4, rtol=1e-4)


def test_flip_tta_of_the_hybrid_is_the_mean_of_the_two_views():
    from fakeprint.engine.runtime import predict_logits

    torch.manual_seed(0)
    m = create_model("hybrid", feature_set="v3").eval()
    with torch.no_grad():  # nonzero running statistics, so that both heads matter
        m.head.mlp[0].running_mean.uniform_(0.0, 0.1)
    imgs = _images(5, seed=6)
    x = normalize(to_float(torch.from_numpy(imgs)))
    with torch.no_grad():
        want = (m(x) + m(x.flip(3))) / 2
    got = predict_logits(m, imgs, torch.device("cpu"), tta="flip")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, predict_logits(m, imgs, torch.device("cpu")), atol=1e-4)


def test_hybrid_sums_the_two_heads_and_drops_one_branch_per_sample_in_training():
    torch.manual_seed(0)
    m = create_model("hybrid", dropout=0.0, dropout2d=0.0, stat_dropout=0.0, branch_drop=0.6)
    x = torch.randn(64, 3, 100, 100)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.cnn(x) + m.head(x))
        m.train()  # BatchNorm on batch statistics: the same for the branches and the whole
        torch.manual_seed(1)
        out = m(x)
        a, b = m.cnn(x), m.head(x)
    only_a = torch.isclose(out, a, atol=1e-5).all(1)
    only_b = torch.isclose(out, b, atol=1e-5).all(1)
    both = torch.isclose(out, a + b, atol=1e-5).all(1)
    assert bool((only_a | only_b | both).all())
    assert only_a.any() and only_b.any() and both.any()
    with pytest.raises(FakeprintError, match="branch_drop"):
        create_model("hybrid", branch_drop=1.0)


def test_presets_build_the_statistics_models():
    cfg = load_config("hybrid_w32")
    m = create_model(cfg["model"], **cfg["model_args"])
    assert count_parameters(m) == count_parameters(create_model("threecnn_dilated", width=32, c3=128)) \
        + 1330 * 256 + 256 + 256 * 5 + 5
    assert cfg["rotation_prob"] == 0.5 and cfg["tta"] == "flip"
    v3 = load_config("hybrid_v3_w32")
    assert v3["model_args"]["feature_set"] == "v3"
    assert {k: v for k, v in v3.items() if k != "model_args"} == {k: v for k, v in cfg.items() if k != "model_args"}
    assert count_parameters(create_model(v3["model"], **v3["model_args"])) == count_parameters(m) + 1250 * 256
    v4 = load_config("hybrid_v4_w32")
    assert v4["model_args"] == {**v3["model_args"], "feature_set": "v4"}
    assert {k: v for k, v in v4.items() if k != "model_args"} == {k: v for k, v in cfg.items() if k != "model_args"}
    assert count_parameters(create_model(v4["model"], **v4["model_args"])) == count_parameters(m) + 2375 * 256
    h2 = load_config("hybrid_v4_h2_w32")  # v4 with two hidden layers of 512 in the statistics head
    assert h2["model_args"] == {**v4["model_args"], "hidden": 512, "stat_layers": 2, "stat_dropout": 0.3}
    assert {k: v for k, v in h2.items() if k != "model_args"} == {k: v for k, v in v4.items() if k != "model_args"}
    assert count_parameters(create_model(h2["model"], **h2["model_args"])) == count_parameters(
        create_model("threecnn_dilated", width=32, c3=128)) + 3705 * 512 + 512 + 512 * 512 + 512 + 512 * 5 + 5
    v5 = load_config("hybrid_v5_h2_w32")  # h2 with feature set v5 (srm_ycc, lbp), nothing else changed
    assert v5 == {**h2, "model_args": {**h2["model_args"], "feature_set": "v5"}}
    assert count_parameters(create_model(v5["model"], **v5["model_args"])) == 3_168_522  # h2 + 1,268 x 512 weights
    v6 = load_config("hybrid_v6_h2_w32")  # v5 with feature set v6 (lbp_pairs), nothing else changed
    assert v6 == {**v5, "model_args": {**v5["model_args"], "feature_set": "v6"}}
    assert count_parameters(create_model(v6["model"], **v6["model_args"])) == 3_168_522 + 600 * 512
    cw = load_config("hybrid_v4_cw_w32")  # v4 with class 4's loss counted twice, nothing else changed
    assert {k: v for k, v in cw.items() if k not in ("loss", "class_weights")} == {
        k: v for k, v in v4.items() if k not in ("loss", "class_weights")}
    assert cw["loss"] == "weighted_ce" and cw["class_weights"] == [1, 1, 1, 1, 2] and v4["loss"] == "ce"
    cfg = load_config("statmlp")
    assert cfg["rotation"] == 0 and count_parameters(create_model(cfg["model"], **cfg["model_args"])) == 342_021


def test_rotation_prob_leaves_the_other_images_untouched():
    x = torch.rand(32, 3, 20, 20)
    g = torch.Generator().manual_seed(0)
    out = augment(x, {"hflip": True, "rotation": 15.0, "rotation_prob": 0.0}, g)
    for i in range(32):  # each is the image or its horizontal flip, pixel for pixel
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(2))
    out = augment(x, {"hflip": False, "rotation": 15.0, "rotation_prob": 0.5}, torch.Generator().manual_seed(0))
    same = [torch.equal(out[i], x[i]) for i in range(32)]
    assert 4 < sum(same) < 28
    with pytest.raises(FakeprintError, match="rotation_prob"):
        load_config("threecnn", {"rotation_prob": 1.5})


def test_training_refuses_statistics_that_would_read_the_wrong_normalisation(tiny_data, tmp_path):
    from fakeprint.engine.training.train import train

    cfg = load_config("statmlp", {"normalize": "none", "epochs": 1, "progress": False})
    with pytest.raises(FakeprintError, match="input_norm"):
        train(tiny_data, cfg, tmp_path / "run")
    cfg = load_config("statmlp", {"normalize": "none", "epochs": 1, "progress": False,
                                  "model_args": {"feature_set": "v1", "input_norm": "none"}})
    train(tiny_data, cfg, tmp_path / "run2")
    assert (tmp_path / "run2" / "last.safetensors").is_file()


def test_the_statistics_head_takes_any_number_of_hidden_layers():
    from fakeprint.models.hybrid import StatHead

    x = torch.rand(4, 3, 32, 32)
    for layers in (1, 2, 3):
        head = StatHead(5, "v1", hidden=16, dropout=0.0, layers=layers).eval()
        linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
        assert len(linears) == layers + 1 and linears[-1].in_features == 16
        assert head(x).shape == (4, 5)
    with pytest.raises(ValueError, match="layers"):
        StatHead(5, "v1", layers=0)


def test_the_statistics_of_fixed_images_are_the_reference_numbers():
    """The statistics were made faster (issue 40) without changing them: fixed images (tests/stat_reference.py) give
    the numbers the statistics gave before (tests/data/stat_reference_v7.npz), for the image and its mirror."""
    from stat_reference import reference_images

    ref = np.load(Path(__file__).parent / "data" / "stat_reference_v7.npz")
    x = torch.from_numpy(reference_images()).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    m = StatFeatures("v7")
    with torch.no_grad():
        f = m(x)
        image, mirror = m.forward_and_mirror(x)
        sliced = torch.cat([m(part) for part in x.split(1)])
    for got, want in ((f, ref["forward"]), (image, ref["forward"]), (mirror, ref["mirror"]), (sliced, ref["forward"])):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
