"""How much memory a checkpoint's weights take at a dtype, and how much a device has free.

Both answers are read without loading anything: the weights' size from the safetensors headers of a local
checkpoint folder (shipped asset names resolve to one), the free memory from ``torch.cuda.mem_get_info`` on a GPU
or ``MemAvailable`` of ``/proc/meminfo`` on a CPU (Linux). Either is ``None`` where it cannot be known (a hub id
not downloaded yet, another OS); callers then skip their check rather than guess.
"""

from __future__ import annotations

from pathlib import Path

import torch

GIB = 1024 ** 3


def weights_nbytes(name_or_path: str | Path, dtype: torch.dtype | None = None) -> int | None:
    """Bytes of a checkpoint's tensors once loaded: floating-point tensors at ``dtype`` (their stored dtype when
    ``None``), others as stored; tensors stored under two names (tied weights in some exports) count once per name.

    Returns:
        ``None`` when ``name_or_path`` is not a local checkpoint folder.

    Raises:
        SurgeryError: a local folder whose safetensors files are missing or corrupt, or hold a dtype that cannot be
            loaded.
    """
    from surgery.checkpoint import CheckpointReader
    from surgery.loading import resolve
    from surgery.shards import tensor_nbytes

    folder = Path(resolve(str(name_or_path))).expanduser()
    if not folder.is_dir():
        return None
    reader = CheckpointReader(folder)  # headers only: validated, every tensor's dtype and shape
    total = 0
    for key in reader.keys:
        stored = reader.dtype(key)
        total += tensor_nbytes(dtype if dtype is not None and stored.is_floating_point else stored, reader.shape(key))
    return total


def free_memory(device: str | torch.device) -> int | None:
    """Bytes free on ``device`` now: the GPU's free memory, or the host's ``MemAvailable`` for a CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def module_nbytes(module: torch.nn.Module, off_device: str | torch.device | None = None) -> int:
    """Bytes of ``module``'s parameters and buffers (only those not yet on ``off_device``, when given)."""
    dev = torch.device(off_device) if off_device is not None else None
    total = 0
    for t in (*module.parameters(), *module.buffers()):
        if dev is None or t.device.type != dev.type:
            total += t.numel() * t.element_size()
    return total


def size_text(n: int) -> str:
    """``n`` bytes in GiB (MiB below one GiB) with one decimal, e.g. ``"2.5 GiB"``, ``"14.2 MiB"``."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"
