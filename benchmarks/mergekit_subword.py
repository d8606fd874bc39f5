"""Benchmark: mergekit-tokensurgeon's ``subword`` init on the same pairs and texts as ``benchmarks/transplant.py``.

mergekit is *not* a dependency of this project (it pins its own torch/transformers); install it in a
separate virtual environment and point ``--mergekit`` at its ``mergekit-tokensurgeon``::

    python -m venv /work/mkvenv && /work/mkvenv/bin/pip install mergekit==0.1.5
    .venv/bin/python benchmarks/mergekit_subword.py --mergekit /work/mkvenv/bin/mergekit-tokensurgeon

For each new tokenizer the script runs ``mergekit-tokensurgeon BASE DONOR OUT -a subword --allow-crimes``
and scores OUT on the first ``--max-bytes`` bytes of each held-out text with the same evaluation
as ``benchmarks/transplant.py`` (windows of 1024 tokens, stride 1024). mergekit reads the new
vocabulary from a *donor model*: Gemma-3-270M carries the Gemma-3 tokenizer; for a tokenizer
without a shipped model (Llama-3) the donor is a random one-layer Llama holding that tokenizer
(``subword`` reads only the donor's vocabulary, never its weights). One JSON line per figure
(``kind: mergekit_subword``, with the ratio to the original model and mergekit's wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from transplant import emit, evaluate, heldout  # noqa: E402  (the same texts and scoring)

MODEL_DONORS = {"gemma3-270m"}  # assets that are models carrying the new tokenizer


def random_donor(tokenizer_name: str, out: Path) -> Path:
    """A one-layer random Llama carrying ``tokenizer_name`` (mergekit needs a model folder)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.loading import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="path of mergekit-tokensurgeon (its own virtualenv)")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--pairs", nargs="+", default=["llama3-tokenizer", "gemma3-270m"], help="new tokenizers")
    ap.add_argument("--langs", nargs="+", default=["en", "de", "zh", "ja"])
    ap.add_argument("--max-bytes", type=int, default=8000)
    ap.add_argument("--stride", type=int, default=1024)
    ap.add_argument("--work", default=None, help="folder for mergekit's outputs (default: a temp folder)")
    args = ap.parse_args(argv)

    from surgery.assets import asset_path
    from surgery.loading import load_model, load_tokenizer

    if not Path(args.mergekit).exists():
        print(f"error: {args.mergekit} not found; install mergekit in its own virtualenv (see --help)",
              file=sys.stderr)
        return 2
    texts = {lang: heldout(lang, args.max_bytes) for lang in args.langs}
    base_dir = asset_path(args.base)
    orig = evaluate(load_model(str(base_dir)), load_tokenizer(str(base_dir)), texts, args.stride)
    for lang, v in orig.items():
        emit({"benchmark": "mergekit_subword", "kind": "original", "base": args.base, "lang": lang,
              "bits_per_byte": round(v, 4)})
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        work = Path(work)
        for pair in args.pairs:
            donor = asset_path(pair) if pair in MODEL_DONORS else random_donor(pair, work / f"donor-{pair}")
            out = work / f"out-{pair}"
            t0 = time.time()
            r = subprocess.run([args.mergekit, str(base_dir), str(donor), str(out), "-a", "subword", "--allow-crimes"],
                               capture_output=True, text=True)
            secs = time.time() - t0
            if r.returncode != 0:
                print(f"error: mergekit-tokensurgeon failed for {pair}: {r.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr)
                return 1
            bpb = evaluate(load_model(str(out)), load_tokenizer(str(out)), texts, args.stride)
            for lang, v in bpb.items():
                emit({"benchmark": "mergekit_subword", "kind": "mergekit_subword", "base": args.base,
                      "tokenizer": pair, "lang": lang, "bits_per_byte": round(v, 4),
                      "ratio": round(v / orig[lang], 3), "seconds_mergekit": round(secs, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
