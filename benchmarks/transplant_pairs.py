"""Sweep: `surgery transplant` for every shipped base model × every other shipped tokenizer, from the CLI.

Run (after `surgery assets`; about 15 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/transplant_pairs.py [--method mean] [--bases smollm2-135m gemma3-270m]

For each pair: run the real CLI (`python -m surgery.cli transplant BASE TOK OUT --method M`) in a
subprocess, reload OUT with plain ``AutoModelForCausalLM`` / ``AutoTokenizer``, check that
``len(tokenizer)`` fits the embedding rows and the config's special ids exist in the new vocabulary,
greedy-generate 8 tokens, and print one JSON line (counts, wall time, sample). ``mean`` is the default
method because it needs no aux embeddings, so the sweep measures model handling (tied / untied heads,
Gemma's scaled embeddings, special tokens by role, padding, chat templates), not the init quality
(that is `benchmarks/transplant.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZERS = ["smollm2-135m", "gemma3-270m", "llama3-tokenizer", "qwen2-tokenizer", "mistral-v1-tokenizer",
              "mistral-v3-tokenizer", "tekken-tokenizer", "bert-tokenizer"]


def check(out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    rows = model.get_input_embeddings().weight.shape[0]
    cfg = model.config
    ids = {k: getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    flat = [i for v in ids.values() if v is not None for i in (v if isinstance(v, list) else [v])]
    prompt = tok("The Debian package manager", return_tensors="pt", add_special_tokens=True)["input_ids"]
    with torch.no_grad():
        gen = model.generate(prompt, max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else flat[0] if flat else 0)
    return {"len_tokenizer": len(tok), "embedding_rows": rows, "fits": len(tok) <= rows,
            "special_ids_valid": all(0 <= i < len(tok) for i in flat), "config_ids": ids,
            "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "sample": tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokenizers", nargs="+", default=TOKENIZERS)
    ap.add_argument("--method", default="mean")
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="transplant-pairs-") as work:
        for base in args.bases:
            for new in args.tokenizers:
                if new == base:
                    continue
                out = Path(work) / f"{base}--{new}"
                t0 = time.time()
                r = subprocess.run([sys.executable, "-m", "surgery.cli", "transplant", base, new, str(out),
                                    "--method", args.method], capture_output=True, text=True)
                row = {"benchmark": "transplant_pairs", "base": base, "tokenizer": new, "method": args.method,
                       "rc": r.returncode, "seconds": round(time.time() - t0, 1)}
                if r.returncode == 0:
                    rep = json.loads((out / "transplant_report.json").read_text())
                    row["counts"] = rep.get("counts")
                    row.update(check(out))
                    failures += not (row["fits"] and row["special_ids_valid"])
                else:
                    failures += 1
                    row["stderr"] = r.stderr.strip().splitlines()[-1:] if r.stderr else []
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"benchmark": "transplant_pairs_summary", "failures": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
