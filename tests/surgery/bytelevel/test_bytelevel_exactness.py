"""ByteLM against brute-force enumeration of cover encodings (tiny random models, real tokenizers).

`exact` must equal the sum over all cover encodings, `canonical` the sum over the encodings it
admits (judged by the Hugging Face tokenizer itself); next-byte probabilities sum to 1 and
their chain over a text equals `logprob`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_llama, tokenizer, vocab
from surgery.bytelevel import ByteLM
from surgery.bytelevel.cover import CoverTree
from surgery.bytelevel.validity import Canonicalizer

TOL = 1e-4  # nats

# family -> (asset, strings for exact mode, strings for canonical mode). SentencePiece vocabularies hold
# every character twice (piece and byte-fallback token), so exact enumeration grows as 3^n there.
CASES = {
    "byte_level": ("smollm2-135m", ["Hi there", "a  b!", "x\n\ny"], ["Hi there", "a  b!", "x\n\ny", "it's 12"]),
    "sentencepiece": ("gemma3-270m", ["a  b!", "x\n\ny"], ["Hi there", "a  b!", "x\n\ny", "it's 12"]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def setup(request, brute_force):
    asset, exact_strings, canon_strings = CASES[request.param]
    tok = tokenizer(asset)
    v = vocab(asset)
    model = tiny_llama(max(len(tok), len(v)), seed=3)
    canon = Canonicalizer(tok, v)
    lms = {mode: ByteLM(model, tok, mode=mode, canon=canon) for mode in ("exact", "canonical")}
    brute = brute_force(model, tok, v.surfaces, lms["exact"].start_id, v.dummy_prefix)
    return lms, brute, {"exact": exact_strings, "canonical": canon_strings}


def _close(lp: torch.Tensor, ref: np.ndarray) -> float:
    """Largest |log p - log q| over outcomes with non-negligible probability."""
    got = lp.exp().numpy()
    sel = ref > 1e-9
    assert np.all(got[~sel] < 1e-7)
    return float(np.abs(np.log(got[sel]) - np.log(ref[sel])).max())


def _check_against_brute_force(blm, brute, mode: str, x: str) -> None:
    """Every next-byte distribution of ``x`` equals the brute-force one, and ``logprob`` their chain."""
    data = x.encode()
    chain = 0.0
    for i in range(len(data) + 1):
        ref = brute.next_bytes(blm.stream(data[:i]), mode)
        assert _close(blm.next_byte_logprobs(data[:i]), ref) < TOL, (mode, x, i)
        if i < len(data):
            chain += math.log(ref[data[i]])
    assert abs(blm.logprob(data) - chain) < TOL, (mode, x)


@pytest.mark.parametrize("mode", ["exact", "canonical"])
def test_matches_brute_force(setup, mode):
    lms, brute, strings = setup
    blm = lms[mode]
    for x in strings[mode]:
        data = x.encode()
        assert len(data) <= 8
        _check_against_brute_force(blm, brute, mode, x)
        if mode == "exact":  # the true marginal, straight from its definition
            assert abs(blm.logprob(data) - brute.prefix_logprob_exact(data)) < TOL


# Non-ASCII: prefixes end inside characters; Cyrillic, CJK, and characters neither vocabulary has as a
# piece (龘: three byte-fallback pieces in Gemma-3, 𝔘: four; byte-level BPE spells them with byte tokens).
NON_ASCII = {"exact": ["é中", "мир", "a龘"], "canonical": ["中文", "мир ок", "a龘b", "ä𝔘", "日本 語"]}


@pytest.mark.parametrize("mode", ["exact", "canonical"])
def test_matches_brute_force_non_ascii(setup, mode):
    lms, brute, _ = setup
    blm = lms[mode]
    for x in NON_ASCII[mode]:
        _check_against_brute_force(blm, brute, mode, x)


@pytest.mark.parametrize("setup", ["sentencepiece"], indirect=True)
def test_byte_fallback_only_for_missing_characters(setup):
    """Canonical SentencePiece: a character of the vocabulary is never spelled with <0xNN> pieces (its
    byte reading gets no mass), a missing one is (and is then the only reading)."""
    lms, brute, _ = setup
    blm = lms["canonical"]
    fallback = {b: i for i, b in brute.fallback.items()}
    z = "中".encode()
    canon = blm.canon
    assert canon.fallback_allowed(z, 1) and canon.fallback_allowed(z, 2) and not canon.fallback_allowed(z, 3)
    assert fallback[z[2]] in canon.banned_at(z, 2).tolist()
    for c in "龘𝔘":
        raw = c.encode()
        assert canon.encode(raw) == [fallback[b] for b in raw]  # the tokenizer's own spelling
        assert all(canon.fallback_allowed(raw, k) for k in range(1, len(raw) + 1))
        assert fallback[raw[-1]] not in canon.banned_at(raw, len(raw) - 1).tolist()
    # the covering tree of a CJK text holds no byte-fallback spelling of its characters (all are pieces)
    text = "日本語の文章です".encode()
    tree = CoverTree(blm.index, canon)
    tree.extend(text)
    assert not any(t in canon.fallback_ids and tree.end[i] in ends
                   for i, t in enumerate(tree.token) for ends in [_char_ends(text)])


def _char_ends(data: bytes) -> set[int]:
    ends, k = set(), 0
    for ch in data.decode():
        k += len(ch.encode())
        ends.add(k)
    return ends


@pytest.mark.parametrize("mode", ["exact", "canonical"])
def test_distributions_sum_to_one_and_chain(setup, mode):
    lms, _, _ = setup
    blm = lms[mode]
    data = "Né: ok".encode()  # a two-byte character: prefixes end inside it
    rows = blm.byte_logprobs(data)
    assert rows.shape == (len(data) + 1, 257)
    chain = 0.0
    for i in range(len(data) + 1):
        d = blm.next_byte_logprobs(data[:i])
        assert abs(float(torch.logsumexp(d, 0))) < 1e-5
        assert float((d.exp() - rows[i].exp()).abs().max()) < 1e-6
        if i < len(data):
            chain += float(d[data[i]])
    assert abs(blm.logprob(data) - chain) < TOL


def test_speculation_changes_nothing(setup):
    lms, _, _ = setup
    blm = lms["canonical"]
    fresh = ByteLM(blm.model, blm.tokenizer, canon=blm.canon)
    plain = ByteLM(blm.model, blm.tokenizer, canon=blm.canon, speculate=0)
    data = b"the cat sat"
    for i in range(len(data) + 1):
        assert torch.allclose(fresh.next_byte_logprobs(data[:i]), plain.next_byte_logprobs(data[:i]), atol=1e-6)
    assert fresh.forwards <= plain.forwards <= len(data) + 1


def test_dummy_prefix_sentencepiece(brute_force):
    """Mistral v1 puts a space before the text: it is conditioned on, never scored."""
    tok = tokenizer("mistral-v1-tokenizer")
    v = vocab("mistral-v1-tokenizer")
    assert v.dummy_prefix
    model = tiny_llama(len(v), seed=5)
    canon = Canonicalizer(tok, v)
    brute = None
    for mode, data in (("exact", b"ab c"), ("canonical", b"Hi there")):
        blm = ByteLM(model, tok, mode=mode, canon=canon)
        brute = brute or brute_force(model, tok, v.surfaces, blm.start_id, True)
        chain = 0.0
        for i in range(len(data) + 1):
            ref = brute.next_bytes(b" " + data[:i], mode)
            assert _close(blm.next_byte_logprobs(data[:i]), ref) < TOL, (mode, i)
            if i < len(data):
                chain += math.log(ref[data[i]])
        assert abs(blm.logprob(data) - chain) < TOL


@pytest.mark.parametrize("asset", ["llama3-tokenizer", "qwen2-tokenizer"])
def test_other_byte_level_tokenizers(asset, brute_force):
    """Llama-3 and Qwen2 (digits in groups, `ignore_merges`): canonical mode against brute force."""
    tok = tokenizer(asset)
    v = vocab(asset)
    model = tiny_llama(len(v), seed=11)
    blm = ByteLM(model, tok, canon=Canonicalizer(tok, v))
    brute = brute_force(model, tok, v.surfaces, blm.start_id, False)
    data = b"it's 123"
    chain = 0.0
    for i in range(len(data) + 1):
        ref = brute.next_bytes(data[:i], "canonical")
        assert _close(blm.next_byte_logprobs(data[:i]), ref) < TOL, i
        if i < len(data):
            chain += math.log(ref[data[i]])
    assert abs(blm.logprob(data) - chain) < TOL
