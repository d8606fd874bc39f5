"""Options shared by the commands that sample or combine models (`generate`, `ensemble`, `lm-eval`; not a command)."""

from __future__ import annotations

import math


def add_sampling_arguments(p) -> None:
    """``--prompt --max-bytes --temperature --top-p --seed --device --trust-remote-code``."""
    p.add_argument("--prompt", required=True, help="text to continue (may end mid-word)")
    p.add_argument("--max-bytes", type=int, default=200, help="stop after this many bytes (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def sampling_problems(args) -> list[str]:
    """Every problem with the options of :func:`add_sampling_arguments` (empty when all are valid)."""
    problems = []
    if args.max_bytes < 1:
        problems.append(f"--max-bytes must be >= 1, got {args.max_bytes}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        problems.append(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:  # also false for NaN
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        problems.append(f"--seed must be in [0, 2**63), got {args.seed}")
    if not args.prompt:
        problems.append("--prompt is empty")
    return problems


def add_member_arguments(p) -> None:
    """``--model`` (repeated) ``--weight`` (repeated) ``--mode``: the members of an ensemble and how they combine."""
    from surgery.bytelevel.ensemble import ENSEMBLE_MODES

    p.add_argument("--model", action="append", required=True,
                   help="a model (repeat for an ensemble: --model A --model B); asset name, folder or hub id")
    p.add_argument("--weight", type=float, action="append", default=None,
                   help="weight of each --model in order (repeat; default uniform)")
    p.add_argument("--mode", choices=sorted(ENSEMBLE_MODES), default="mix",
                   help="how an ensemble combines (default mix)")


def member_problems(args) -> list[str]:
    """Every problem with the options of :func:`add_member_arguments` (empty when all are valid)."""
    problems = []
    if args.weight is not None:
        if len(args.weight) != len(args.model):
            problems.append(f"{len(args.weight)} --weight values for {len(args.model)} --model values")
        if not all(math.isfinite(w) and w > 0 for w in args.weight):
            problems.append(f"every --weight must be a finite number > 0, got {args.weight}")
    return problems
