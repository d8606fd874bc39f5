"""Prompts that end in the middle of a word: naive tokenization vs token healing vs byte level.

Run (CPU, about 2-3 minutes on 2 cores, after `surgery assets`):

    .venv/bin/python recipes/fim_example.py

Tiny CPU variant (a random 2-layer model with SmolLM2's tokenizer: seconds, meaningless text):

    .venv/bin/python recipes/fim_example.py --tiny

For each prompt it prints the log-probability (nats) of the true continuation under the three
methods of :mod:`surgery.bytelevel.fim`, then a greedy completion from each. The byte-level LM
sums over every tokenization of the prompt's bytes, so the word can be finished naturally.
"""

from __future__ import annotations

import argparse

import torch

EXAMPLES = [
    ("def fibonac", "ci(n):"),
    ("The capital of France is Pa", "ris."),
    ("import num", "py as np"),
    ("The quick brown fox jumps over the la", "zy dog."),
]


def main() -> None:
    ap = argparse.ArgumentParser(description="mid-word prompts: naive vs token healing vs byte level")
    ap.add_argument("--model", default="smollm2-135m", help="model (asset name, folder or hub id)")
    ap.add_argument("--tiny", action="store_true", help="random tiny model with the model's tokenizer")
    ap.add_argument("--max-bytes", type=int, default=24, help="bytes per greedy completion")
    args = ap.parse_args()

    from surgery.bytelevel import ByteLM
    from surgery.bytelevel.fim import complete, continuation_logprobs
    from surgery.loading import load_model, load_tokenizer

    torch.set_num_threads(2)
    tok = load_tokenizer(args.model)
    if args.tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2)).eval()
    else:
        model = load_model(args.model)
    blm = ByteLM(model, tok)
    print(f"{'prompt':40s} {'continuation':12s} {'naive':>8s} {'healing':>8s} {'bytes':>8s}   (log-prob, nats)")
    for prompt, cont in EXAMPLES:
        lp = continuation_logprobs(model, tok, prompt, cont, byte_lm=blm)
        print(f"{prompt!r:40s} {cont!r:12s} {lp['naive']:8.2f} {lp['healing']:8.2f} {lp['bytes']:8.2f}")
    print()
    for prompt, _ in EXAMPLES[:2]:
        outs = complete(model, tok, prompt, args.max_bytes, byte_lm=blm)
        for method, text in outs.items():
            print(f"{method:8s} {prompt}|{text!r}")
        print()


if __name__ == "__main__":
    main()
