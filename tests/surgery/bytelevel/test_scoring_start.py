"""`score(..., start=k)`: a context conditioned on, never scored, gives the whole-text numbers of the rest.

The slow path scores the whole text (every prefix's covering tree) and slices; the fast path builds nothing
for prefixes shorter than the context. Per-byte log-probabilities and full next-byte distributions must agree
within 1e-5 nats, for byte-level BPE (SmolLM2), SentencePiece with byte fallback (Gemma-3), a dummy-prefix
SentencePiece (Mistral v1), both modes, and contexts ending inside a run of spaces, inside a word and inside a
UTF-8 character.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import tiny_llama, tokenizer, vocab
from surgery.bytelevel import ByteLM
from surgery.bytelevel.scoring import score
from surgery.bytelevel.validity import Canonicalizer

TOL = 1e-5  # nats

TEXTS = [
    ("In GNU/Linux, files are organized into directories.", " All files are in one tree."),
    ("a  ", "b  c!"),
    ("It's 12", "34 o'clock\n\nthen"),
    ("Grüße aus ", "Köln — 東京で"),
    # longer than any token (SmolLM2 and Gemma-3 alike), so that tree nodes in the context are left out
    ("These files and directories can be spread out over several devices. mount(8) serves to attach the "
     "filesystem found on some device to the big file tree.   ", "Conversely, umount(8) detaches it again."),
    ("Files are organized into directories; all of them are arranged in one big tree rooted at the root directo",
     "ry, conversely unmounted."),
]


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m", "mistral-v1-tokenizer"])
def lm(request):
    tok = tokenizer(request.param)
    v = vocab(request.param)
    return tiny_llama(max(len(tok), len(v)), seed=4), tok, Canonicalizer(tok, v)


def _check(blm: ByteLM, data: bytes, k: int, full: bool) -> None:
    slow = score(blm, data, full=full)
    fast = score(blm, data, full=full, start=k)
    assert fast.n_bytes == len(data) - k and fast.byte_logprobs.shape == (len(data) - k,)
    assert np.allclose(fast.byte_logprobs, slow.byte_logprobs[k:], atol=TOL, rtol=0)
    assert abs(fast.logprob - float(slow.byte_logprobs[k:].sum())) < TOL * max(1, len(data) - k)
    if full:
        a, b = fast.dists, slow.dists[k:]
        assert a.shape == b.shape == (len(data) - k + 1, 257)
        assert np.array_equal(np.isfinite(a), np.isfinite(b))
        fin = np.isfinite(b)
        assert np.abs(a[fin] - b[fin]).max() < TOL


@pytest.mark.parametrize("ctx, cont", TEXTS)
def test_start_equals_whole_text_canonical(lm, ctx, cont):
    model, tok, canon = lm
    blm = ByteLM(model, tok, canon=canon)
    data = (ctx + cont).encode()
    k = len(ctx.encode())
    _check(blm, data, k, full=False)
    _check(blm, data, k, full=True)


def test_start_inside_a_character_and_at_the_ends(lm):
    model, tok, canon = lm
    blm = ByteLM(model, tok, canon=canon)
    data = "Grüße, 東京".encode()
    inside = data.index("ü".encode()) + 1  # between the two bytes of ü
    for k in (0, 1, inside, len(data) - 1, len(data)):
        _check(blm, data, k, full=k % 2 == 0)


def test_start_exact_mode(lm):
    model, tok, canon = lm
    blm = ByteLM(model, tok, mode="exact", canon=canon)
    data = b"ab c"
    for k in (1, 2, 3):
        _check(blm, data, k, full=True)


def test_start_out_of_range(lm):
    model, tok, canon = lm
    blm = ByteLM(model, tok, canon=canon)
    for k in (-1, 4):
        with pytest.raises(ValueError):
            score(blm, b"abc", start=k)
