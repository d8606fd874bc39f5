"""Parameter policies: what a run trains and how it is updated.

- ``new-rows``: embedding/head rows in a trainable mask, row-sparse with a lazy per-row Adam
  (:class:`~distill.trainer.rows.RowSparse`); everything else frozen.
- ``head``: the output head only (dense AdamW; with ``rows``, only the head rows of the mask, row-sparse,
  and the body runs forward only).
- ``lora``: LoRA adapters (peft) on the linear layers of the body, dense AdamW (optionally with the rows).
- ``all``: every parameter, dense AdamW.

The dense part's optimizer is created after the model is wrapped for DDP/FSDP (:meth:`Policy.attach`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from distill.trainer.rows import RowSparse
from surgery.errors import SurgeryError

HEAD_NAMES = ("lm_head", "embed_out", "output")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: every linear layer of the body
    seed: int | None = None  # seeds the adapter init


@dataclass(frozen=True)
class ParamSpec:
    """A parameter policy.

    Attributes:
        dense: ``none`` | ``head`` | ``lora`` | ``all``: the densely trained parameters (AdamW).
        rows: ``(V,)`` bool trainable rows of the embedding/head trained row-sparse, or None.
        input_rows: row-sparse input rows too (False: head rows only; the body runs forward only).
        negatives: row-sparse: also the head rows the batch's softmax favours most.
        row_lr: base learning rate of the rows.
        lr, betas, weight_decay: the dense AdamW.
        lora: adapters for ``dense="lora"``.
    """

    dense: str = "all"
    rows: np.ndarray | None = None
    input_rows: bool = True
    negatives: int = 0
    row_lr: float = 2e-3
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    lora: LoraSpec = field(default_factory=LoraSpec)


def add_lora(model, spec: LoraSpec):
    """``model`` wrapped by peft with LoRA adapters on ``spec.target_modules`` (default: every body linear)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise SurgeryError("LoRA needs the peft package", "pip install peft") from e
    present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    if spec.target_modules is None:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
                       - set(HEAD_NAMES))
    else:
        names = list(spec.target_modules)
        missing = [m for m in names if m not in present]
        if missing:
            raise SurgeryError(f"LoRA target modules {missing} are not modules of this model",
                               f"choose among e.g. {', '.join(sorted(x for x in present if 'proj' in x)[:8])}")
    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=names, bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _row_norms(g: torch.Tensor) -> torch.Tensor:
    """``(R,)`` float32 L2 norms of the rows of ``g`` along dim 0 (of a 1-D tensor: its absolute values)."""
    if g.numel() == 0:  # e.g. a rank's FSDP shard of a tensor with fewer rows than ranks
        return torch.zeros(0, device=g.device)
    rows = g.detach().reshape(g.shape[0], -1) if g.dim() > 0 else g.detach().reshape(1, 1)
    return torch.linalg.vector_norm(rows.float(), dim=-1)


def grad_norm(grads: list[torch.Tensor]) -> float:
    """The global L2 norm of ``grads``, the same however the tensors are split over processes.

    A float32 norm of a whole ``(V, d)`` gradient (``torch.nn.utils.clip_grad_norm_``) adds V·d squares into
    one float32 sum: once a large row is in it, the squares of the tiny softmax entries of every other row fall
    below its rounding step and are dropped. For the tiny distillation student (a 49k × 32 tied embedding) the
    norm came out 3.0e-4 low, and under FSDP, whose row shards each start a fresh sum, 1.8e-4 apart from one
    process with bitwise equal gradients. Here each row's norm is taken in float32 (a short sum; under FSDP's
    dim-0 shards the row is whole on one rank, so it is the same number) and the squares of the rows are added
    in float64; sharded tensors (DTensor, ``Shard(0)``) are summed locally and all-reduced once.

    Args:
        grads: gradients, plain (replicated: each rank holds all of it) or FSDP-sharded DTensors.

    Returns:
        the norm (every rank gets the same value).
    """
    from torch.distributed.tensor import DTensor, Shard

    if not grads:
        return 0.0
    whole = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    sharded, mesh = None, None
    for g in grads:
        if isinstance(g, DTensor) and g.device_mesh.ndim == 1 and g.placements == (Shard(0),):
            part = _row_norms(g.to_local()).double().square().sum()
            sharded = part if sharded is None else sharded + part.to(sharded.device)
            mesh = g.device_mesh
        else:
            g = g.full_tensor() if isinstance(g, DTensor) else g
            whole = whole + _row_norms(g).double().square().sum().to(whole.device)
    total = float(whole)
    if sharded is not None:
        import torch.distributed as dist

        dist.all_reduce(sharded, group=mesh.get_group())
        total += float(sharded)
    return total ** 0.5


class Policy:
    """A :class:`ParamSpec` applied to a model: selects, steps, saves and finishes the trained parameters."""

    def __init__(self, model, spec: ParamSpec):
        self.spec = spec
        if spec.dense == "lora":
            model = add_lora(model, spec.lora)
        for p in model.parameters():
            p.requires_grad_(False)
        if spec.dense == "all":
            for p in model.parameters():
                p.requires_grad_(True)
        elif spec.dense == "head":
            head = model.get_output_embeddings()
            if head is None:
                raise SurgeryError("this model has no output head to train", "train all parameters instead")
            head.weight.requires_grad_(True)
        elif spec.dense == "lora":
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
        elif spec.dense != "none":
            raise ValueError(f"unknown dense policy {spec.dense!r}")
        self.model = model
        self.rows = RowSparse(model, spec.rows, spec.input_rows, spec.negatives) if spec.rows is not None else None
        self.optimizer = None
        self.params: list[torch.Tensor] = []
        self.row_lr = spec.row_lr

    @property
    def needs_body_grad(self) -> bool:
        return self.spec.dense in ("lora", "all") or (self.rows is not None and self.spec.input_rows)

    def attach(self, wrapped) -> None:
        """Create the dense optimizer over the (possibly DDP/FSDP-wrapped) model's trainable parameters."""
        self.params = [p for p in wrapped.parameters() if p.requires_grad]
        if self.params:
            # the fused kernel: ~3x faster steps than the per-tensor loop on CPU (measured, 267M parameters); also
            # on FSDP's sharded parameters, whose update must be bitwise that of one process (the per-tensor loop
            # rounds differently: tests/distill/test_trainer.py)
            from torch.distributed.tensor import DTensor

            fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                        and (type(p) is torch.nn.Parameter or isinstance(p, DTensor)) for p in self.params)
            self.optimizer = torch.optim.AdamW(self.params, lr=self.spec.lr, betas=self.spec.betas,
                                               weight_decay=self.spec.weight_decay, fused=fused or None)

    def set_lr(self, factor: float) -> float:
        """Scale every base learning rate by ``factor``; returns the main one (rows, else dense)."""
        self.row_lr = self.spec.row_lr * factor
        if self.optimizer is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = self.spec.lr * factor
        return self.row_lr if self.rows is not None else self.spec.lr * factor

    def prepare(self, batch) -> None:
        if self.rows is not None:
            self.rows.prepare(batch)

    def has_trainable(self) -> bool:
        return bool(self.params) or (self.rows is not None and bool(self.rows.leaves()))

    def clip(self, grad_clip: float) -> float:
        """Scale all gradients jointly to norm ``grad_clip`` when above it (0 = off, the factor of
        ``torch.nn.utils.clip_grad_norm_``); returns the norm before (:func:`grad_norm`)."""
        tensors = (self.rows.leaves() if self.rows is not None else []) + self.params
        grads = [t.grad for t in tensors if t.grad is not None]
        norm = grad_norm(grads)
        if grad_clip > 0 and norm > grad_clip:
            coef = grad_clip / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        return norm

    def clip_and_step(self, grad_clip: float) -> float:
        """:meth:`clip`, apply every optimizer, clear gradients; returns the norm before clipping."""
        norm = self.clip(grad_clip)
        if self.rows is not None:
            self.rows.step(self.row_lr)
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def metrics(self) -> dict:
        return {"rows": self.rows.n_rows} if self.rows is not None else {}

    def rows_state(self) -> dict | None:
        return self.rows.state_dict() if self.rows is not None else None

    def load_rows_state(self, st: dict | None) -> None:
        if (st is None) != (self.rows is None):
            raise SurgeryError("saved state has a different parameter policy (row-sparse or not)",
                               "resume with the same settings")
        if self.rows is not None:
            self.rows.load_state_dict(st)

    def finish(self, unwrapped, merge: bool = True):
        """Remove hooks, merge LoRA (``merge``), freeze everything; returns the model to save."""
        if self.rows is not None:
            self.rows.remove()
        m = unwrapped
        if self.spec.dense == "lora" and merge:
            m = m.merge_and_unload()
        for p in m.parameters():
            p.requires_grad_(False)
        return m
