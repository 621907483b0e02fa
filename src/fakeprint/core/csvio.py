"""Every CSV fakeprint writes goes through here: the csv module quotes ids with commas, quotes or line
breaks, so each row stays one record whatever the ids are, and no cell reaches a spreadsheet as a formula.

CSV injection (OWASP): a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is run as a
formula by Excel, LibreOffice and Google Sheets, quoted or not. Image ids come from a dataset's CSV files, which
refuse such ids (``data.dataset.read_csv``: a problem naming the row), so a submission carries its ids exactly;
a file of user-given names (``predict --probs`` of image files) is neutralised as OWASP advises, the cell
prefixed with a single quote. ``formulas="refuse"`` (the default) is the last guard: a formula-like cell is a
``FakeprintError`` and nothing is written.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fakeprint.core.errors import FakeprintError
from fakeprint.core.io import atomic_write

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
FORMULA_POLICIES = ("refuse", "neutralise")


def looks_like_formula(value: str) -> bool:
    """Whether a spreadsheet would run this cell as a formula (CSV injection)."""
    return isinstance(value, str) and bool(value) and value.startswith(FORMULA_PREFIXES)


def csv_bytes(header: list[str], rows: Iterable[Iterable[Any]], formulas: str = "refuse") -> bytes:
    """The CSV text of ``header`` and ``rows``. Text cells that look like formulas are refused (``FakeprintError``
    naming the row) or, with ``formulas="neutralise"``, written with a leading single quote; numbers pass as they
    are (a negative number is no formula)."""
    if formulas not in FORMULA_POLICIES:
        raise ValueError(f"formulas must be one of {FORMULA_POLICIES}, got {formulas!r}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for line, row in enumerate(rows, start=2):
        cells = list(row)
        for k, cell in enumerate(cells):
            if looks_like_formula(cell):
                if formulas == "refuse":
                    raise FakeprintError(f"row {line}, column {header[k] if k < len(header) else k + 1}: {cell!r} "
                                         f"starts with {cell[0]!r}, which a spreadsheet runs as a formula; refused "
                                         "(CSV injection)")
                cells[k] = "'" + cell
        w.writerow(cells)
    return buf.getvalue().encode()


def write_csv(path: str | Path, header: list[str], rows: Iterable[Iterable[Any]], formulas: str = "refuse") -> Path:
    """Write ``header`` and ``rows`` to ``path`` atomically (nothing is written if a row is refused)."""
    try:
        data = csv_bytes(header, rows, formulas)
    except FakeprintError as e:
        raise FakeprintError(f"{path}: {e}") from None
    atomic_write(Path(path), data)
    return Path(path)
