"""The one training backbone: parameter policies, losses, schedule, resume, metrics; heal and distill on it.

- :mod:`distill.trainer.loop` — the loop (:func:`fit`): schedule, accumulation, DDP/FSDP sync, NaN guard.
- :mod:`distill.trainer.policy` / :mod:`distill.trainer.rows` — what is trained: new rows (row-sparse, lazy
  per-row Adam), head, LoRA, all parameters.
- :mod:`distill.trainer.checkpoint`, :mod:`distill.trainer.state`, :mod:`distill.trainer.metrics` — resumable
  state, RNGs, metrics JSONL and plot.
- :mod:`distill.trainer.distill_run` (+ :mod:`~distill.trainer.distill_task`) — ``surgery distill``.
- :mod:`distill.trainer.heal_run` — ``surgery heal``.
"""

from distill.trainer.checkpoint import checkpoint_dirs
from distill.trainer.distill_run import RunResult, train
from distill.trainer.distill_task import micro_loss, teacher_is_coarser
from distill.trainer.heal_run import heal
from distill.trainer.loop import LoopSpec, fit
from distill.trainer.metrics import plot_metrics
from distill.trainer.policy import LoraSpec, ParamSpec, Policy
from distill.trainer.state import NonFiniteError

__all__ = ["LoopSpec", "LoraSpec", "NonFiniteError", "ParamSpec", "Policy", "RunResult", "checkpoint_dirs", "fit",
           "heal", "micro_loss", "plot_metrics", "teacher_is_coarser", "train"]
