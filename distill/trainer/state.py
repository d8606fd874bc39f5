"""RNG states, seeding, atomic writes and the non-finite guard shared by every run."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from surgery.errors import SurgeryError


class NonFiniteError(SurgeryError):
    """A loss or logits became NaN/Inf; the run stops and its last good resumable state is kept."""


def check_finite(loss: torch.Tensor, step: int, hint: str) -> None:
    """Raise :class:`NonFiniteError` when ``loss`` (a scalar) is NaN or infinite.

    A non-finite loss is also how non-finite logits show (the softmax of a NaN logit is NaN).
    """
    if not bool(torch.isfinite(loss.detach())):
        raise NonFiniteError(f"the training loss became {float(loss.detach())} at step {step + 1}; stopped before "
                             "applying it (the last resumable state is kept)", hint)


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, Python, CUDA) in types ``torch.load(weights_only=True)`` reads:
    tensors, numbers, strings, tuples."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(),
          "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary sibling, then rename: a kill leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
