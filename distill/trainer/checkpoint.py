"""Resumable state of a run: ``<run>/checkpoints/step-NNNNNN/`` written atomically.

Each checkpoint folder holds ``trainable.safetensors`` (the densely trained parameters, full and on CPU
even under FSDP), ``trainer_state.pt`` (step, dense optimizer, row-sparse rows with their Adam state, the
RNG state of every rank, the data position and whatever the run adds) and, when given, ``config.yaml``.
A process killed at any moment leaves the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from distill import distributed as dd
from distill.trainer.state import rng_state, set_rng_state
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    d = Path(run_dir) / "checkpoints"
    return sorted(p for p in d.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").exists()) if d.exists() else []


def save_state(run_dir: Path, step: int, model, policy, env, strategy: str, extra: dict, keep: int,
               config_yaml: str | None = None) -> None:
    """Write checkpoint ``step`` (every rank calls this; rank 0 writes) and keep the newest ``keep``."""
    from safetensors.torch import save_file

    from surgery.checkpoint import atomic_output_dir

    if policy.optimizer is not None:
        msd, osd = dd.full_state(model, policy.optimizer, env, strategy)
    else:
        msd, osd = {}, None
    rngs = dd.all_gather_object(env, rng_state())
    if env.is_main:
        target = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
        with atomic_output_dir(target, overwrite=True) as tmp:
            save_file({k: v.contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"),
                      metadata={"format": "pt"})
            torch.save({"step": step, "optimizer": osd, "rows": policy.rows_state(), "rng": rngs,
                        "world_size": env.world_size, **extra}, tmp / "trainer_state.pt")
            if config_yaml is not None:
                (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        LOG.info("checkpoint step %d written", step)
    dd.barrier(env)


def read_state(path: Path) -> dict:
    """The trainer state of checkpoint ``path``, read as plain data (``weights_only=True``: a pickle of anything
    but tensors, numbers, strings and containers is refused, never run).

    Raises:
        SurgeryError: the file is missing, truncated, foreign or not plain data.
    """
    try:
        return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: Exception) -> SurgeryError:
    return SurgeryError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__})",
                        "delete that checkpoint folder to resume from an earlier one, or start over")


def load_state(path: Path, model, policy, env, state: dict | None = None) -> dict:
    """Load a checkpoint into ``model`` / ``policy`` and this rank's RNGs; returns the trainer state dict
    (``state``: the one :func:`read_state` already read)."""
    from safetensors.torch import load_file

    st = state if state is not None else read_state(path)
    try:
        msd = load_file(str(path / "trainable.safetensors"))
    except Exception as e:
        raise _unreadable(path, e) from e
    if st.get("world_size", 1) != env.world_size:
        raise SurgeryError(f"checkpoint {str(path)!r} was written with {st['world_size']} processes, now "
                           f"{env.world_size}", "resume with the same --nproc_per_node")
    if policy.optimizer is not None:
        dd.load_full_state(model, policy.optimizer, msd, st["optimizer"])
    policy.load_rows_state(st.get("rows"))
    set_rng_state(st["rng"][env.rank])
    return st
