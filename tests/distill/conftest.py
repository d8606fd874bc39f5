"""Fixtures for the distillation tests: tiny in-process models carrying real tokenizers, small texts."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import TEXTS, asset_dir


def make_tiny_model(tok_dir: Path, out: Path, seed: int, hidden: int = 32, layers: int = 2) -> Path:
    """A random tiny Llama (hidden 32, 2 layers) with the tokenizer of ``tok_dir``, saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory):
    """Tiny Llama with SmolLM2's byte-level BPE tokenizer (49k)."""
    return make_tiny_model(asset_dir("smollm2-135m"), tmp_path_factory.mktemp("student"), seed=1)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Tiny Llama with Mistral v1's SentencePiece tokenizer (32k, dummy prefix): a fast cross-vocabulary teacher."""
    return make_tiny_model(asset_dir("mistral-v1-tokenizer"), tmp_path_factory.mktemp("teacher"), seed=2)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    """Two small German files (train / held-out) cut from the shipped text."""
    d = tmp_path_factory.mktemp("text")
    src = TEXTS / "debian-reference.de.train.txt"
    text = src.read_text(encoding="utf-8")[:5000] if src.exists() else (
        "Grüße aus Köln! Der Rechner startet. 😀 中文 text\n\n" * 60)
    (d / "train.txt").write_text(text, encoding="utf-8")
    (d / "heldout.txt").write_text(text[:800], encoding="utf-8")
    return d


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run (restored after): on a loaded 2-core machine OpenMP
    spin-waiting makes 2 threads 10x slower than 1; subprocesses get OMP_NUM_THREADS=1."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
