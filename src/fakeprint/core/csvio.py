"""Every CSV fakeprint writes goes through here: the csv module quotes ids with commas, quotes or line
breaks, so each row stays one record whatever the ids are."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fakeprint.core.io import atomic_write

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_bytes(header: list[str], rows: Iterable[Iterable[Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]]) -> Path:
    """Write ``header`` and ``rows`` to ``path`` atomically."""

    atomic_write(Path(path), csv_bytes(header, rows))
    return Path(path)


def looks_like_formula(value: str) -> bool:
    """Whether a spreadsheet would run this cell as a formula (CSV injection)."""
    return bool(value) and value.startswith(FORMULA_PREFIXES)
