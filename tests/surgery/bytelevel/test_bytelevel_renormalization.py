"""Canonical renormalization measured byte by byte (tiny random models, real tokenizers).

``exact`` mode renormalizes nothing: every gain is 0 and the byte-level probability is the exact
prefix probability (brute-force enumeration). In ``canonical`` mode the gains are never negative,
the byte log-probabilities are those of ``ByteLM.logprob``, and the gains plus the last piece's
marginal are the whole difference to the token-level log-probability.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import tiny_llama, tokenizer, vocab
from surgery.bytelevel import ByteLM
from surgery.bytelevel.canonical_mass import renormalization_gains
from surgery.bytelevel.validity import Canonicalizer


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def lms(request):
    tok = tokenizer(request.param)
    v = vocab(request.param)
    model = tiny_llama(max(len(tok), len(v)), seed=7)
    canon = Canonicalizer(tok, v)
    return {mode: ByteLM(model, tok, mode=mode, canon=canon) for mode in ("exact", "canonical")}


def test_exact_mode_gains_nothing(lms, brute_force):
    blm = lms["exact"]
    v = blm.vocab
    brute = brute_force(blm.model, blm.tokenizer, v.surfaces, blm.start_id, v.dummy_prefix)
    for data in (b"a  b!", "мир".encode()):
        r = renormalization_gains(blm, data)
        assert np.abs(r.gains).max() < 1e-5, data
        assert not r.piece_start.any()
        assert abs(r.byte_logprobs.sum() - brute.prefix_logprob_exact(data)) < 1e-4, data
        assert abs(r.last_piece + r.token_logprobs.sum() - brute.prefix_logprob_exact(data)) < 1e-4, data


def test_canonical_gains(lms):
    blm = lms["canonical"]
    opened = 0
    for text in ("Hello world, it's 12.", "мир ок\nда", "日本語の文章です。", "a龘b c"):
        data = text.encode()
        r = renormalization_gains(blm, data)
        assert r.gains.min() > -1e-6, text  # renormalization only ever raises probabilities
        assert abs(r.byte_logprobs.sum() - blm.logprob(data)) < 1e-4, text
        assert abs(r.gap - (r.gains.sum() + r.last_piece)) < 1e-6, text
        ids = blm.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(r.token_logprobs) == len(ids)
        opened += int(r.piece_start.sum())
    assert opened > 0  # some texts have several pieces: the root moved
