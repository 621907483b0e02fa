"""Training a statistics-only model (``statmlp``) on its image statistics computed once.

``statmlp`` is ``StatFeatures`` (no parameters) followed by a small MLP. Trained the ordinary way, every epoch
recomputes thousands of statistics for every training image, and that is nearly all of its training time. When
the recipe's only augmentation is the horizontal flip, every view the MLP can ever see is known in advance: the
statistics of each image and of its mirror image. So they are computed once (``StatFeatures.forward_and_mirror``,
the same numbers as ``forward(x.flip(3))`` up to float rounding) and each step picks one of the two rows per
sample, with the same random draw ``augment.augment`` makes for its flips: the same training, up to rounding, in
a fraction of the time. Per-epoch figures use the internal split's statistics the same way (flip TTA: the mean of
the two rows' logits); the final report is measured on the images, as every consumer computes it.

The config's ``stat_cache``: ``auto`` (when the model and the augmentation allow it), ``on`` (refuse a config
that does not allow it, with the reason) or ``off``.

``stat_mixup`` (Beta alpha, 0: off) mixes the statistic rows of a batch, as MixUp mixes images (``mix_rows``): not
the same thing as image MixUp (the statistics of a blended image are not the blend of the statistics), so it is its
own key and needs the statistics computed once; measured by cross-validation with ``tools/stat_recipe_cv.py``
(docs/results.md, round 16).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .augment import draw_hflips, mix_batch
from .errors import FakeprintError
from .models.hybrid import StatHead
from .preprocess import normalize, to_float, tta_mode

# augmentation switches that change an image beyond a horizontal flip: with any of them on, the statistics of a
# training view are not known in advance
_OTHER_AUGMENTATION = ("vflip", "rot90", "rotation", "translate", "color_jitter", "mixup", "cutmix")


def unusable_reason(cfg: dict, model: nn.Module) -> str | None:
    """Why the statistics cannot be computed once for this config and model (None: they can)."""
    if not isinstance(model, StatHead):
        return f"the model ({cfg['model']}) is not a statistics-only model (statmlp)"
    on = [k for k in _OTHER_AUGMENTATION if float(cfg.get(k) or 0)]
    if "rotation" in on and float(cfg.get("rotation_prob", 1.0)) == 0.0:
        on.remove("rotation")
    if on:
        return f"its augmentation changes the images beyond a horizontal flip ({', '.join(on)})"
    if tta_mode(cfg.get("tta")) == "dihedral":
        return "its test-time augmentation (dihedral) needs views other than the image and its mirror"
    return None


def enabled(cfg: dict, model: nn.Module) -> bool:
    """Whether to train on statistics computed once; ``stat_cache: on`` with an unusable config is an error, and
    so is ``stat_mixup`` without the statistics computed once."""
    mode = str(cfg.get("stat_cache", "auto"))
    reason = "stat_cache is off" if mode == "off" else unusable_reason(cfg, model)
    if reason and float(cfg.get("stat_mixup") or 0) > 0:
        raise FakeprintError(f"config: stat_mixup mixes statistics computed once, and they cannot be here: {reason}; "
                             "set stat_mixup: 0 (or mixup, which mixes images)")
    if reason and mode == "on":
        raise FakeprintError(f"config: stat_cache is on but the statistics cannot be computed once: {reason}; "
                             "use stat_cache: auto or off")
    return reason is None


@torch.no_grad()
def statistics(head: StatHead, images: torch.Tensor, norm: str, batch_size: int = 128,
               progress: bool = False, desc: str = "statistics") -> torch.Tensor:
    """N x 2 x D float32: the statistics of each uint8 N x H x W x 3 image (row 0) and of its mirror (row 1),
    on the images' device."""
    out = []
    for start in tqdm(range(0, images.shape[0], batch_size), desc=desc, unit="batch", leave=False,
                      disable=not progress, dynamic_ncols=True):
        x = normalize(to_float(images[start:start + batch_size]), norm)
        f, f_m = head.stats.forward_and_mirror(x)
        out.append(torch.stack([f, f_m], 1))
    if not out:
        return torch.zeros(0, 2, head.stats.dim, device=images.device)
    return torch.cat(out)


class OnStatistics(nn.Module):
    """The statistics head taking precomputed statistics (N x D) as its input; the same parameters, in the same
    order, as the ``StatHead`` it wraps (the EMA and the optimiser see no difference)."""

    def __init__(self, head: StatHead):
        super().__init__()
        self.head = head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.head.classify(f)


def training_views(rows: torch.Tensor, cfg: dict, g: torch.Generator) -> torch.Tensor:
    """One row per sample of N x 2 x D statistics: the mirror's where a horizontal flip is drawn, with
    ``augment.draw_hflips`` (the draw the image path makes, so a run keeps its random stream)."""
    flip = draw_hflips(rows.shape[0], cfg, g, rows.device)
    if flip is None:
        return rows[:, 0]
    return torch.where(flip.view(-1, 1), rows[:, 1], rows[:, 0])


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
    """Evaluation logits (float32) from N x 2 x D statistics: the image's, or with flip TTA the mean of the
    image's and the mirror's (what ``inference.predict_logits`` gives on the images, up to rounding)."""
    mode = tta_mode(tta)
    if mode not in ("none", "flip"):
        raise FakeprintError(f"the statistics computed once hold the image and its mirror only: TTA {mode!r} "
                             "needs the images (stat_cache: off)")
    was_training = head.training
    head.eval()
    out = []
    for chunk in rows.split(batch_size):
        z = head.classify(chunk[:, 0])
        if mode == "flip":
            z = (z + head.classify(chunk[:, 1])) / 2
        out.append(z.float())
    head.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)
