"""Tensor bytes copied file to file, without passing through Python.

A transplant passes every body tensor through unchanged. Once a tensor has been read and
checked (the calibration forward reads every decoder layer), its bytes go from the input
shard to the output shard with ``os.copy_file_range``: the kernel copies page to page (or
shares blocks on file systems with reflinks), where reading into a buffer and writing it
back copies every byte twice through user memory. Where the kernel cannot (another file
system, an old kernel), the copy falls back to plain reads and writes in chunks.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import SurgeryError

_CHUNK = 64 * 1024**2
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


@dataclass(frozen=True)
class SourceBytes:
    """``nbytes`` bytes at ``offset`` of the file ``path``: one stored tensor, already checked."""

    path: Path
    offset: int
    nbytes: int
    name: str = ""


def write_all(fd: int, data) -> None:
    """Write every byte of ``data`` (bytes-like) to the file descriptor ``fd`` (``os.write`` may write less)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:done + (1 << 30)])


def copy_bytes(src: SourceBytes, fd: int) -> None:
    """Append ``src``'s bytes at the current position of ``fd``.

    Raises:
        SurgeryError: the source file ends before the range does (truncated since it was opened).
    """
    with open(src.path, "rb", buffering=0) as f:
        left, pos = src.nbytes, src.offset
        kernel = hasattr(os, "copy_file_range")
        while left:
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(f.fileno(), fd, min(left, 1 << 30), pos)
                except OSError as e:
                    if e.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel = False
                    continue
            else:
                os.lseek(f.fileno(), pos, os.SEEK_SET)
                chunk = f.read(min(left, _CHUNK))
                n = len(chunk)
                if n:
                    write_all(fd, chunk)
            if n == 0:
                raise SurgeryError(f"weights file {str(src.path)!r} is truncated (tensor {src.name!r})",
                                   "re-download or re-create the checkpoint")
            left -= n
            pos += n
