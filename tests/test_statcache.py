"""Training statmlp on its statistics computed once (statcache): the same training as on the images, refused
where the augmentation would change the statistics, and the same evaluation figures."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import load_config
from fakeprint.engine.runtime import predict_logits
from fakeprint.engine.training import statcache
from fakeprint.engine.training.train import train
from fakeprint.features.augment import augment
from fakeprint.features.preprocess import normalize, to_float
from fakeprint.models import count_parameters, create_model
from fakeprint.models.checkpoint import load_checkpoint

# small and quick: the v2 statistics, a two-layer head
SMALL = {"model": "statmlp", "model_args": {"feature_set": "v2", "hidden": 32, "layers": 2, "dropout": 0.3},
         "epochs": 2, "batch_size": 16, "progress": False, "tta": "flip", "ema": 0.9, "amp": "off",
         "rotation": 0}


def test_the_preset_is_the_cross_validated_head_on_feature_set_v6():
    cfg = load_config("statmlp_v6_h2")
    assert cfg["model_args"] == {"feature_set": "v6", "hidden": 512, "layers": 2, "dropout": 0.3}
    assert count_parameters(create_model(cfg["model"], **cfg["model_args"])) == \
        5573 * 512 + 512 + 512 * 512 + 512 + 512 * 5 + 5
    assert cfg["rotation"] == 0 and cfg["hflip"] and cfg["tta"] == "flip" and cfg["stat_cache"] == "auto"
    assert statcache.enabled(cfg, create_model(cfg["model"], **cfg["model_args"]))


def test_the_v7_preset_is_the_v6_preset_with_feature_set_v7():
    v6, v7 = load_config("statmlp_v6_h2"), load_config("statmlp_v7_h2")
    assert v7 == {**v6, "model_args": {**v6["model_args"], "feature_set": "v7"}}
    assert count_parameters(create_model(v7["model"], **v7["model_args"])) == \
        count_parameters(create_model(v6["model"], **v6["model_args"])) + (6454 - 5573) * 512


@pytest.mark.parametrize("change, named", [({"rotation": 15}, "rotation"), ({"color_jitter": 0.1}, "color_jitter"),
                                           ({"mixup": 0.2}, "mixup"), ({"translate": 4}, "translate"),
                                           ({"cutmix": 1.0}, "cutmix")])
def test_an_augmentation_beyond_flips_and_turns_turns_it_off_or_is_refused_with_the_reason(change, named):
    cfg = load_config(None, SMALL | change)
    model = create_model(cfg["model"], **cfg["model_args"])
    assert named in statcache.unusable_reason(cfg, model)
    assert not statcache.enabled(cfg, model)  # auto: trains on the images instead
    with pytest.raises(FakeprintError, match=named):
        statcache.enabled(cfg | {"stat_cache": "on"}, model)
    assert statcache.unusable_reason(load_config(None, SMALL), model) is None
    assert statcache.unusable_reason(load_config(None, SMALL | {"rotation": 15, "rotation_prob": 0.0}), model) is None


@pytest.mark.parametrize("change, views", [({}, "flip"), ({"vflip": True}, "dihedral"), ({"rot90": True}, "dihedral"),
                                          ({"tta": "dihedral"}, "dihedral"), ({"tta": "none"}, "flip")])
def test_flips_and_quarter_turns_are_lossless_and_ask_for_the_views_they_need(change, views):
    cfg = load_config(None, SMALL | change)
    model = create_model(cfg["model"], **cfg["model_args"])
    assert statcache.unusable_reason(cfg, model) is None and statcache.enabled(cfg | {"stat_cache": "on"}, model)
    assert statcache.views(cfg) == views


def test_only_a_statistics_only_model_qualifies():
    cfg = load_config("hybrid_v6_h2_w32")
    assert "not a statistics-only model" in statcache.unusable_reason(
        cfg | {"rotation": 0}, create_model("hybrid", feature_set="v2"))


def test_logits_from_the_statistics_are_those_of_the_images():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 100, 100, 3), dtype=np.uint8)
    head = create_model("statmlp", feature_set="v2", hidden=16).eval()
    with torch.no_grad():
        head.mlp[0].running_var.fill_(4.0)  # not the identity: the standardisation must be applied the same way
    rows = statcache.statistics(head, torch.from_numpy(images), "imagenet", batch_size=4)
    rows8 = statcache.statistics(head, torch.from_numpy(images), "imagenet", batch_size=4, views="dihedral")
    assert rows.shape == (10, 2, head.stats.dim) and rows8.shape == (10, 8, head.stats.dim)
    torch.testing.assert_close(rows8[:, :2], rows)  # the flip pair comes first in both layouts
    for tta in ("none", "flip", "dihedral"):
        want = predict_logits(head, images, torch.device("cpu"), tta=tta)
        torch.testing.assert_close(statcache.logits(head, rows8, tta), want, rtol=1e-4, atol=1e-4)
        if tta != "dihedral":
            torch.testing.assert_close(statcache.logits(head, rows, tta), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(FakeprintError, match="dihedral"):
        statcache.logits(head, rows, "dihedral")


def test_a_flip_picks_the_mirror_row_with_the_draw_augment_makes():
    rows = torch.stack([torch.zeros(64, 3), torch.ones(64, 3)], 1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    picked = statcache.training_views(rows, {"hflip": True}, g1)
    flips = torch.rand(64, generator=g2) < 0.5  # augment.augment's first draw
    assert torch.equal(picked[:, 0] == 1, flips) and 0 < int(flips.sum()) < 64
    assert torch.equal(statcache.training_views(rows, {"hflip": False}, g1), rows[:, 0])
    with pytest.raises(FakeprintError, match="8"):  # quarter turns drawn, only the flip pair computed
        statcache.training_views(rows, {"hflip": True, "rot90": True}, g1)


def test_each_drawn_flip_and_turn_picks_the_row_of_the_view_augment_makes():
    """The statistics of the augmented images are the picked rows: every one of the 16 draws (mirror, upside
    down, 0-3 quarter turns) lands on the row of the view it makes, with augment's random stream."""
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (48, 100, 100, 3), dtype=np.uint8))
    head = create_model("statmlp", feature_set="v2", hidden=16).eval()
    rows = statcache.statistics(head, images, "imagenet", views="dihedral")
    assert len({tuple(rows[0, i].tolist()) for i in range(8)}) == 8  # the eight views' statistics all differ
    cfg = {"hflip": True, "vflip": True, "rot90": True}
    picked = statcache.training_views(rows, cfg, torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = head.stats(normalize(augment(to_float(images), cfg, torch.Generator().manual_seed(7)), "imagenet"))
    torch.testing.assert_close(picked, want, rtol=1e-4, atol=1e-4)
    assert len({int(r) for r in statcache._ROW_OF_VIEW.flatten()}) == 8


@pytest.mark.parametrize("lossless", [{}, {"vflip": True, "rot90": True, "tta": "dihedral"}], ids=["flips", "dihedral"])
def test_training_on_the_statistics_once_is_training_on_the_images(tiny_train_only, tmp_path, lossless):
    """The same seed, the same recipe: the cached path ends with the weights and figures of the image path (up to
    float rounding), records that it ran, and reports from the images."""
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        summary = train(tiny_train_only, load_config(None, SMALL | lossless | {"stat_cache": mode}), out)
        runs[mode] = (summary, load_checkpoint(out / "last")[0].state_dict(),
                      json.loads((out / "run.json").read_text()),
                      list(csv.DictReader((out / "metrics.csv").open(newline=""))))
    (s_on, w_on, info_on, m_on), (s_off, w_off, info_off, m_off) = runs["on"], runs["off"]
    assert info_on["stat_cache"] is True and info_off["stat_cache"] is False
    assert info_on["statistics_time_s"] > 0 and info_off["statistics_time_s"] == 0
    assert w_on.keys() == w_off.keys()
    for k in w_on:
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-3, atol=1e-4)
    assert s_on["accuracy"] == s_off["accuracy"]
    for a, b in zip(m_on, m_off, strict=True):  # per epoch: train loss and accuracy, internal-split accuracy
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 1e-3
        assert a["train_acc"] == b["train_acc"] and a["val_acc"] == b["val_acc"]


def test_stat_mixup_blends_rows_and_targets_with_one_coefficient_per_batch():
    rows = torch.arange(12.0).view(6, 2)
    same, perm, lam = statcache.mix_rows(rows, {"stat_mixup": 0.0}, torch.Generator().manual_seed(0))
    assert same is rows and perm is None and lam == 1.0
    mixed, perm, lam = statcache.mix_rows(rows, {"stat_mixup": 0.4}, torch.Generator().manual_seed(0))
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(6))
    torch.testing.assert_close(mixed, lam * rows + (1 - lam) * rows[perm])
    # mix_prob 0: no batch is mixed
    assert statcache.mix_rows(rows, {"stat_mixup": 0.4, "mix_prob": 0.0}, torch.Generator())[1] is None


def test_stat_mixup_needs_the_statistics_computed_once_and_a_sign():
    model = create_model("statmlp", feature_set="v2", hidden=16)
    cfg = load_config(None, SMALL | {"stat_mixup": 0.2})
    assert statcache.enabled(cfg, model)
    for change, named in (({"stat_cache": "off"}, "stat_cache is off"), ({"rotation": 15}, "rotation")):
        with pytest.raises(FakeprintError, match=f"stat_mixup.*{named}"):
            statcache.enabled(load_config(None, SMALL | {"stat_mixup": 0.2} | change), model)
    with pytest.raises(FakeprintError, match="stat_mixup.*not a statistics-only model"):
        statcache.enabled(cfg | {"model": "hybrid"}, create_model("hybrid", feature_set="v2"))
    with pytest.raises(FakeprintError, match="stat_mixup is a Beta alpha"):
        load_config(None, SMALL | {"stat_mixup": -1})


def test_a_run_with_stat_mixup_trains_differently_and_records_it(tiny_train_only, tmp_path):
    rows = {}
    for alpha in (0.0, 0.4):
        out = tmp_path / str(alpha)
        train(tiny_train_only, load_config(None, SMALL | {"stat_mixup": alpha}), out)
        assert load_config(out / "config.yaml")["stat_mixup"] == alpha
        rows[alpha] = list(csv.DictReader((out / "metrics.csv").open(newline="")))
    assert [r["train_loss"] for r in rows[0.0]] != [r["train_loss"] for r in rows[0.4]]


def test_crops_add_the_statistics_of_each_images_own_crops_and_their_mirrors():
    """stat_crops: after the image's two rows, the statistics of K crops at corners drawn from the seed alone
    (the same crops however the images are batched) and of their mirrors."""
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.integers(0, 256, (6, 100, 100, 3), dtype=np.uint8))
    head = create_model("statmlp", feature_set="v2", hidden=16).eval()
    plain = statcache.statistics(head, images, "imagenet")
    rows = statcache.statistics(head, images, "imagenet", batch_size=4, crops=2, crop_size=90, crop_seed=3)
    assert rows.shape == (6, 2 + 4, head.stats.dim)
    torch.testing.assert_close(rows[:, :2], plain, rtol=0, atol=0)
    corners = statcache.crop_offsets(6, 2, 90, 100, 100, seed=3)
    assert corners.shape == (6, 2, 2) and int(corners.max()) <= 10 and len({tuple(c) for c in corners[:, 0].tolist()}) > 1
    x = normalize(to_float(images), "imagenet")
    with torch.no_grad():
        for i in (0, 5):
            for c in range(2):
                (y, xx) = corners[i, c].tolist()
                crop = x[i:i + 1, :, y:y + 90, xx:xx + 90]
                torch.testing.assert_close(rows[i, 2 + 2 * c], head.stats(crop)[0], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(rows[i, 3 + 2 * c], head.stats(crop.flip(3))[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(rows[:, 2], rows[:, 0], atol=1e-3)  # a crop's statistics are not the image's
    again = statcache.statistics(head, images, "imagenet", batch_size=5, crops=2, crop_size=90, crop_seed=3)
    torch.testing.assert_close(again, rows)
    with pytest.raises(FakeprintError, match="stat_crop_size 88 gives another number"):  # 11 x 11 spectrum blocks, not 10 x 10
        statcache.statistics(head, images, "imagenet", crops=1, crop_size=88)
    with pytest.raises(FakeprintError, match="larger than the images"):
        statcache.statistics(head, images, "imagenet", crops=1, crop_size=120)


def test_a_crop_is_drawn_for_its_share_of_samples_with_the_flip_drawn_first():
    k, n = 3, 4000
    rows = torch.arange(2 + 2 * k, dtype=torch.float32).view(1, -1, 1).expand(n, -1, 1)  # row r holds r
    cfg = {"hflip": True, "stat_crops": k, "stat_crop_prob": 0.25}
    picked = statcache.training_views(rows, cfg, torch.Generator().manual_seed(4))[:, 0].long()
    flips = torch.rand(n, generator=torch.Generator().manual_seed(4)) < 0.5  # the same first draw as without crops
    assert torch.equal(picked % 2 == 1, flips)  # odd rows: the mirror, of the image or of a crop
    share = float((picked >= 2).float().mean())
    assert 0.22 < share < 0.28  # a crop for a quarter of the samples
    assert set((picked[picked >= 2] - 2).div(2, rounding_mode="floor").tolist()) == {0, 1, 2}  # every crop used
    no_crops = statcache.training_views(rows[:, :2], {"hflip": True}, torch.Generator().manual_seed(4))
    assert torch.equal(no_crops[:, 0].long(), flips.long())
    with pytest.raises(FakeprintError, match="needs 8"):
        statcache.training_views(rows[:, :6], cfg, torch.Generator())


def test_stat_crops_needs_flip_views_the_statistics_computed_once_and_whole_numbers():
    model = create_model("statmlp", feature_set="v2", hidden=16)
    assert statcache.enabled(load_config(None, SMALL | {"stat_crops": 2}), model)
    with pytest.raises(FakeprintError, match="stat_crops.*rotation"):
        statcache.enabled(load_config(None, SMALL | {"stat_crops": 2, "rotation": 15}), model)
    with pytest.raises(FakeprintError, match="stat_crops works with horizontal flips only"):
        statcache.enabled(load_config(None, SMALL | {"stat_crops": 2, "rot90": True}), model)
    for bad in ({"stat_crops": -1}, {"stat_crops": 1.5}, {"stat_crop_size": 0}, {"stat_crop_prob": 0},
                {"stat_crop_prob": 1.5}):
        with pytest.raises(FakeprintError, match=next(iter(bad))):
            load_config(None, SMALL | bad)


def test_a_run_with_stat_crops_trains_on_them_and_says_so(tiny_train_only, tmp_path, capsys):
    runs = {}
    for k in (0, 2):
        out = tmp_path / f"crops{k}"
        train(tiny_train_only, load_config(None, SMALL | {"stat_crops": k}), out)
        runs[k] = load_checkpoint(out / "last")[0].state_dict()
        assert load_config(out / "config.yaml")["stat_crops"] == k
    assert "2 crops of 90 pixels and their mirrors" in capsys.readouterr().err
    assert any(not torch.allclose(runs[0][n], runs[2][n]) for n in runs[0])  # the crops changed the training
