"""The one training loop: heal and distill are configurations of it (their data, loss and policy).

A step: the spent fraction of the budget (:func:`~distill.trainer.schedule.budget_fraction`; the run ends
at 1) goes to the learning-rate schedule and to the task when it asks for it; for each gradient-accumulation
micro-batch the task's batch is prepared by the policy (row-sparse leaves), its loss computed, checked for NaN/Inf
on every rank (a non-finite loss stops the run before the update, keeping the last checkpoint), and
back-propagated (without the DDP/FSDP gradient sync except on the last micro-batch); then one joint
clip and the optimizer steps. Metrics go to a callback; evaluation and checkpoints every N steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from distill import distributed as dd
from distill.trainer.schedule import budget_fraction, lr_factor
from distill.trainer.state import NonFiniteError, check_finite

LOG = logging.getLogger(__name__)


class Task(Protocol):
    """What a run trains on: batches and their loss."""

    def micro_batches(self, step: int) -> list:  # this rank's micro-batches of optimizer step ``step``
        ...

    def loss(self, model, batch, autocast) -> tuple[torch.Tensor, dict]:  # (scalar loss, metrics)
        ...

    def step_metrics(self) -> dict:  # extra fields of a step's metrics record (tokens, position)
        ...

    # optional: token_ids(batch) -> (B, L) student ids, when a batch is not itself a tensor of ids (row-sparse
    # policies gather the rows of these ids before the forward pass)
    # optional: set_budget_fraction(spent) -> None, called before each step's micro_batches with the spent fraction
    # of the budget in [0, 1) (a task that changes its loss along the run, e.g. a teacher for the first part only)


@dataclass(frozen=True)
class LoopSpec:
    """Budget, schedule and cadence of a run."""

    steps: int | None = None
    seconds: float | None = None
    warmup: int = 0
    scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    accum: int = 1
    eval_every: int = 0
    checkpoint_every: int = 0
    strategy: str = "ddp"
    progress: bool = True
    desc: str = "train"
    nonfinite_hint: str = "lower the learning rate, or check the inputs for NaN/Inf values"


def use_bf16(mode: str, device: torch.device) -> bool:
    """bf16 autocast: on request (``bf16``), or with ``auto`` on a CUDA device that supports bf16.

    Not on CPU by default, because the faster precision there depends on the chip: with an early
    trainer on a 2-core AMX Xeon, bf16 steps took 32-65 s against 20-40 s in float32 (the casts of
    the large embedding/head matrices cost more than they saved); with the current trainer on a
    2-core AVX512-BF16 AMD EPYC, an all-parameter heal step of SmolLM2-135M with a 128k head
    (512 tokens) took 2.99 s against 4.89 s in float32: 97 steps in five minutes against 62 (README, "Healing
    with the base model as teacher"). ``--autocast bf16`` asks for it. Any other mode (``off``,
    ``fp32``) is float32.
    """
    if mode == "bf16":
        return True
    return mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def autocast_factory(device: torch.device, bf16: bool) -> Callable[[], torch.autocast]:
    """The ``autocast`` argument of :func:`fit`: a fresh bf16 (or disabled) autocast context per call."""

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    return autocast


def _finite_everywhere(loss: torch.Tensor, env) -> torch.Tensor:
    """The loss, or NaN when it is non-finite on any rank (so every rank stops together)."""
    if not env.distributed:
        return loss
    bad = dd.all_reduce_mean(env, (~torch.isfinite(loss.detach())).double().reshape(1))
    return loss if float(bad) == 0 else torch.full_like(loss, float("nan"))


def fit(model, task: Task, policy, spec: LoopSpec, env, step: int = 0, elapsed: float = 0.0,
        log: Callable[[dict], None] | None = None, evaluate: Callable[[int], None] | None = None,
        checkpoint: Callable[[int, float], None] | None = None, autocast=None) -> tuple[int, float]:
    """Train ``model`` from ``step`` until the budget is spent.

    Args:
        model: the (possibly wrapped) model being trained.
        task: batches and loss.
        policy: a :class:`~distill.trainer.policy.Policy` already attached to ``model``.
        spec: budget and cadence.
        env: the :class:`~distill.distributed.DistEnv`.
        step, elapsed: where a resumed run starts (steps done, seconds trained).
        log: receives one metrics record per step.
        evaluate: called with the step every ``spec.eval_every`` steps (not at the last one).
        checkpoint: called with ``(step, elapsed)`` every ``spec.checkpoint_every`` steps (not at the last one).
        autocast: a context-manager factory around forward passes.

    Returns:
        ``(steps done, seconds trained)``.

    Raises:
        NonFiniteError: the loss became NaN/Inf (nothing of that step was applied).
    """
    t_run = time.time() - elapsed
    token_ids = getattr(task, "token_ids", None)  # the student's (B, L) ids of a batch, for row-sparse policies
    set_budget_fraction = getattr(task, "set_budget_fraction", None)
    bar = tqdm(total=spec.steps, initial=step, desc=spec.desc, disable=not (spec.progress and env.is_main), leave=False)

    def spent() -> float:
        return budget_fraction(step, time.time() - t_run, spec.steps, spec.seconds)

    def done() -> bool:
        return spent() >= 1.0

    try:
        while (frac := spent()) < 1.0:
            # a step budget's decay runs over steps after warm-up; ``frac`` is read only for a time budget
            lr = policy.set_lr(lr_factor(step, spec.warmup, spec.steps, spec.scheduler, spec.min_lr_ratio, frac))
            if set_budget_fraction is not None:
                set_budget_fraction(frac)
            t0 = time.time()
            loss_sum, agg = 0.0, {}
            batches = task.micro_batches(step)
            for m, batch in enumerate(batches):
                policy.prepare(token_ids(batch) if token_ids is not None else batch)
                last = m == len(batches) - 1
                with dd.no_grad_sync(model, env, spec.strategy, skip=not last):
                    loss, mets = task.loss(model, batch, autocast)
                    check_finite(_finite_everywhere(loss, env), step, spec.nonfinite_hint)
                    if loss.requires_grad:
                        (loss / len(batches)).backward()
                loss_sum += float(loss.detach()) / len(batches)
                for k, v in mets.items():
                    agg[k] = agg.get(k, 0.0) + float(v) / len(batches)
            gnorm = policy.clip_and_step(spec.grad_clip)
            step += 1
            keys = sorted(agg)
            red = dd.all_reduce_mean(env, torch.tensor([loss_sum] + [agg[k] for k in keys], dtype=torch.float64,
                                                       device=env.device)).tolist()
            rec = {"event": "train", "step": step, "loss": red[0], **{k: round(v, 6) for k, v in zip(keys, red[1:])},
                   "lr": lr, "grad_norm": gnorm, **task.step_metrics(), **policy.metrics(),
                   "step_s": round(time.time() - t0, 3), "elapsed_s": round(time.time() - t_run, 1)}
            if log is not None:
                log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            bar.update(1)
            if evaluate is not None and spec.eval_every and step % spec.eval_every == 0 and not done():
                evaluate(step)
            if checkpoint is not None and spec.checkpoint_every and step % spec.checkpoint_every == 0 and not done():
                checkpoint(step, time.time() - t_run)
    finally:
        bar.close()
    return step, time.time() - t_run


__all__ = ["LoopSpec", "NonFiniteError", "Task", "autocast_factory", "fit", "use_bf16"]
