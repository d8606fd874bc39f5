"""Speculative decoding with a transplanted draft: JSON lines of recipes/draft_model.py's comparison.

Target Gemma-3-270M, greedy, on held-out prompts: the target alone, assisted generation with SmolLM2-135M given
Gemma-3's tokenizer by `surgery transplant` (and, when built, healed with the target as teacher), and universal
assisted generation with the original SmolLM2-135M. One JSON object per system: acceptance rate (accepted /
proposed draft tokens), target tokens per second (CPU, float32, a shared 2-core machine: indicative only), speedup
over the target alone, and whether every output equals the target's own greedy output.

Build the drafts first, then measure (each under the machine's CPU lock)::

    flock /tmp/cpu.lock .venv/bin/python recipes/draft_model.py --build-only --heal-steps 8
    flock /tmp/cpu.lock .venv/bin/python benchmarks/draft.py --prompts 6 > benchmarks/results/draft.jsonl

Tiny CPU variant (random models; plumbing only): ``.venv/bin/python benchmarks/draft.py --tiny``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    spec = importlib.util.spec_from_file_location("draft_model", ROOT / "recipes" / "draft_model.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args = sys.argv[1:]
    if "--tiny" not in args and "--skip-build" not in args:
        args.append("--skip-build")
    sys.argv = [sys.argv[0], "--json", *args]
    return recipe.main()


if __name__ == "__main__":
    raise SystemExit(main())
