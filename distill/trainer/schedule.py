"""The schedule of every run: how much of its budget is spent, and the learning rate along it.

:func:`budget_fraction` is the one measure of a run's progress (the loop ends the run when it reaches 1, and a
task may switch something on or off along it); :func:`lr_factor` is linear warm-up, then constant, linear or
cosine decay. The factor multiplies each parameter group's base learning rate. The decay runs over the step
budget, or, for a wall-clock budget, over the elapsed fraction of it.
"""

from __future__ import annotations

import math


def budget_fraction(step: int, seconds: float, steps: int | None, budget_s: float | None) -> float:
    """The spent fraction of a run's budget before optimizer step ``step`` (0-based): ``step / steps`` for a step
    budget, ``seconds / budget_s`` for a wall-clock one, the larger where both bound the run. The run is over
    when it is >= 1.

    Args:
        step: steps done so far.
        seconds: seconds trained so far.
        steps: the step budget, or None.
        budget_s: the time budget in seconds, or None.
    """
    spent = 0.0
    if steps is not None:
        spent = max(spent, step / steps if steps > 0 else 1.0)
    if budget_s is not None:
        spent = max(spent, seconds / budget_s)
    return spent


def lr_factor(step: int, warmup: int, total: int | None, scheduler: str = "cosine", min_ratio: float = 0.1,
              time_frac: float | None = None) -> float:
    """Factor of the base learning rate at optimizer step ``step`` (0-based).

    Args:
        step: steps done so far.
        warmup: linear warm-up steps (``(step + 1) / warmup`` during them).
        total: the step budget, or None for a time budget.
        scheduler: ``constant`` | ``linear`` | ``cosine``.
        min_ratio: the final factor of ``linear`` and ``cosine``.
        time_frac: the elapsed fraction of a time budget (used when ``total`` is None).
    """
    if warmup and step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    if total:
        frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    elif time_frac is not None:
        frac = min(1.0, max(0.0, time_frac))
    else:
        return 1.0
    if scheduler == "linear":
        return 1.0 - (1.0 - min_ratio) * frac
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
