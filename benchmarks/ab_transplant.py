"""Benchmark: the same ``surgery transplant`` with two checkouts of the code, alternately (A/B timing).

    git worktree add /tmp/old OLD_COMMIT
    flock /tmp/cpu.lock .venv/bin/python benchmarks/ab_transplant.py --old /tmp/old MODEL TOKENIZER \\
        --method mean --rounds 2 --check "what changed" >> benchmarks/results/scale.jsonl

Each round runs the old checkout, then this one (``PYTHONPATH`` selects the code), with the model's
shards read once beforehand so both see a warm page cache. Prints one JSON line (``kind: ab``): the wall
times and peak RSS of each side and whether the last outputs' shards are byte for byte the same.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = "import sys; from surgery.cli import main; sys.exit(main(sys.argv[1:]))"


def run_once(code: Path, args, out: Path) -> tuple[float, float]:
    """``(wall s, peak RSS GiB)`` of one transplant with the code of ``code``."""
    shutil.rmtree(out, ignore_errors=True)
    for f in Path(args.model).glob("*.safetensors"):  # warm page cache for both sides
        with open(f, "rb") as fh:
            while fh.read(1 << 26):
                pass
    env = dict(os.environ, PYTHONPATH=str(code))
    cmd = [sys.executable, "-c", RUN, "transplant", args.model, args.tokenizer, str(out), "--method", args.method]
    t = time.time()
    p = subprocess.Popen(cmd, env=env, cwd=tempfile.gettempdir(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"transplant with {code} failed: {p.stderr.read().decode()[-500:]}")
    return round(wall, 2), round(usage.ru_maxrss / 1024**2, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("tokenizer")
    ap.add_argument("--old", required=True, help="a checkout of the code before the change")
    ap.add_argument("--method", default="mean")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--check", required=True, help="what changed (goes into the JSON line)")
    ap.add_argument("--work", default=None, help="folder for the outputs (default: a temp folder, removed)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ab-transplant-"))
    res = {"old": [], "new": []}
    for _ in range(args.rounds):
        for side, code in (("old", Path(args.old)), ("new", ROOT)):
            res[side].append(run_once(code, args, work / side))
    a, b = sorted((work / "old").glob("*.safetensors")), sorted((work / "new").glob("*.safetensors"))
    same = sum(1 for x, y in zip(a, b) if x.name == y.name and filecmp.cmp(x, y, shallow=False))
    print(json.dumps({"benchmark": "scale", "kind": "ab", "model": Path(args.model).name, "tokenizer": args.tokenizer,
                      "tool": args.method, "change": args.check, "old_s": [w for w, _ in res["old"]],
                      "new_s": [w for w, _ in res["new"]], "old_peak_rss_gib": max(m for _, m in res["old"]),
                      "new_peak_rss_gib": max(m for _, m in res["new"]),
                      "output_shards_byte_identical": f"{same}/{max(len(a), len(b))}"}))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
