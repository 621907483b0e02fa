"""File-level augmentation: training sees re-encoded, resized, cropped, blurred copies of its files, drawn afresh
each epoch from the epoch's generator; statistics computed once get perturbed copies as more rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest_service import random_images
from fakeprint.core.errors import FakeprintError
from fakeprint.engine.config import load_config
from fakeprint.engine.training import statcache
from fakeprint.engine.training.train import train
from fakeprint.features.file_augment import DEFAULT_WEIGHTS, file_augment, random_spec
from fakeprint.features.perturb import parse
from fakeprint.models import create_model


def test_drawn_specs_parse_cover_every_family_and_follow_the_weights():
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(800)]
    assert all(parse(s) for s in specs)
    kinds = [s.split(":")[0] if "+" not in s else "chain" for s in specs]
    for family in DEFAULT_WEIGHTS:
        assert family in kinds, family
    assert kinds.count("jpeg") > kinds.count("noise") * 3  # weight 3 against 0.5
    only = [random_spec(rng, {"webp": 1.0}) for _ in range(20)]
    assert all(s.startswith("webp:q=") and 50 <= int(s.split("=")[1]) <= 95 for s in only)


def test_a_share_of_the_batch_is_replaced_by_decoded_copies_of_perturbed_files():
    x = torch.from_numpy(random_images(40))
    g = torch.Generator().manual_seed(3)
    out = file_augment(x, {"file_aug": 0.5}, g)
    changed = [(out[i] != x[i]).any().item() for i in range(len(x))]
    assert 8 <= sum(changed) <= 32 and out.dtype == torch.uint8 and out.shape == x.shape
    again = file_augment(x, {"file_aug": 0.5}, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # a function of the generator: a resumed run draws the same


def test_off_draws_nothing_so_a_run_keeps_its_random_stream():
    x = torch.from_numpy(random_images(4))
    g = torch.Generator().manual_seed(7)
    assert file_augment(x, {"file_aug": 0.0}, g) is x
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(7)))


@pytest.mark.parametrize(("change", "named"), [
    ({"file_aug": 1.5}, "file_aug must be a share"), ({"file_aug_weights": {"gif": 1}}, "unknown family 'gif'"),
    ({"file_aug_weights": {"jpeg": -1}}, "file_aug_weights.jpeg"), ({"file_aug_variants": -2}, "file_aug_variants"),
])
def test_bad_settings_are_one_error_naming_the_key(change, named):
    with pytest.raises(FakeprintError, match=named):
        load_config("demo", change)


SMALL = {"model": "statmlp", "model_args": {"feature_set": "v1", "hidden": 16, "layers": 1, "dropout": 0.1},
         "epochs": 2, "batch_size": 16, "progress": False, "tta": "flip", "ema": 0.9, "amp": "off", "rotation": 0}


def test_statistics_computed_once_hold_the_copies_and_file_aug_without_them_turns_the_cache_off():
    model = create_model("statmlp", **SMALL["model_args"])
    cfg = load_config(None, SMALL | {"file_aug": 0.5})
    assert not statcache.enabled(cfg, model) and "file_aug_variants" in statcache.unusable_reason(cfg, model)
    cfg = load_config(None, SMALL | {"file_aug": 0.5, "file_aug_variants": 2})
    assert statcache.enabled(cfg, model)
    images = torch.from_numpy(random_images(5))
    rows = statcache.statistics(model, images, "imagenet", variants=2, crop_seed=1)
    assert rows.shape == (5, 6, model.stats.dim)
    assert torch.equal(rows, statcache.statistics(model, images, "imagenet", variants=2, crop_seed=1))
    assert not torch.equal(rows[:, 2], rows[:, 0]) and not torch.equal(rows[:, 2], rows[:, 4])
    picked = statcache.training_views(rows, cfg, torch.Generator().manual_seed(0))
    assert picked.shape == (5, model.stats.dim)
    with pytest.raises(FakeprintError, match="needs file_aug"):
        statcache.enabled(load_config(None, SMALL | {"file_aug_variants": 2}), model)


def test_training_with_file_augmentation_runs_in_both_paths(tiny_train_only, tmp_path):
    for name, extra in (("pixels", {"model": "fpnet_tiny", "model_args": {}}),
                        ("statistics", {"file_aug_variants": 2})):
        cfg = load_config(None, SMALL | extra | {"file_aug": 0.6, "threads": 1})
        summary = train(tiny_train_only, cfg, tmp_path / name)
        assert summary["epochs_run"] == 2 and 0 <= summary["accuracy"] <= 1, name


def test_crops_and_perturbed_copies_together_each_take_their_own_rows():
    """Rows: the image and its mirror (0, 1), then two per crop, then two per perturbed copy."""
    cfg = load_config(None, SMALL | {"stat_crops": 2, "stat_crop_prob": 1.0, "file_aug": 1.0, "file_aug_variants": 1})
    rows = torch.arange(8).float().view(1, 8, 1).expand(4000, 8, 1).contiguous()
    got = set(statcache.training_views(rows, cfg, torch.Generator().manual_seed(0)).flatten().long().tolist())
    assert got == {2, 3, 4, 5}  # every draw took a crop (crops are drawn first), never past them
    cfg = load_config(None, SMALL | {"stat_crops": 2, "stat_crop_prob": 0.5, "file_aug": 1.0, "file_aug_variants": 1})
    got = set(statcache.training_views(rows, cfg, torch.Generator().manual_seed(0)).flatten().long().tolist())
    assert got == {2, 3, 4, 5, 6, 7}  # the others took the copy (rows 6, 7), none the whole image
    only = [random_spec(np.random.default_rng(i), {"webp": 1.0, "chain": 1.0}) for i in range(40)]
    assert all(all(part.startswith("webp") for part in s.split("+")) for s in only)  # chains of allowed families
