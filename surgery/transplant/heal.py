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


def read_copied_rows(folder: str | Path) -> np.ndarray | None:
    p = Path(folder) / ROWS_FILE
    if not p.exists():
        return None
    try:
        return decode_ranges(json.loads(p.read_text())["copied"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SurgeryError(f"{str(p)!r} is not a valid row list ({e})", "re-create it with `surgery transplant`") from e
