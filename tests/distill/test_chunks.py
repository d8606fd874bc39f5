"""Chunk alignment: vectorized batch alignment vs a brute-force walk, on real tokenizers and random text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.chunks import (align_chunks, align_chunks_reference, position_chunks, token_byte_spans,
                            _spans_from_char_offsets)

ALPHABET = st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789") +
                           list("  \n\n\t.,;:!?-_'\"()/") +
                           list("äöüßÄéèçñøåœ") + list("中文字漢語日本語のテキスト한국어") +
                           list("مرحبا") + list("привет") + ["😀", "👍🏽", "🇩🇪", "e\u0301", "\u200b", "\r\n"])
TEXTS = st.lists(ALPHABET, min_size=1, max_size=60).map("".join)


@pytest.fixture(scope="module", params=["gemma3-270m", "mistral-v1-tokenizer"])
def tokenizers(request):
    """SmolLM2 (byte-level BPE) against a SentencePiece tokenizer: Gemma-3 (byte fallback, no dummy
    prefix) or Mistral v1 (dummy prefix)."""
    import helpers

    return [(helpers.tokenizer(n), helpers.vocab(n)) for n in ("smollm2-135m", request.param)]


def encode(tok, vocab, text, bos=False, max_tokens=None):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])[:max_tokens]
    offs = list(enc["offset_mapping"])[: len(ids)]
    starts, ends = token_byte_spans(vocab, ids, text, offs)
    if bos:
        bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [bos_id] + ids
        starts = np.concatenate([[0], starts])
        ends = np.concatenate([[0], ends])
    return ids, starts, ends


def pad(rows):
    L = max(len(r) for r in rows)
    out = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def check_batch(tokenizers, texts, bos=(False, False), trunc=(None, None)):
    (ta, va), (tb, vb) = tokenizers
    A = [encode(ta, va, t, bos[0], trunc[0]) for t in texts]
    Bs = [encode(tb, vb, t, bos[1], trunc[1]) for t in texts]
    ends_a = pad([e for _, _, e in A])
    ends_b = pad([e for _, _, e in Bs])
    valid_a = pad([(e > s).astype(np.int64) for _, s, e in A]).astype(bool)
    valid_b = pad([(e > s).astype(np.int64) for _, s, e in Bs]).astype(bool)
    al = align_chunks(ends_a, valid_a, ends_b, valid_b)
    offset = 0
    for r, text in enumerate(texts):
        na, nb = len(A[r][0]), len(Bs[r][0])
        ca, cb, n = align_chunks_reference(A[r][2].tolist(), (A[r][2] > A[r][1]).tolist(),
                                           Bs[r][2].tolist(), (Bs[r][2] > Bs[r][1]).tolist())
        got_a = al.chunk_a[r, :na]
        got_b = al.chunk_b[r, :nb]
        # same partition as the brute force, up to the global numbering of chunks
        exp_a = np.array([c + offset if c >= 0 else -1 for c in ca], dtype=np.int64)
        exp_b = np.array([c + offset if c >= 0 else -1 for c in cb], dtype=np.int64)
        np.testing.assert_array_equal(got_a, exp_a)
        np.testing.assert_array_equal(got_b, exp_b)
        assert (al.chunk_a[r, na:] == -1).all() and (al.chunk_b[r, nb:] == -1).all()
        # every chunk: both sides decode to the same bytes
        ids_a, ids_b = A[r][0], Bs[r][0]
        data = text.encode("utf-8")
        for c in range(offset, offset + n):
            sa = [i for i in range(na) if got_a[i] == c]
            sb = [i for i in range(nb) if got_b[i] == c]
            assert sa and sb
            span_a = (A[r][1][sa[0]], A[r][2][sa[-1]])
            span_b = (Bs[r][1][sb[0]], Bs[r][2][sb[-1]])
            assert span_a == span_b
        offset += n
    assert al.n_chunks == offset
    return A, Bs, al


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=4))
def test_batch_alignment_matches_brute_force(tokenizers, texts):
    A, Bs, al = check_batch(tokenizers, texts)
    # untruncated: the last chunk of each row ends at the end of the text
    for r, text in enumerate(texts):
        n_bytes = len(text.encode("utf-8"))
        row_ends = al.chunk_end[al.chunk_row == r]
        assert row_ends.max(initial=0) == n_bytes


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXTS, min_size=1, max_size=3), ta=st.integers(1, 12), tb=st.integers(1, 12))
def test_truncation_and_bos_asymmetry(tokenizers, texts, ta, tb):
    check_batch(tokenizers, texts, bos=(True, False), trunc=(ta, tb))
    check_batch(tokenizers, texts, bos=(False, True), trunc=(None, tb))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_byte_spans_reproduce_text(tokenizers, text):
    data = text.encode("utf-8")
    for tok, vocab in tokenizers:
        ids, starts, ends = encode(tok, vocab, text)
        assert ends[-1] == len(data)
        for i, s, e in zip(ids, starts, ends):
            surf = vocab.surfaces[i] or b""
            # the piece's bytes (minus a dummy-prefix space at the very start)
            assert data[s:e] == surf[len(surf) - (e - s):]


def test_multibyte_split_and_whitespace_merging(tokenizers):
    text = "Grüße 😀😀  中文\n\n\tx"
    _, _, al = check_batch(tokenizers, [text])
    assert al.n_chunks >= 4


def test_bos_does_not_change_chunks(tokenizers):
    text = "Die Shell-Eingabeaufforderung (Shell-Prompt) 👍🏽"
    _, _, a = check_batch(tokenizers, [text], bos=(False, False))
    _, _, b = check_batch(tokenizers, [text], bos=(True, True))
    np.testing.assert_array_equal(a.chunk_a[0], b.chunk_a[0, 1:])
    np.testing.assert_array_equal(a.chunk_b[0], b.chunk_b[0, 1:])
    assert b.chunk_a[0, 0] == -1 and b.chunk_b[0, 0] == -1


def test_reference_on_handmade_case():
    # a: |ab|c|def|  b: |a|bc|de|f|  → chunks: "abc", "def"
    ca, cb, n = align_chunks_reference([2, 3, 6], [True] * 3, [1, 3, 5, 6], [True] * 4)
    assert (ca, cb, n) == ([0, 0, 1], [0, 0, 1, 1], 2)
    al = align_chunks(np.array([[2, 3, 6]]), np.ones((1, 3), bool), np.array([[1, 3, 5, 6]]), np.ones((1, 4), bool))
    assert al.chunk_a.tolist() == [[0, 0, 1]] and al.chunk_b.tolist() == [[0, 0, 1, 1]]
    assert al.chunk_end.tolist() == [3, 6]


def test_position_chunks_shift():
    tok = np.array([[-1, 0, 0, 1, -1]])
    assert position_chunks(tok).tolist() == [[0, 0, 1, -1, -1]]


def test_char_offset_fallback_shares_span_for_byte_pieces():
    # "é😀": é = 2 bytes, 😀 = 4 bytes as 4 byte-fallback pieces sharing the character's offsets
    text = "é😀"
    offsets = [(0, 1), (1, 2), (1, 2), (1, 2), (1, 2)]
    starts, ends = _spans_from_char_offsets(text, offsets, np.ones(5, dtype=np.int64))
    assert ends.tolist() == [2, 6, 6, 6, 6]
    assert starts.tolist() == [0, 2, 2, 2, 2]
    al = align_chunks(ends[None], (ends > starts)[None], np.array([[2, 6]]), np.ones((1, 2), bool))
    assert al.chunk_a.tolist() == [[0, 1, 1, 1, 1]]


def test_spans_fall_back_when_surfaces_disagree():
    class FakeVocab:
        dummy_prefix = False
        surfaces = (b"x", b"y")
        surface_lengths = np.array([1, 1])

    starts, ends = token_byte_spans(FakeVocab(), [0, 1], "ab", [(0, 1), (1, 2)])
    assert ends.tolist() == [1, 2]
    with pytest.raises(ValueError):
        token_byte_spans(FakeVocab(), [0, 1], "ab")


def test_first_position_of_each_chunk():
    from distill.trainer.distill_task import keep_positions

    pos = np.array([[0, 0, 1, 2, 2, 2, -1], [3, -1, 4, 4, -1, -1, -1]])
    assert keep_positions(pos, "first").tolist() == [0, -1, 1, 2, -1, -1, -1, 3, -1, 4, -1, -1, -1, -1]
    assert keep_positions(pos, "mean").tolist() == pos.reshape(-1).tolist()


def test_exact_chunks_one_identical_token_each_side():
    from distill.chunks import exact_chunks

    # side a: "Kon" "fig" " der" "."   side b: <bos> "Konfig" " der" ","   (same text up to the last byte)
    surf_a = [b"Kon", b"fig", b" der", b"."]
    surf_b = [b"", b"Konfig", b" der", b","]
    ends_a = np.array([[3, 6, 10, 11]])
    ends_b = np.array([[0, 6, 10, 11]])
    al = align_chunks(ends_a, np.ones((1, 4), bool), ends_b, np.array([[False, True, True, True]]))
    assert al.n_chunks == 3
    got = exact_chunks(al, np.array([[0, 1, 2, 3]]), np.array([[0, 1, 2, 3]]), surf_a, surf_b)
    assert got.tolist() == [False, True, False]  # Kon+fig vs Konfig; " der" = " der"; "." vs "," (same span)
