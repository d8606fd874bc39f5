"""Small file-system facts shared by the checkpoint, alignment and asset writers."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


def check_safetensors_complete(path: str | Path) -> None:
    """Check that a safetensors file's header is readable and its data section is all there.

    Raises:
        ValueError: the file is shorter than its header says, or the header is not JSON
            (``json.JSONDecodeError`` is a ``ValueError``); ``KeyError`` / ``TypeError`` for
            a header of the wrong shape.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(n))
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"data section needs {8 + n + end} bytes, file has {size}")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
