"""The unchanged body of a streamed transplant, written while the new rows are computed.

Every tensor but the input embedding and the output head passes through a transplant
unchanged. :class:`BodyWriter` writes them into their shards in a background thread from the
start, while the vocabularies, the init method and the calibration forward run. The stored bytes
go file to file (:mod:`surgery.byte_copy`: ``os.copy_file_range``): with logit offsets the
calibration forward reads (and checks) every decoder layer anyway, so the writer copies without
reading and :meth:`BodyWriter.finish` reads and checks whatever the forward did not; without
offsets the writer checks each tensor through the memory map first, then copies its bytes. Writing
the mapped tensor instead (``write`` from the map) makes the kernel fault the source pages in one by
one: a ``mean`` transplant of a 6.4 GB checkpoint took 14.1-19.3 s that way against 11.9-14.2 s
(``kind: ab`` in ``benchmarks/results/scale.jsonl``). Only a dtype conversion
writes converted tensors from memory. Either way no tensor reaches a finished output unchecked, and
the output folder stays temporary until everything succeeded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from surgery.shards import Entry, shard_plan, write_parts
from surgery.transplant.rows import BackgroundCall

LOG = logging.getLogger(__name__)


class BodyWriter:
    """Write ``entries`` (the body, in input order) as shards of ``folder`` in a background thread.

    Args:
        reader: the :class:`~surgery.checkpoint.CheckpointReader` of the input.
        entries: ``(name, dtype, shape)`` of the body tensors (in their output dtype).
        convert: dtype floating-point tensors are converted to, or ``None``.
        copy_unread: copy stored bytes without reading them (someone else reads and checks them).
    """

    def __init__(self, reader, entries: list[Entry], folder: Path, max_shard_bytes: int,
                 convert: torch.dtype | None = None, copy_unread: bool = False):
        self.reader, self.entries, self.folder, self.convert = reader, entries, Path(folder), convert
        self.copy_unread = copy_unread and convert is None
        self._stop = threading.Event()
        plan = shard_plan(entries, max_shard_bytes)
        self._call = BackgroundCall(lambda: write_parts(entries, self._produce, self.folder, plan, "body",
                                                        self._stop.is_set), name="body-writer")

    def _produce(self, k: str):
        if self.convert is None:
            if not self.copy_unread:
                self.reader.get(k, mapped=True)  # read through the map and checked, then copied file to file
            return self.reader.source(k, checked=not self.copy_unread)
        t = self.reader.get(k, mapped=True)  # checked and converted, then dropped: no read copy
        return t.to(self.convert) if t.is_floating_point() else t

    def finish(self) -> tuple[list[Path], dict[str, list[Entry]]]:
        """Wait for the writer, then read and check every body tensor nobody checked.

        Returns:
            ``(files, {file name: entries})`` for :func:`surgery.shards.name_shards`.

        Raises:
            SurgeryError: a truncated input or a tensor with NaN/inf values.
        """
        written = self._call.result()
        unread = [k for k, _, _ in self.entries if k not in self.reader.checked]
        if unread and self.copy_unread:
            LOG.info("checking %d body tensors the calibration forward did not read", len(unread))
        for k in unread:
            self.reader.get(k, mapped=True)
        return written

    def cancel(self) -> None:
        """Stop after the tensor in flight and wait (the caller is failing; its errors win)."""
        self._stop.set()
        try:
            self._call.result()
        except BaseException:  # noqa: BLE001 - the caller's error is the one to report
            pass
