"""The numpy oracle of the hand-made statistics (tests/feature_oracle.py) measures what it says."""

from __future__ import annotations

import numpy as np

from feature_oracle import GROUPS, features


def test_constant_image_statistics():
    img = np.full((2, 100, 100, 3), 128, np.uint8)
    f = features(img)
    assert {g: f[g].shape for g in GROUPS} == {"colour": (2, 150), "residual": (2, 9),
                                               "cooccurrence": (2, 180), "spectrum": (2, 200)}
    # colour: six channels x (mean, std, 7 percentiles, 16-bin histogram); each histogram sums to 1
    colour = f["colour"][0].reshape(6, 25)
    np.testing.assert_allclose(colour[:3, 0], 128 / 255, rtol=1e-5)
    np.testing.assert_allclose(colour[:, 9:].sum(1), 1.0, rtol=1e-5)
    assert colour[0, 9 + int(128 / 255 * 16)] == 1.0
    # no noise residual at all
    np.testing.assert_allclose(f["residual"][0], 0.0, atol=1e-6)
    # every neighbouring difference is 0: all the mass in the middle bin (4 of 9) and pair (4, 4) of 81
    co = f["cooccurrence"][0]
    for start in (0, 90):
        assert co[start + 4] == 1.0 and co[start + 9 + 4 * 9 + 4] == 1.0
        assert co[start:start + 90].sum() == 2.0


def test_statistics_tell_images_apart():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 250, 100, dtype=np.float32)
    smooth = np.broadcast_to((ramp[:, None] + ramp[None, :])[None, :, :, None] / 2, (1, 100, 100, 3)).astype(np.uint8)
    noisy = rng.integers(0, 256, (1, 100, 100, 3), dtype=np.uint8)
    fs, fn = features(smooth), features(noisy)
    assert fn["residual"][0, 0] > 10 * fs["residual"][0, 0]  # residual std, red channel
    # high-frequency residual power (outer rings) is far higher for noise
    assert fn["spectrum"][0, 40:50].mean() > fs["spectrum"][0, 40:50].mean() + 3
