"""Shared test helpers (import as `from helpers import ...`): the shipped assets (built by `surgery assets`) and tiny models carrying real tokenizers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SURGERY_CACHE", ROOT / "artifacts" / "cache"))
TEXTS = ROOT / "artifacts" / "texts"

TOKENIZER_ASSETS = ["smollm2-135m", "gemma3-270m", "llama3-tokenizer", "qwen2-tokenizer", "mistral-v1-tokenizer",
                    "mistral-v3-tokenizer", "tekken-tokenizer", "bert-tokenizer"]


def asset_dir(name: str) -> Path:
    """Folder of a shipped asset; under CI a missing asset is a failure, elsewhere a skip."""
    p = CACHE / name
    if not p.exists():
        msg = f"asset {name!r} not built (run `surgery assets`)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return p


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(CACHE / name))


def tokenizer(name: str):
    asset_dir(name)
    return _load_tokenizer(name)


@functools.lru_cache(maxsize=None)
def _vocab(name: str):
    from surgery.vocab.surfaces import canonical_vocabulary

    return canonical_vocabulary(_load_tokenizer(name), name)


def vocab(name: str):
    """Canonical vocabulary of a shipped tokenizer (cached for the whole session)."""
    asset_dir(name)
    return _vocab(name)


def tiny_llama(vocab_size: int, seed: int = 0, tie: bool = True, hidden: int = 32, layers: int = 2):
    """A tiny random LlamaForCausalLM (hidden 32, 2 layers) for a given vocabulary size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


