"""fakeprint: tell which image generator made an image.

    >>> import fakeprint
    >>> clf = fakeprint.load("runs/threecnn")          # or fakeprint.load() for the shipped model
    >>> clf.predict(["a.png", "b.webp"]).labels
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path=None, device: str = "cpu"):
    """Load a classifier: a checkpoint path, or ``None`` for the model shipped with the package."""
    from .predict import load as _load

    return _load(path, device)
