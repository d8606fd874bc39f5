"""Fuzzing the byte level: next-byte distributions after random prefixes (hypothesis).

Prefixes mix ASCII, runs of spaces and newlines, Latin-1, Cyrillic, CJK, emoji and characters
that neither vocabulary holds as a piece (byte-fallback pieces in Gemma-3), cut at any byte (often
inside a character). For a byte-level BPE (SmolLM2) and a SentencePiece tokenizer (Gemma-3), on tiny
random models: every distribution is finite, sums to 1 within 1e-6, and whatever ``canonical``
admits ``exact`` admits too (``exact`` sums over every encoding, ``canonical`` over a subset).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import tiny_llama, tokenizer, vocab
from surgery.bytelevel import ByteLM
from surgery.bytelevel.validity import Canonicalizer

ALPHABET = "ab Z.\n  \t1éßдом中文語🙂龘𝔘ꙮ"
EXAMPLES = 40
TRIED: dict[str, int] = {}


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def lms(request):
    tok = tokenizer(request.param)
    v = vocab(request.param)
    model = tiny_llama(max(len(tok), len(v)), seed=13)
    canon = Canonicalizer(tok, v)
    out = {mode: ByteLM(model, tok, mode=mode, canon=canon) for mode in ("exact", "canonical")}
    yield request.param, out
    print(f"\nbyte-level fuzz, {request.param}: {TRIED.get(request.param, 0)} prefixes tried")


def test_next_byte_distributions_on_random_prefixes(lms):
    name, blms = lms

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(st.text(alphabet=ALPHABET, max_size=6), st.integers(min_value=0, max_value=3))
    def check(text, cut):
        data = text.encode()
        data = data[: max(0, len(data) - cut)]  # often inside a character
        if blms["exact"].vocab.family == "sentencepiece":
            data = data[:7]  # exact mode over a byte-fallback vocabulary grows as 3^n
        TRIED[name] = TRIED.get(name, 0) + 1
        dists = {}
        for mode, blm in blms.items():
            lp = blm.next_byte_logprobs(data)
            assert lp.shape == (257,) and not torch.isnan(lp).any() and not (lp == float("inf")).any()
            p = lp.exp()
            assert abs(float(p.sum()) - 1.0) < 1e-6, (mode, data, float(p.sum()))
            dists[mode] = p
        assert not ((dists["canonical"] > 0) & (dists["exact"] == 0)).any(), data

    check()
    assert TRIED[name] >= EXAMPLES // 2
