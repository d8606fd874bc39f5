"""What a transplant tells a heal: the rows it copied bit for bit (``transplant_rows.json``).

:func:`~surgery.transplant.transplant.transplant_checkpoint` writes the list of copied rows (shared and
special tokens) next to the model; a heal (``surgery heal``, the project's trainer configured with the new
rows as its parameter policy) reads it and keeps those rows frozen. The training itself is not here:
``surgery/transplant`` does not depend on the trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

ROWS_FILE = "transplant_rows.json"


# --------------------------------------------------------------------------- copied-row lists
def encode_ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted ids → ``[[start, end), ...]`` runs (compact JSON)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return []
    br = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[ids[0]], ids[br + 1]])
    ends = np.concatenate([ids[br] + 1, [ids[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def decode_ranges(ranges: list[list[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def rows_file_content(copied: np.ndarray, n_rows: int) -> str:
    return json.dumps({"n_rows": int(n_rows), "copied": encode_ranges(copied)}) + "\n"


def read_copied_rows(folder: str | Path, n_rows: int | None = None) -> np.ndarray | None:
    """The ids of the rows a transplant copied, from ``folder``'s rows file (``None`` when it has none).

    Args:
        n_rows: the embedding rows of the model in ``folder``: the file must describe that many (a rows file of
            another transplant would freeze the wrong rows).

    Raises:
        SurgeryError: the file is not JSON of the form :func:`rows_file_content` writes, its runs leave
            ``[0, n_rows)``, or it describes another number of rows than ``n_rows``.
    """
    p = Path(folder) / ROWS_FILE
    if not p.exists():
        return None
    hint = "re-create it with `surgery transplant` (or delete it and heal with --train-rows all)"
    try:
        data = json.loads(p.read_text())
        rows, runs = data["n_rows"], data["copied"]
        ok = isinstance(rows, int) and rows >= 0 and isinstance(runs, list) and all(
            isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r) and 0 <= r[0] < r[1] <= rows
            for r in runs)
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SurgeryError(f"{str(p)!r} is not a valid row list ({e})", hint) from e
    if not ok:
        raise SurgeryError(f"{str(p)!r} is not a valid row list (runs [start, end) within 0..n_rows expected)", hint)
    if n_rows is not None and rows != n_rows:
        raise SurgeryError(f"{str(p)!r} describes {rows} rows but the model beside it has {n_rows}",
                           "the rows file belongs to another transplant: " + hint)
    return decode_ranges(runs)
