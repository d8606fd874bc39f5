"""Random-weight bf16 checkpoints with the exact shapes of real models, for cost measurements.

Real 1B-8B checkpoints cannot be shipped; what a transplant costs depends only on their shapes,
dtypes, shard layout and tokenizer. This script writes a Hugging Face folder with the config of
a real model (hidden size, MLP width, layers, heads, KV heads, vocabulary, head tying), the
matching shipped tokenizer, and random bf16 weights (norm weights one), **tensor by tensor**:
the model is never in memory (its parameters are built on the ``meta`` device for their names
and shapes, and each tensor is drawn, written and dropped).

    .venv/bin/python benchmarks/synthetic_checkpoint.py llama-3.2-3b /tmp/llama-3.2-3b --shard-per-layer

Random values are slices of a fixed pool of normals (std 0.02), so writing 16 GB takes about as
long as the disk needs. Prints one JSON line (name, folder, bytes, shards, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
_LLAMA32_ROPE = dict(_LLAMA31_ROPE, factor=32.0)

# name → (model_type, config fields, shipped tokenizer); shapes as in the published config.json files
MODELS = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters=_LLAMA32_ROPE), "llama3-tokenizer"),
    "llama-3.2-3b": ("llama", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                   num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters=_LLAMA32_ROPE), "llama3-tokenizer"),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                   tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-5,
                                   rope_parameters=_LLAMA31_ROPE), "llama3-tokenizer"),
    "gemma-3-1b": ("gemma3_text", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                       tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
                                       sliding_window=512, query_pre_attn_scalar=256,
                                       hidden_activation="gelu_pytorch_tanh"), "gemma3-270m"),
    "qwen2.5-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False, max_position_embeddings=131072, rms_norm_eps=1e-6,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}), "qwen2-tokenizer"),
    # not a real model: a 2-layer Llama-3-tokenizer checkpoint for quick checks of the scripts
    "tiny-llama3": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=128256, tie_word_embeddings=False,
                                  max_position_embeddings=2048, rms_norm_eps=1e-5), "llama3-tokenizer"),
}
REAL = [n for n in MODELS if not n.startswith("tiny")]


def make_config(name: str, tokenizer):
    from transformers import AutoConfig

    model_type, fields, _ = MODELS[name]
    cfg = AutoConfig.for_model(model_type, **fields)
    cfg.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else None
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.dtype = "bfloat16"
    return cfg


def n_params(name: str) -> int:
    """Parameter count (tied head counted once)."""
    from surgery.loading import load_tokenizer
    from surgery.transplant.streaming import model_skeleton

    model = model_skeleton(make_config(name, load_tokenizer(MODELS[name][2])))
    return sum(p.numel() for p in model.parameters())


def write(name: str, out: Path, shard_per_layer: bool = False, max_shard_bytes: int = 5 * 1000**3,
          seed: int = 0) -> dict:
    """Write the synthetic checkpoint ``name`` to ``out`` (atomically); returns a summary."""
    import torch

    from surgery.checkpoint import atomic_output_dir
    from surgery.shards import write_streamed_shards
    from surgery.loading import load_tokenizer
    from surgery.transplant.streaming import model_skeleton

    t0 = time.time()
    tok = load_tokenizer(MODELS[name][2])
    cfg = make_config(name, tok)
    skeleton = model_skeleton(cfg)
    cfg.architectures = [type(skeleton).__name__]  # as in published configs (mergekit needs it)
    params = list(skeleton.named_parameters())  # tied duplicates appear once
    entries = [(n, torch.bfloat16, list(p.shape)) for n, p in params]
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)

    shapes = {n: s for n, _, s in entries}

    def produce(n: str) -> torch.Tensor:
        shape = shapes[n]
        numel = math.prod(shape)
        if n.endswith("norm.weight") or "layernorm" in n or n.endswith("norm.bias"):
            return torch.ones(shape, dtype=torch.bfloat16)
        off = int(torch.randint(0, pool.numel(), (1,), generator=g))
        reps = math.ceil((numel + off) / pool.numel())
        return pool.repeat(reps)[off:off + numel].reshape(shape).clone()

    groups = None
    if shard_per_layer:  # one shard per decoder layer, then one with everything else
        by_layer: dict[str, list[int]] = {}
        for i, (n, _, _) in enumerate(entries):
            parts = n.split(".")
            key = next((".".join(parts[:j + 2]) for j, p in enumerate(parts[:-1])
                        if p == "layers" and parts[j + 1].isdigit()), "rest")
            by_layer.setdefault(key, []).append(i)
        rest = by_layer.pop("rest", [])
        groups = list(by_layer.values()) + ([rest] if rest else [])
    with atomic_output_dir(out, overwrite=True) as tmp:
        index = write_streamed_shards(entries, produce, tmp, max_shard_bytes, groups=groups)
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return {"benchmark": "synthetic_checkpoint", "model": name, "folder": str(out),
            "params": sum(math.prod(s) for _, _, s in entries), "bytes": index["metadata"]["total_size"],
            "shards": len(set(index["weight_map"].values())), "tokenizer": MODELS[name][2],
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=sorted(MODELS))
    ap.add_argument("out", help="output folder (replaced if it exists)")
    ap.add_argument("--shard-per-layer", action="store_true", help="one shard per decoder layer (plus one)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit otherwise (default 5)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(write(args.model, Path(args.out), args.shard_per_layer, int(args.max_shard_gb * 1e9), args.seed)),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
