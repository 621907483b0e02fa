"""What produced a result: fakeprint's version, the git commit, the library versions."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__version__ = "0.1.0"


def git_commit() -> str:
    if os.environ.get("FAKEPRINT_COMMIT"):
        return os.environ["FAKEPRINT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        if commit != "unknown":
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
            if dirty.stdout.strip():
                commit += "-dirty"
        return commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import numpy
    import PIL
    import torch

    return {"fakeprint": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "pillow": PIL.__version__, "python": platform.python_version()}
