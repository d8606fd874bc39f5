"""Demo: give SmolLM2-135M the Llama-3 tokenizer, and measure what it costs in bits per byte.

Run (what `make demo` does, after `surgery assets`):

    .venv/bin/python recipes/demo.py

Tiny CPU variant (one language, 2 KB, no Gemma; about 3 minutes with a warm aux cache):

    .venv/bin/python recipes/demo.py --langs en --max-bytes 2000 --skip-gemma

Steps: score SmolLM2-135M and Gemma-3-270M on the shipped held-out texts
(``artifacts/texts/debian-reference.{en,de,zh}.heldout.txt``), transplant the Llama-3 tokenizer
into SmolLM2-135M with ``tokenadapt`` into ``artifacts/runs/demo/smollm2-llama3`` (replacing
the demo's own previous output), reload that folder with plain transformers, score it the same
way, print a table and a short greedy sample.

What is cut to fit about 10 minutes on 2 CPU cores: each held-out text is scored on its first
``--max-bytes`` bytes (default 8000) in non-overlapping windows of 1024 tokens (``--stride``);
the aux embeddings of the two vocabularies (the slow part, 2-9 minutes cold on 2 busy cores) are
computed once, for the old vocabulary and the ~89k Llama-3 tokens that SmolLM2 lacks only,
deduplicated, and cached under ``artifacts/cache/aux/`` for every later run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "artifacts" / "texts"
OUT = ROOT / "artifacts" / "runs" / "demo" / "smollm2-llama3"


def load_texts(langs, max_bytes):
    out = {}
    for lang in langs:
        p = TEXTS / f"debian-reference.{lang}.heldout.txt"
        if not p.exists():
            sys.exit(f"error: {p} is missing (the shipped texts live in artifacts/texts)")
        out[lang] = p.read_bytes()[:max_bytes].decode("utf-8", errors="ignore")
    return out


def score(model_name, tok_name, texts, stride):
    from surgery.evaluate import bits_per_byte
    from surgery.loading import load_model, load_tokenizer

    t0 = time.time()
    tok = load_tokenizer(tok_name)
    model = load_model(model_name)
    res = {}
    for lang, text in texts.items():
        r = bits_per_byte(model, tok, text, max_length=1024, stride=stride, progress=False)
        res[lang] = (r.bits_per_byte, r.n_tokens)
    print(f"  scored {model_name} in {time.time() - t0:.0f} s", flush=True)
    return res, model, tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--langs", nargs="+", default=["en", "de", "zh"])
    ap.add_argument("--max-bytes", type=int, default=8000)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--skip-gemma", action="store_true", help="do not score Gemma-3-270M")
    ap.add_argument("--method", default="tokenadapt")
    args = ap.parse_args(argv)

    import torch

    from surgery.errors import SurgeryError
    from surgery.transplant import TransplantConfig, transplant_checkpoint
    from surgery.transplant.aux_embeddings import default_cache_dir

    t_start = time.time()
    texts = load_texts(args.langs, args.max_bytes)
    rows = []
    try:
        print("1/4 scoring the original models on the held-out texts", flush=True)
        smol, _, _ = score("smollm2-135m", "smollm2-135m", texts, args.stride)
        rows.append(("SmolLM2-135M", "own (49,152)", smol))
        if not args.skip_gemma:
            gemma, _, _ = score("gemma3-270m", "gemma3-270m", texts, args.stride)
            rows.append(("Gemma-3-270M", "own (262,144)", gemma))
        print(f"2/4 transplanting llama3-tokenizer into smollm2-135m ({args.method}) -> {OUT}", flush=True)
        cfg = TransplantConfig(method=args.method, cache_dir=str(default_cache_dir()))
        rep = transplant_checkpoint("smollm2-135m", "llama3-tokenizer", str(OUT), cfg, overwrite=True,
                                    progress=True)
        print("3/4 scoring the transplanted model (reloaded from its folder)", flush=True)
        after, model, tok = score(str(OUT), str(OUT), texts, args.stride)
        rows.append((f"SmolLM2-135M + Llama-3 ({args.method})", "Llama-3 (128,256)", after))
    except SurgeryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print("4/4 results\n")
    head = f"{'model':<40} {'tokenizer':<18} " + " ".join(f"{lang + ' bpb':>9} {'ratio':>6}" for lang in texts)
    print(head)
    print("-" * len(head))
    for name, tokname, res in rows:
        cells = " ".join(f"{res[lang][0]:>9.4f} {res[lang][0] / smol[lang][0]:>6.3f}" for lang in texts)
        print(f"{name:<40} {tokname:<18} {cells}")
    c, t = rep["counts"], rep["timings_s"]
    print(f"\nbits per byte on the first {args.max_bytes} bytes of each held-out text (lower is better); ratio to "
          f"SmolLM2-135M with its own tokenizer.")
    print(f"transplant: {c['exact']} rows copied, {c['initialized']} initialized, {c['special_matched']} special "
          f"tokens by role; {t['wall']} s wall (aux embeddings {rep['method_stats'].get('seconds_aux', 0)} s, "
          f"{rep['method_stats'].get('aux_new_computed', 0) + rep['method_stats'].get('aux_old_computed', 0)} "
          f"computed now, the rest cached)")
    prompt = "The Debian package manager"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    print(f"\ngreedy sample of the transplanted model: {tok.decode(gen[0], skip_special_tokens=True)!r}")
    print(f"total {time.time() - t_start:.0f} s; checkpoint in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
