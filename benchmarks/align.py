"""Benchmark: build time and peak memory of the vocabulary projection for real tokenizer pairs.

Run: `.venv/bin/python benchmarks/align.py [--all-pairs]` (after `surgery assets`). Prints one JSON line
per pair; `--all-pairs` reports coverage counts for every ordered pair of shipped tokenizers.
Each pair runs in a fresh subprocess so that peak RSS is the pair's own.
"""

from __future__ import annotations

import json
import subprocess
import sys

PAIRS = [("gemma3-270m", "llama3-tokenizer"), ("qwen2-tokenizer", "llama3-tokenizer"), ("smollm2-135m", "gemma3-270m"),
         ("llama3-tokenizer", "gemma3-270m"), ("llama3-tokenizer", "qwen2-tokenizer")]

CHILD = r"""
import json, resource, sys, time
from surgery.loading import load_tokenizer
from surgery.vocab.surfaces import canonical_vocabulary
from surgery.vocab.projection import build_projection, hkl_pairs, KIND_EXACT
a, b = sys.argv[1], sys.argv[2]
ta, tb = load_tokenizer(a), load_tokenizer(b)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
va = canonical_vocabulary(ta); vb = canonical_vocabulary(tb)
t1 = time.time()
P = build_projection(va, vb)
t2 = time.time()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
c = P.counts()
# Llama-3 style multi-digit tokens: how many map to something
multi = [i for i, s in enumerate(va.surfaces) if s is not None and s.strip().isdigit() and len(s.strip()) > 1]
multi_mapped = int(sum(P.matrix.indptr[i + 1] > P.matrix.indptr[i] for i in multi))
print(json.dumps({"benchmark": "align", "a": a, "b": b, "V_a": len(va), "V_b": len(vb),
    "seconds_surfaces": round(t1 - t0, 2), "seconds_projection": round(t2 - t1, 2), "seconds_total": round(t2 - t0, 2),
    "peak_rss_gib": round(peak / 1024**2, 3), "rss_after_tokenizers_gib": round(base / 1024**2, 3),
    **c, "shared_surfaces": len(set(va.surface_to_id) & set(vb.surface_to_id)), "nnz": int(P.matrix.nnz),
    "hkl_pairs": int(len(hkl_pairs(P)[0])), "multi_digit_tokens": len(multi), "multi_digit_mapped": multi_mapped}))
"""


ALL = ["smollm2-135m", "gemma3-270m", "llama3-tokenizer", "qwen2-tokenizer", "mistral-v1-tokenizer",
       "mistral-v3-tokenizer", "tekken-tokenizer", "bert-tokenizer"]


def all_pairs() -> int:
    """Coverage of every ordered pair of shipped tokenizers (in one process, vocabularies built once)."""
    import time

    from surgery.loading import load_tokenizer
    from surgery.vocab.projection import build_projection
    from surgery.vocab.surfaces import canonical_vocabulary

    vocabs = {n: canonical_vocabulary(load_tokenizer(n), n) for n in ALL}
    for a in ALL:
        for b in ALL:
            if a == b:
                continue
            t0 = time.time()
            P = build_projection(vocabs[a], vocabs[b])
            print(json.dumps({"benchmark": "align_coverage", "a": a, "b": b, **P.counts(),
                              "seconds": round(time.time() - t0, 2)}), flush=True)
    return 0


def main() -> int:
    if "--all-pairs" in sys.argv:
        return all_pairs()
    for a, b in PAIRS:
        r = subprocess.run([sys.executable, "-c", CHILD, a, b], capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"benchmark": "align", "a": a, "b": b, "error": r.stderr.strip().splitlines()[-1:]}))
            continue
        print(r.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
