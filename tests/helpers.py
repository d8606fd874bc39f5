"""Shared test helpers (import as `from helpers import ...`): the shipped assets (built by `surgery assets`) and tiny models carrying real tokenizers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("SURGERY_CACHE", ROOT / "artifacts" / "cache"))  # at import; prefer cache_root()
TEXTS = ROOT / "artifacts" / "texts"

TOKENIZER_ASSETS = ["smollm2-135m", "gemma3-270m", "llama3-tokenizer", "qwen2-tokenizer", "mistral-v1-tokenizer",
                    "mistral-v3-tokenizer", "tekken-tokenizer", "bert-tokenizer"]


def in_ci() -> bool:
    """True under continuous integration (``CI=true``, as CI services set it; ``CI=false`` or ``0`` is not CI)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def missing(msg: str) -> None:
    """A test input that must be built is absent: a failure under CI, a skip elsewhere."""
    if in_ci():
        pytest.fail(f"{msg} (CI requires every built asset)", pytrace=False)
    pytest.skip(msg)


def cache_root() -> Path:
    """The asset cache as configured now: ``$SURGERY_CACHE`` if set, else ``artifacts/cache`` of this checkout."""
    env = os.environ.get("SURGERY_CACHE")
    return Path(env).expanduser().resolve() if env else ROOT / "artifacts" / "cache"


def asset_dir(name: str) -> Path:
    """Folder of a built shipped asset; a missing (or half-built: no ``ASSET.json``) one is a failure under CI,
    a skip elsewhere, wherever the cache is configured."""
    p = cache_root() / name
    if not p.is_dir() or not any(p.iterdir()):
        missing(f"asset {name!r} not built in {p.parent} (run `surgery assets`)")
    return p


def text_file(name: str) -> Path:
    """A shipped text under ``artifacts/texts`` (failure under CI when absent, skip elsewhere)."""
    p = TEXTS / name
    if not p.exists():
        missing(f"shipped text {name!r} missing")
    return p


@functools.lru_cache(maxsize=None)
def _load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(asset_dir(name)))


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




def gpt2_bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte → printable character table, written out from its definition."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_bytes(tok) -> list[bytes | None]:
    """Bytes each id adds mid-text, computed from ``convert_ids_to_tokens`` alone: an independent reference
    for :func:`surgery.vocab.surfaces.canonical_vocabulary` (special and added tokens: ``None``).

    Byte-level BPE (a ByteLevel decoder): GPT-2 table; WordPiece: ``##x`` → ``x``, else space + piece;
    otherwise SentencePiece conventions: ``▁`` → space, ``<0xNN>`` → byte NN.
    """
    import json
    import re

    j = json.loads(tok.backend_tokenizer.to_str())
    added = {int(a["id"]) for a in j.get("added_tokens", [])}
    family = "wordpiece" if j["model"]["type"] == "WordPiece" else (
        "bytelevel" if "ByteLevel" in json.dumps(j.get("decoder")) else "sentencepiece")
    inv = {c: b for b, c in gpt2_bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i, piece in enumerate(tok.convert_ids_to_tokens(list(range(len(tok))))):
        if i in added or piece is None:
            out.append(None)
        elif family == "bytelevel":
            out.append(bytes(inv[c] for c in piece) if all(c in inv for c in piece) else None)
        elif family == "wordpiece":
            out.append(piece[2:].encode() if piece.startswith("##") else b" " + piece.encode())
        else:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            out.append(bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode())
    return out


def no_memory_for(monkeypatch, model_path) -> None:
    """Make loading ``model_path`` (every other model loads as usual) raise torch's out-of-memory error, as a device
    without room for it would."""
    import torch

    import surgery.loading

    real = surgery.loading.load_model

    def no_room(name, *a, **kw):
        if str(name) == str(model_path):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(name, *a, **kw)

    monkeypatch.setattr(surgery.loading, "load_model", no_room)
