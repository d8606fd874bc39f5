"""Byte level on the shipped SmolLM2-135M (integration) and windowed scoring (tiny model)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TEXTS, asset_dir, tiny_llama, tokenizer, vocab
from surgery.bytelevel import ByteLM
from surgery.bytelevel.validity import Canonicalizer


def test_windowed_scoring_close_to_full_context():
    """Windows shorter than the text (branches ride with the window that owns them) stay close."""
    tok = tokenizer("smollm2-135m")
    model = tiny_llama(len(tok), seed=7)
    canon = Canonicalizer(tok, vocab("smollm2-135m"))
    text = (TEXTS / "debian-reference.en.heldout.txt").read_text()[:300].encode()
    full = ByteLM(model, tok, canon=canon).logprob(text)
    windowed = ByteLM(model, tok, canon=canon, max_length=32, stride=12).logprob(text)
    assert math.isfinite(windowed)
    assert abs(windowed - full) / abs(full) < 0.02


@pytest.fixture(scope="module")
def smollm2():
    from surgery.loading import load_model, load_tokenizer

    asset_dir("smollm2-135m")
    torch.set_num_threads(2)
    return load_model("smollm2-135m"), load_tokenizer("smollm2-135m")


@pytest.mark.integration
def test_bits_per_byte_matches_token_level(smollm2):
    from surgery.evaluate import bits_per_byte

    model, tok = smollm2
    text = (TEXTS / "debian-reference.en.heldout.txt").read_text()[:900]
    text = text[: text.rfind("\n") + 1]  # end at a line: a cut word would favour the byte level
    token = bits_per_byte(model, tok, text, progress=False).bits_per_byte
    byte = ByteLM(model, tok).bits_per_byte(text)
    assert abs(byte - token) / token < 0.01, (byte, token)


@pytest.mark.integration
def test_fim_prompt_ending_mid_word(smollm2):
    """The byte-level conditional beats naive tokenization clearly and token healing too."""
    from surgery.bytelevel.fim import continuation_logprobs

    model, tok = smollm2
    blm = ByteLM(model, tok)
    for prompt, cont in [("def fibonac", "ci(n):"), ("The quick brown fox jumps over the la", "zy dog.")]:
        got = continuation_logprobs(model, tok, prompt, cont, byte_lm=blm)
        assert got["bytes"] > got["naive"] + 5, got
        assert got["bytes"] > got["healing"], got


def _head(name: str, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of a shipped held-out text, cut at a character boundary."""
    return (TEXTS / name).read_bytes()[:n_bytes].decode("utf-8", errors="ignore").encode()


def test_gemma3_canonical_scores_japanese():
    """Gemma-3 splits pieces only at spaces, so a Japanese paragraph is one piece; byte-fallback spellings
    of its characters (all pieces of the vocabulary) once made the covering tree explode ("more than
    200000 cover-encoding nodes for 58 bytes"). Now it stays a few nodes per byte."""
    from surgery.bytelevel.scoring import score

    tok = tokenizer("gemma3-270m")
    v = vocab("gemma3-270m")
    model = tiny_llama(len(v), seed=2)
    blm = ByteLM(model, tok, canon=Canonicalizer(tok, v), max_length=256)
    data = _head("debian-reference.ja.heldout.txt", 700)
    r = score(blm, data)
    assert math.isfinite(r.logprob) and r.n_bytes == len(data)
    assert r.n_branch < 3 * len(data), r.n_branch


def _sliding_model(vocab_size: int, window: int):
    """A tiny Gemma-3 whose every layer is sliding-window attention: a position sees only the last
    ``window`` positions (relative rotary positions), so scoring windows that keep at least that much
    context change nothing."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(4)
    cfg = Gemma3TextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=window,
                           layer_types=["sliding_attention", "sliding_attention"], max_position_embeddings=4096)
    model = Gemma3ForCausalLM(cfg).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("asset", ["smollm2-135m", "gemma3-270m"])
def test_multi_window_logprob_equals_full_context_chain(asset):
    """`ByteLM.logprob` over many scoring windows (branches riding with the window that owns their
    attach point) against an independent path: the chain of `next_byte_logprobs` with the whole
    prefix in context (shared KV cache, no windows). With a model that sees only 6 positions back,
    windows of 20 tokens overlapping by 12 lose nothing, so the two must agree exactly."""
    tok = tokenizer(asset)
    v = vocab(asset)
    model = _sliding_model(max(len(tok), len(v)), window=6)
    canon = Canonicalizer(tok, v)
    text = ((TEXTS / "debian-reference.en.heldout.txt").read_text()[:120] + " Дом, 中文 ok.\n").encode()
    windowed = ByteLM(model, tok, canon=canon, max_length=20, stride=8)
    r = __import__("surgery.bytelevel.scoring", fromlist=["score"]).score(windowed, text)
    assert r.n_windows >= 4 and r.n_branch > 0
    chain = ByteLM(model, tok, canon=canon)
    ref = 0.0
    for i in range(len(text)):
        ref += float(chain.next_byte_logprobs(text[:i])[text[i]])
    assert abs(r.logprob - ref) < 1e-4, (r.logprob, ref)  # float32 model: about 1e-6 apart
    assert abs(windowed.logprob(text) - r.logprob) < 1e-9
