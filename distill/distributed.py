"""torch.distributed plumbing: the same entry point runs alone or under ``torchrun --nproc_per_node N``.

Under torchrun (``WORLD_SIZE > 1``) the process group is initialized with NCCL
on GPUs and gloo on CPU; the student is wrapped in DDP (replicated) or FSDP
(``fully_shard`` per decoder layer, for students that do not fit one device).
Teachers are not wrapped: each rank holds a frozen copy (or reads the cache).
Each rank takes its own slice of every global batch (see the trainer).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_pref: str = "auto", backend: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun, join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref == "cuda" and not torch.cuda.is_available():
        from surgery.errors import SurgeryError

        raise SurgeryError("train.device=cuda but no CUDA device is visible", "use train.device=auto or cpu")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=be, device_id=device if use_cuda else None)
        LOG.info("rank %d/%d joined the %s process group on %s", rank, world, be, device)
    return DistEnv(rank, world, local, device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_gather_object(env: DistEnv, obj):
    if not env.distributed:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(env: DistEnv, x: torch.Tensor) -> torch.Tensor:
    if not env.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / env.world_size


def _decoder_layers(model) -> list[torch.nn.Module]:
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def wrap(model: torch.nn.Module, env: DistEnv, strategy: str) -> torch.nn.Module:
    """DDP or FSDP wrapper when distributed; the model itself otherwise."""
    if not env.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) \
        else model


@contextlib.contextmanager
def no_grad_sync(model: torch.nn.Module, env: DistEnv, strategy: str, skip: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (``skip=True``)."""
    if not env.distributed or not skip:
        yield
        return
    if strategy == "fsdp":
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    with model.no_sync():
        yield


def full_state(model: torch.nn.Module, optimizer, env: DistEnv, strategy: str, trainable_only: bool = True):
    """Full (unsharded, CPU) trainable-parameter and optimizer state dicts, keyed by parameter name.

    Every rank must call this under FSDP (it gathers); the result is meant for rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, optimizer, options=opts)
    if trainable_only:
        names = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in names}
    return msd, osd


def load_full_state(model: torch.nn.Module, optimizer, msd: dict, osd: dict | None) -> None:
    """Load state produced by :func:`full_state` (on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd or {}, options=opts)
