"""Training a statistics-only model (``statmlp``) on its image statistics computed once.

``statmlp`` is ``StatFeatures`` (no parameters) followed by a small MLP. Trained the ordinary way, every epoch
recomputes thousands of statistics for every training image, and that is nearly all of its training time. When
the recipe's only augmentation is lossless (horizontal flips, and optionally vertical flips and quarter turns), every
view the MLP can ever see is known in advance: the statistics of each image and of its mirror image, or of its
eight dihedral views. So they are computed once (``StatFeatures.forward_and_mirror`` on each quarter turn, the same
numbers as ``forward`` on each view up to float rounding) and each step picks one row per sample, with the same
random draw ``augment.augment`` makes for its flips and turns: the same training, up to rounding, in a fraction of
the time. Per-epoch figures use the internal split's statistics the same way (flip TTA: the mean of the image's and
the mirror's logits; dihedral TTA: of all eight); the final report is measured on the images, as every consumer
computes it.

Rows: row ``2j + m`` holds the statistics of the image turned ``j`` quarter turns (``rot90(j, (2, 3))``) and then
mirrored (``flip(3)``) if ``m``: ``tta_views``' eight views, ordered so that rows 0 and 1 are always the image and its
mirror; with flips only there are just those two.

The config's ``stat_cache``: ``auto`` (when the model and the augmentation allow it), ``on`` (refuse a config
that does not allow it, with the reason) or ``off``.

``stat_mixup`` (Beta alpha, 0: off) mixes the statistic rows of a batch, as MixUp mixes images (``mix_rows``): not
the same thing as image MixUp (the statistics of a blended image are not the blend of the statistics), so it is its
own key and needs the statistics computed once; measured by cross-validation with ``experiments/stat_recipe_cv.py``
(docs/results.md, round 16).

``stat_crops`` (K, 0: off) adds, after those rows, the statistics of K random ``stat_crop_size`` x
``stat_crop_size`` crops of each training image and of their mirrors (row ``V + 2c + m`` for crop ``c``, mirrored if
``m``, after the image's V views): other samples of the same generator's output. The crop positions are drawn once,
from the run's seed, when the statistics are computed; each step then takes, for ``stat_crop_prob`` of the samples,
one of the K crops (its mirror where the flip draw says so) instead of the whole image. Flips only (no quarter
turns), statistics computed once only; scoring and prediction always use the whole image (docs/results.md, round
21).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fakeprint.core.errors import FakeprintError
from fakeprint.features.augment import draw_lossless, mix_batch
from fakeprint.features.file_augment import random_spec
from fakeprint.features.perturb import decoded_copies
from fakeprint.features.preprocess import normalize, to_float, tta_mode
from fakeprint.models.hybrid import StatHead

# augmentation switches that change an image beyond flips and quarter turns: with any of them on, the statistics
# of a training view are not known in advance
_OTHER_AUGMENTATION = ("rotation", "translate", "color_jitter", "mixup", "cutmix")


def _dihedral_rows() -> torch.Tensor:
    """``table[h, v, k]``: the row (``2j + m``, see the module's docstring) of the view ``augment`` makes with
    mirror ``h``, upside-down flip ``v`` and ``k`` quarter turns, applied in that order. Found by applying both
    to a 2 x 2 image of four distinct values, on which the eight dihedral views all differ."""
    base = torch.arange(4.0).view(1, 1, 2, 2)
    layout = [base.rot90(j, (2, 3)).flip(3) if m else base.rot90(j, (2, 3)) for j in range(4) for m in range(2)]
    table = torch.empty(2, 2, 4, dtype=torch.long)
    for h in range(2):
        for v in range(2):
            for k in range(4):
                y = base.flip(3) if h else base
                y = (y.flip(2) if v else y).rot90(k, (2, 3))
                table[h, v, k] = next(i for i, view in enumerate(layout) if torch.equal(view, y))
    return table


_ROW_OF_VIEW = _dihedral_rows()


def views(cfg: dict) -> str:
    """Which views' statistics a config needs: ``"flip"`` (the image and its mirror) or ``"dihedral"`` (all eight,
    for vertical flips, quarter turns or dihedral TTA)."""
    if cfg.get("vflip") or cfg.get("rot90") or tta_mode(cfg.get("tta")) == "dihedral":
        return "dihedral"
    return "flip"


def unusable_reason(cfg: dict, model: nn.Module) -> str | None:
    """Why the statistics cannot be computed once for this config and model (None: they can)."""
    if not isinstance(model, StatHead):
        return f"the model ({cfg['model']}) is not a statistics-only model (statmlp)"
    on = [k for k in _OTHER_AUGMENTATION if float(cfg.get(k) or 0)]
    if "rotation" in on and float(cfg.get("rotation_prob", 1.0)) == 0.0:
        on.remove("rotation")
    if on:
        return f"its augmentation changes the images beyond flips and quarter turns ({', '.join(on)})"
    if float(cfg.get("file_aug") or 0) > 0 and not variant_count(cfg):
        return ("file_aug perturbs the files afresh each epoch (file_aug_variants: M computes the statistics of M "
                "perturbed copies of each image once instead)")
    return None


def variant_count(cfg: dict) -> int:
    """How many perturbed copies of each training image ``file_aug_variants`` asks for (0: none)."""
    return int(cfg.get("file_aug_variants") or 0)


def crop_count(cfg: dict) -> int:
    """How many crops of each training image ``stat_crops`` asks for (0: none)."""
    return int(cfg.get("stat_crops") or 0)


def enabled(cfg: dict, model: nn.Module) -> bool:
    """Whether to train on statistics computed once; ``stat_cache: on`` with an unusable config is an error, and
    so are ``stat_mixup`` and ``stat_crops`` without the statistics computed once."""
    mode = str(cfg.get("stat_cache", "auto"))
    reason = "stat_cache is off" if mode == "off" else unusable_reason(cfg, model)
    if crop_count(cfg):
        if reason:
            raise FakeprintError(f"config: stat_crops adds the statistics of crops computed once, and they cannot be "
                                 f"here: {reason}; set stat_crops: 0")
        if views(cfg) != "flip":
            raise FakeprintError("config: stat_crops works with horizontal flips only (no vflip, rot90 or dihedral "
                                 "TTA); set stat_crops: 0 or turn those off")
    if variant_count(cfg):
        if reason:
            raise FakeprintError(f"config: file_aug_variants adds the statistics of perturbed copies computed once, "
                                 f"and they cannot be here: {reason}; set file_aug_variants: 0")
        if views(cfg) != "flip" or not float(cfg.get("file_aug") or 0) > 0:
            raise FakeprintError("config: file_aug_variants works with horizontal flips only and needs file_aug (the "
                                 "share of draws that take a copy) above 0")
    if reason and float(cfg.get("stat_mixup") or 0) > 0:
        raise FakeprintError(f"config: stat_mixup mixes statistics computed once, and they cannot be here: {reason}; "
                             "set stat_mixup: 0 (or mixup, which mixes images)")
    if reason and mode == "on":
        raise FakeprintError(f"config: stat_cache is on but the statistics cannot be computed once: {reason}; "
                             "use stat_cache: auto or off")
    return reason is None


def select_views(rows: torch.Tensor, views: str) -> torch.Tensor:
    """The rows of ``statistics(..., views=views)`` taken from N x V x D statistics holding at least those views
    (the image and its mirror are rows 0 and 1 in both layouts)."""
    want = {"flip": 2, "dihedral": 8}[views]
    if rows.shape[1] < want:
        raise FakeprintError(f"the statistics computed once hold {rows.shape[1]} views; {views!r} needs {want}")
    return rows[:, :want]


def crop_offsets(n: int, k: int, size: int, height: int, width: int, seed: int) -> torch.Tensor:
    """N x K x 2 top-left corners (row, column) of each image's K crops, drawn from ``seed`` alone."""
    if size > min(height, width):
        raise FakeprintError(f"config: stat_crop_size {size} is larger than the images ({height} x {width})")
    g = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.randint(0, height - size + 1, (n, k), generator=g),
                        torch.randint(0, width - size + 1, (n, k), generator=g)], 2)


def _crop(x: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Each B x C x H x W image's ``size`` x ``size`` crop at its own corner (B x 2)."""
    rows = (corners[:, :1] + torch.arange(size)).to(x.device)  # B x size
    cols = (corners[:, 1:] + torch.arange(size)).to(x.device)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def statistics(head: StatHead, images: torch.Tensor, norm: str, batch_size: int = 128, views: str = "flip",
               progress: bool = False, desc: str = "statistics", crops: int = 0, crop_size: int = 90,
               crop_seed: int = 0, variants: int = 0, weights: dict | None = None) -> torch.Tensor:
    """N x (V + 2K) x D float32 on the images' device: the statistics of each uint8 N x H x W x 3 image's views, V = 2
    (``views="flip"``: the image, its mirror) or 8 (``"dihedral"``: rows laid out as the module's docstring says),
    then those of its ``crops`` (K) random crops and their mirrors (``stat_crops``, flip views only), then those of
    ``variants`` (M) perturbed copies of the file and their mirrors (``file_aug_variants``: specs drawn with
    ``file_augment.random_spec`` from ``crop_seed`` and the image's position, so the same run makes the same copies)."""
    if views not in ("flip", "dihedral"):
        raise ValueError(f"views must be flip or dihedral, got {views!r}")
    if crops and views != "flip":
        raise ValueError("crops come with the flip views only")
    turns = 4 if views == "dihedral" else 1
    if crops:  # the statistics of a crop must be the same numbers as an image's (the spectrum's blocks are H // 10)
        corners = crop_offsets(images.shape[0], crops, crop_size, images.shape[1], images.shape[2], crop_seed)
        try:
            probe = head.stats(torch.zeros(1, 3, crop_size, crop_size, device=images.device))
            same = probe.shape == (1, head.stats.dim)
        except RuntimeError:  # the module's last reshape refuses another number of statistics
            same = False
        if not same:
            raise FakeprintError(f"config: stat_crop_size {crop_size} gives another number of statistics than the "
                                 f"image's {head.stats.dim:,} (the spectrum is cut in blocks of a tenth of the side): "
                                 "try 90 or 95")
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress, dynamic_ncols=True):
        x = normalize(to_float(images[start:start + batch_size]), norm)
        rows = [f for j in range(turns) for f in head.stats.forward_and_mirror(x.rot90(j, (2, 3)))]
        for c in range(crops):
            rows += list(head.stats.forward_and_mirror(_crop(x, corners[start:start + batch_size, c], crop_size)))
        for m in range(variants):
            copies = _variants(images[start:start + batch_size], start, m, crop_seed, weights)
            rows += list(head.stats.forward_and_mirror(normalize(to_float(copies), norm)))
        out.append(torch.stack(rows, 1))
    if not out:
        return torch.zeros(0, 2 * turns + 2 * crops + 2 * variants, head.stats.dim, device=images.device)
    return torch.cat(out)


def _variants(images: torch.Tensor, start: int, m: int, seed: int, weights: dict | None) -> torch.Tensor:
    """Copy ``m`` of each image of a batch (uint8 N x H x W x 3) starting at position ``start``: a file-level
    perturbation drawn from the run's seed and the image's position alone."""
    specs, seeds = [], []
    for i in range(images.shape[0]):
        rng = np.random.default_rng([seed, start + i, m])
        specs.append(random_spec(rng, weights))
        seeds.append(int(rng.integers(0, 2**31 - 1)))
    return torch.from_numpy(decoded_copies(images.cpu().numpy(), specs, seeds)).to(images.device)


class OnStatistics(nn.Module):
    """The statistics head taking precomputed statistics (N x D) as its input; the same parameters, in the same
    order, as the ``StatHead`` it wraps (the EMA and the optimiser see no difference)."""

    def __init__(self, head: StatHead):
        super().__init__()
        self.head = head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head.classify(f)


def training_views(rows: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """One row per sample of N x V x D statistics: the row of the view ``augment`` would make, with
    ``augment.draw_lossless`` (the draw the image path makes, so a run keeps its random stream)."""
    n, k_crops = rows.shape[0], crop_count(cfg)
    h, v, k = draw_lossless(n, cfg, g, rows.device)
    if h is None and v is None and k is None and not k_crops and not variant_count(cfg):
        return rows[:, 0]
    zero = torch.zeros(n, dtype=torch.long, device=rows.device)
    row = _ROW_OF_VIEW.to(rows.device)[zero if h is None else h.long(), zero if v is None else v.long(),
                                       zero if k is None else k]
    if k_crops:  # after the flip draw, so that a run without crops keeps its random stream
        first = rows.shape[1] - 2 * k_crops - 2 * variant_count(cfg)  # the image's views, then crops, then copies
        if first < 2:
            raise FakeprintError(f"the statistics computed once hold {rows.shape[1]} views; stat_crops "
                                 f"{k_crops} needs {2 + 2 * k_crops}")
        take = torch.rand(n, generator=g, device=rows.device) < float(cfg.get("stat_crop_prob", 0.5))
        c = torch.randint(0, k_crops, (n,), generator=g, device=rows.device)
        row = torch.where(take, first + 2 * c + row, row)
    m_variants = variant_count(cfg)
    if m_variants:  # after the crop draw, so that a run without copies keeps its random stream
        first = rows.shape[1] - 2 * m_variants
        take = torch.rand(n, generator=g, device=rows.device) < float(cfg.get("file_aug") or 0)
        c = torch.randint(0, m_variants, (n,), generator=g, device=rows.device)
        mirror = zero if h is None else h.long()
        row = torch.where(take & (row < 2), first + 2 * c + mirror, row)
    if int(row.max()) >= rows.shape[1]:
        raise FakeprintError(f"the statistics computed once hold {rows.shape[1]} views; this augmentation needs 8")
    return rows[torch.arange(n, device=rows.device), row]


def mix_rows(rows: torch.Tensor, cfg: dict, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """``stat_mixup``: the batch's statistic rows (N x D) blended with a shuffled copy, one Beta(alpha, alpha)
    coefficient per batch (``mix_prob`` of the batches), drawn as ``augment.mix_batch`` draws image MixUp.
    Returns ``(rows, perm, lam)``: the targets are ``lam * y + (1 - lam) * y[perm]``."""
    alpha = float(cfg.get("stat_mixup") or 0)
    if alpha <= 0:
        return rows, None, 1.0
    return mix_batch(rows, {"mixup": alpha, "cutmix": 0.0, "mix_prob": cfg.get("mix_prob", 1.0)}, g)


@torch.no_grad()
def logits(head: StatHead, rows: torch.Tensor, tta: bool | str, batch_size: int = 1024) -> torch.Tensor:
    """Evaluation logits (float32) from N x V x D statistics: the image's, or with TTA the mean of its views' (flip:
    the image's and the mirror's; dihedral: all eight), what ``inference.predict_logits`` gives on the images, up
    to rounding."""
    mode = tta_mode(tta)
    rows = rows[:, :1] if mode == "none" else select_views(rows, mode)  # dihedral TTA needs all eight views
    used = rows.shape[1]
    was_training = head.training
    head.eval()
    out = []
    for chunk in rows.split(batch_size):
        z = sum(head.classify(chunk[:, i]) for i in range(used)) / used
        out.append(z.float())
    head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
