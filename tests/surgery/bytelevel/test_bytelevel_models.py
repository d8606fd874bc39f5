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
