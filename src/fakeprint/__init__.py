"""fakeprint: tell which image generator made an image.

    >>> import fakeprint
    >>> clf = fakeprint.load("runs/threecnn")          # or fakeprint.load() for the shipped model
    >>> clf.predict(["a.png", "b.webp"]).labels
    >>> fakeprint.load(["accurate", "default", "fast"])  # several: an ensemble (averaged probabilities)
"""

from __future__ import annotations

from fakeprint.core.versions import __version__

__all__ = ["__version__", "load"]


def load(path=None, device: str = "cpu"):
    """Load a classifier: a checkpoint path or shipped model's name, ``None`` for the model shipped with the package,
    or a list of several for their ensemble."""
    from fakeprint.engine.predict import load as _load

    return _load(path, device)
