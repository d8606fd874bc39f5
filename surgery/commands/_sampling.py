"""Prompt and sampling options shared by `surgery generate` and `surgery ensemble` (not a command itself)."""

from __future__ import annotations


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
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        problems.append("--prompt is empty")
    return problems
