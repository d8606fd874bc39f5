"""Sharded safetensors written one tensor at a time (HF names, an index), in order or in parts.

:func:`write_streamed_shards` plans shards by size and writes them in order, one tensor in
flight. A writer that produces some tensors long before others (a transplant: the unchanged body
at once, the new embedding rows at the end) writes groups of shards with :func:`write_parts` under
provisional names, in any order, and :func:`name_shards` gives them their final
``model-0000i-of-0000N.safetensors`` names and writes the index.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from surgery.byte_copy import SourceBytes, copy_bytes, write_all
from surgery.checkpoint import INDEX_NAME, ST_NAMES
from surgery.errors import SurgeryError

Entry = tuple[str, torch.dtype, list[int]]  # (name, dtype, shape)


def tensor_nbytes(dt: torch.dtype, shape) -> int:
    """Bytes of a tensor of dtype ``dt`` and ``shape`` (its safetensors payload)."""
    return math.prod(shape) * torch.empty(0, dtype=dt).element_size()


def shard_plan(entries: list[Entry], max_shard_bytes: int) -> list[list[int]]:
    """Consecutive entries grouped into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, dt, shape) in enumerate(entries):
        n = tensor_nbytes(dt, shape)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return [s for s in shards if s]


def write_shard(path: Path, entries: list[Entry], produce, cancelled=None) -> dict[str, str]:
    """One safetensors file holding ``entries`` in order.

    Args:
        produce: ``produce(name) -> tensor`` (checked against the planned dtype and shape), or
            ``-> SourceBytes`` (:meth:`surgery.checkpoint.CheckpointReader.source`): stored bytes,
            copied file to file.
        cancelled: ``cancelled() -> bool``, asked between tensors (a writer in another thread stops early).

    Returns:
        ``{name: file name}`` of the tensors written.
    """
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for k, dt, shape in entries:
        n = tensor_nbytes(dt, shape)
        header[k] = {"dtype": ST_NAMES[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f:
        fd = f.fileno()
        write_all(fd, struct.pack("<Q", len(raw)) + raw)
        for k, dt, shape in entries:
            if cancelled is not None and cancelled():
                break
            n = tensor_nbytes(dt, shape)
            t = produce(k)
            if isinstance(t, SourceBytes):
                if t.nbytes != n:
                    raise SurgeryError(f"tensor {k!r} has {t.nbytes} stored bytes, planned {n}",
                                       "this is a bug; please report it")
                copy_bytes(t, fd)
            else:
                if t.dtype != dt or list(t.shape) != list(shape):
                    raise SurgeryError(f"tensor {k!r} came out {t.dtype} {list(t.shape)}, planned {dt} {shape}",
                                       "this is a bug; please report it")
                t = t.detach().to("cpu").contiguous()
                if t.numel():
                    write_all(fd, t.view(torch.uint8).reshape(-1).numpy())
            del t
    return {k: path.name for k, _, _ in entries}


def name_shards(folder: Path, files: list[Path], tensors: dict[str, list[Entry]]) -> dict:
    """Rename ``files`` (in order) to ``model-0000i-of-0000N.safetensors`` and write the index.

    Args:
        tensors: ``{provisional file name: its entries}``.

    Returns:
        The index dict written.
    """
    weight_map, total = {}, 0
    for i, path in enumerate(files, 1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        for k, dt, shape in tensors[path.name]:
            weight_map[k] = name
            total += tensor_nbytes(dt, shape)
        os.replace(path, folder / name)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def write_parts(entries: list[Entry], produce, folder: Path, plan: list[list[int]], prefix: str,
                cancelled=None) -> tuple[list[Path], dict[str, list[Entry]]]:
    """Write the shards of ``plan`` (lists of indices into ``entries``) under provisional names
    ``.PREFIX-0000s.safetensors`` (:func:`write_shard`; ``cancelled`` is asked between shards too).

    Returns:
        ``(files, {file name: entries})`` for :func:`name_shards`.
    """
    files, tensors = [], {}
    for s, idxs in enumerate(plan, 1):
        if cancelled is not None and cancelled():
            break
        part = [entries[i] for i in idxs]
        path = folder / f".{prefix}-{s:05d}.safetensors"
        write_shard(path, part, produce, cancelled)
        files.append(path)
        tensors[path.name] = part
    return files, tensors


def write_streamed_shards(entries: list[Entry], produce, folder: Path, max_shard_bytes: int = 5 * 1000**3,
                          groups: list[list[int]] | None = None) -> dict:
    """Write tensors one at a time into HF-named shards plus ``model.safetensors.index.json``.

    Args:
        entries: ``(name, dtype, shape)`` of every output tensor, in output order.
        produce: as for :func:`write_shard`, called once per tensor, in order (one tensor in flight).
        max_shard_bytes: shard size limit (a single larger tensor gets a shard of its own).
        groups: explicit shards (lists of indices into ``entries``) instead of the size limit.

    Returns:
        The index dict written.
    """
    if len({k for k, _, _ in entries}) != len(entries):
        raise SurgeryError("duplicate tensor names in a checkpoint write", "this is a bug; please report it")
    plan = groups if groups is not None else shard_plan(entries, max_shard_bytes)
    return name_shards(folder, *write_parts(entries, produce, folder, plan, "part"))
