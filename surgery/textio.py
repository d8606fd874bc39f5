"""Reading user text files with clear errors (missing, empty, not UTF-8)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from surgery.errors import SurgeryError


def read_text(path: str | Path) -> str:
    """Read one UTF-8 text file.

    Raises:
        SurgeryError: the file is missing, a directory, empty, or not valid UTF-8.
    """
    p = Path(path)
    if not p.exists():
        raise SurgeryError(f"text file {str(p)!r} does not exist", "check the path passed to --text")
    if p.is_dir():
        raise SurgeryError(f"text path {str(p)!r} is a directory, not a file", "pass one or more text files")
    data = p.read_bytes()
    if not data.strip():
        raise SurgeryError(f"text file {str(p)!r} is empty", "pass a file with some text in it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SurgeryError(
            f"text file {str(p)!r} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r})",
            "convert it to UTF-8, e.g. `iconv -f latin1 -t utf-8`",
        ) from e


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Read several UTF-8 text files; at least one is required."""
    paths = list(paths)
    if not paths:
        raise SurgeryError("no text files given", "pass --text FILE")
    return [read_text(p) for p in paths]
