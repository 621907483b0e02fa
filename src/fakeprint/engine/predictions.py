"""What a prediction returns (``Predictions``) and why an answer is flagged ``uncertain`` (``REASONS``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Predictions:
    """``labels[i]`` is the predicted class of image i, ``probs[i]`` its class probabilities (temperature-scaled
    where the checkpoint is calibrated), ``uncertain[i]`` whether its top probability is below what the
    calibration split shows (None: the model has no calibration, so nothing is known). ``reasons[i]``: why image i
    is flagged, as bits of ``REASONS`` (0: not flagged); given reasons and no flags, the flags are derived from them
    (``reasons != 0``); ``why(i)`` names them."""

    labels: np.ndarray
    probs: np.ndarray
    classes: list[str]
    uncertain: np.ndarray | None = None
    file_perturbed: np.ndarray | None = None  # a routed ensemble's: P(the file was re-encoded, resized, ...)
    reasons: np.ndarray | None = None  # uint8 bits of REASONS, where the flags are known

    def __post_init__(self) -> None:
        if self.uncertain is None and self.reasons is not None:
            self.uncertain = self.reasons != 0

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: slice | np.ndarray) -> Predictions:
        """The predictions of ``rows`` (a slice or an index array), in that order."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]

        return Predictions(self.labels[rows], self.probs[rows], self.classes, pick(self.uncertain),
                           pick(self.file_perturbed), pick(self.reasons))

    def why(self, i: int) -> list[str] | None:
        """The names of the reasons image ``i`` is flagged ``uncertain`` ([]: it is not; None: not known)."""
        return None if self.reasons is None else reason_names(int(self.reasons[i]))

    def as_dicts(self) -> list[dict[str, Any]]:
        flags = [None] * len(self.labels) if self.uncertain is None else [bool(u) for u in self.uncertain]
        out = [{"label": self.classes[int(lab)], "label_index": int(lab),
                "probabilities": {c: float(p) for c, p in zip(self.classes, pr, strict=True)}, "uncertain": u}
               for lab, pr, u in zip(self.labels, self.probs, flags, strict=True)]
        if self.reasons is not None:
            for i, d in enumerate(out):
                d["uncertain_reasons"] = self.why(i)
        if self.file_perturbed is not None:
            for d, p in zip(out, self.file_perturbed, strict=True):
                d["file_perturbed"] = round(float(p), 4)
        return out


# why an answer is flagged uncertain, as bits: its top probability is below the calibrated bar (its model's, or a
# routed model's second route's own); the input is one flat colour; a routed model's detector finds its statistics
# far from every training image's (models.router.FileDetector.typicality)
REASONS = ("low_confidence", "flat_image", "far_from_training")
LOW_CONFIDENCE, FLAT_IMAGE, FAR_FROM_TRAINING = (np.uint8(1 << i) for i in range(len(REASONS)))


def reason_bits(mask: np.ndarray, reason: np.uint8) -> np.ndarray:
    """``reason`` (a bit of ``REASONS``) where ``mask`` is true, else 0, as uint8."""
    return np.where(np.asarray(mask, bool), reason, 0).astype(np.uint8)


def reason_names(bits: int) -> list[str]:
    """The ``REASONS`` set in ``bits``, in that order."""
    return [name for i, name in enumerate(REASONS) if bits >> i & 1]


def concat_predictions(parts: list[Predictions]) -> Predictions:
    """Predictions of consecutive chunks as one (a field known for every part is kept, else it is None)."""
    if len(parts) == 1:
        return parts[0]

    def joined(field: str) -> np.ndarray | None:
        arrays = [getattr(p, field) for p in parts]
        return None if any(a is None for a in arrays) else np.concatenate(arrays)

    return Predictions(np.concatenate([p.labels for p in parts]), np.concatenate([p.probs for p in parts]),
                       parts[0].classes, joined("uncertain"), joined("file_perturbed"), joined("reasons"))
