"""`surgery lm-eval`: lm-evaluation-harness tasks on a byte-level LM or a cross-vocabulary ensemble."""

from __future__ import annotations

from pathlib import Path

from surgery.commands._sampling import add_member_arguments, member_problems

NAME = "lm-eval"
HELP = "run lm-evaluation-harness tasks on a model or an ensemble of models with different vocabularies"
DESCRIPTION = (
    "Wrap one model (or several: a byte-level ensemble, mix or product) as an lm-evaluation-harness model and run "
    "tasks with it. Byte level by default: every request is scored on the bytes of its text, so models with "
    "different tokenizers answer the same question. --token-level scores tokens instead (one plain model, or the "
    "approximate token-level ensemble in the first model's vocabulary). Offline, tasks come from YAML files in "
    "--include-path (e.g. artifacts/tasks/nextsent). Needs the `eval` extra (pip install -e '.[eval]')."
)


def add_arguments(p):
    add_member_arguments(p)
    p.add_argument("--token-level", action="store_true",
                   help="score tokens (one model, or the approximate token-level ensemble) instead of bytes")
    p.add_argument("--byte-mode", choices=["canonical", "exact"], default="canonical",
                   help="byte-level conversion of each model (default canonical)")
    p.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    p.add_argument("--include-path", default=None, help="folder of extra task YAML files")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--batch-size", type=int, default=8, help="token level: requests per forward pass (default 8)")
    p.add_argument("--no-greedy", action="store_true",
                   help="byte level: skip the exact is_greedy check (faster; is_greedy is then always false)")
    p.add_argument("--seed", type=int, default=0, help="seed of lm-eval's samplers (default 0)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--output", default=None, help="write lm-eval's results dict here as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def problems(args) -> list[str]:
    """Every problem with the arguments that can be seen without loading anything."""
    out = member_problems(args)
    if not [t for t in args.tasks.split(",") if t.strip()]:
        out.append("--tasks is empty")
    if args.limit is not None and args.limit < 1:
        out.append(f"--limit must be >= 1, got {args.limit}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        out.append(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    if args.batch_size < 1:
        out.append(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        out.append(f"--include-path {args.include_path!r} is not a folder")
    if args.output is not None:
        out_path = Path(args.output)
        if out_path.exists() and not args.overwrite:
            out.append(f"--output {args.output!r} exists (pass --overwrite to replace it)")
        if out_path.is_dir():
            out.append(f"--output {args.output!r} is a folder")
        elif not out_path.parent.is_dir():
            out.append(f"the folder of --output {args.output!r} does not exist")
        from surgery.checkpoint import check_not_an_input
        from surgery.errors import SurgeryError

        try:
            check_not_an_input(out_path, args.model)
        except SurgeryError as e:
            out.append(e.message)
    return out


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file in the same folder, then rename."""
    import json
    import os
    import tempfile

    from lm_eval.utils import handle_non_serializable

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=handle_non_serializable)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args) -> int:
    import time

    from surgery.errors import ConfigError, SurgeryError

    found = problems(args)
    if found:
        raise ConfigError(found, "fix the options above (see `surgery lm-eval --help`)")
    try:
        from lm_eval.utils import make_table

        from surgery.bytelevel.harness import build_lm, run_tasks, task_manager
    except ImportError as e:
        raise SurgeryError(f"lm-evaluation-harness is not installed ({e})", "pip install -e '.[eval]'") from e
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager, missing = task_manager(tasks, args.include_path)  # before loading any model
    if missing:
        raise SurgeryError(f"unknown lm-eval task(s): {', '.join(missing)}",
                           "check --tasks, or point --include-path at the folder of their YAML files")
    t0 = time.time()
    lm = build_lm(args.model, args.weight, args.mode, token_level=args.token_level, byte_mode=args.byte_mode,
                  device=args.device, batch_size=args.batch_size, greedy=not args.no_greedy)
    results = run_tasks(lm, tasks, args.include_path, args.limit, args.num_fewshot, args.seed, manager)
    seconds = time.time() - t0
    results["surgery"] = {"models": args.model, "weights": args.weight, "mode": args.mode,
                          "level": "token" if args.token_level else f"byte ({args.byte_mode})",
                          "seconds": round(seconds, 1)}
    print(make_table(results))
    if "groups" in results and results["groups"]:
        print(make_table(results, "groups"))
    if args.output:
        write_json_atomic(Path(args.output), results)
    level = "token level" if args.token_level else f"byte level ({args.byte_mode})"
    what = args.model[0] if len(args.model) == 1 else f"the {args.mode} ensemble of {', '.join(args.model)}"
    print(f"Ran {', '.join(tasks)} on {what}, {level}, in {seconds:.1f} s"
          + (f"; results written to {args.output}" if args.output else "") + ".")
    return 0
