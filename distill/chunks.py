"""Chunk alignment of two tokenizations of the same text by byte offsets (ALGORITHMS.md §4).

Both tokenizers encode the same text. Every token covers a byte span
``[start, end)`` of the UTF-8 text; a *chunk* closes wherever both sides end a
token on the same byte, so a chunk is 1..n tokens of one side against 1..m of
the other and both sides cover exactly the same bytes.

Byte spans come from the alignment core's canonical surfaces (cumulative
surface lengths), not from the tokenizer's character offsets: SentencePiece
byte-fallback pieces share their character's offsets, a leading ``▁`` (dummy
prefix) belongs to no text byte, and multi-byte characters may be split
across byte-level BPE tokens. Only when the surfaces do not reproduce the text
(a normalizer that rewrites it) do we fall back to character offsets.

Tokens of zero length (BOS, EOS, chat markers) belong to no chunk: they
carry no text, so a BOS on one side only (BOS asymmetry) changes nothing.
Tokens after the last common boundary (a sequence truncated on one side)
belong to no chunk either.

The alignment is vectorized over a whole batch: boundaries of all rows are
encoded as ``row * stride + byte`` keys, intersected once and looked up with
one ``searchsorted``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

LOG = logging.getLogger(__name__)


def token_byte_spans(vocab, ids: Sequence[int], text: str | bytes,
                     char_offsets: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Byte span of each token of ``ids`` (an encoding of ``text``, possibly truncated).

    Args:
        vocab: the tokenizer's :class:`surgery.vocab.surfaces.Vocabulary`.
        ids: token ids, special tokens allowed anywhere (they get zero-length spans).
        text: the encoded text.
        char_offsets: the tokenizer's ``offset_mapping`` (character offsets), used only
            when the canonical surfaces do not reproduce the text.

    Returns:
        ``(starts, ends)`` int64 arrays of shape ``(len(ids),)``; ``ends`` is non-decreasing.

    Raises:
        ValueError: surfaces do not reproduce the text and no ``char_offsets`` were given.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids_arr = np.asarray(ids, dtype=np.int64)
    lens = vocab.surface_lengths[ids_arr] if len(ids_arr) else np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    joined = b"".join(vocab.surfaces[i] or b"" for i in ids_arr.tolist())
    # A SentencePiece dummy prefix (or a byte-level add_prefix_space) puts one space before
    # the text that covers no text byte: try that reading first when the vocabulary has one.
    shifts = (1, 0) if vocab.dummy_prefix else (0, 1)
    for shift in shifts:
        if shift and joined[:1] != b" ":
            continue
        if data.startswith(joined[shift:]):  # equal, or a prefix when the ids were truncated
            ends = np.maximum(ends - shift, 0)
            starts = np.concatenate([[0], ends[:-1]]) if len(ends) else ends.copy()
            starts = np.where(lens > 0, starts, ends)
            return starts.astype(np.int64), ends.astype(np.int64)
    if char_offsets is None:
        raise ValueError("token surfaces do not reproduce the text (a normalizer rewrites it) and no offsets were given")
    return _spans_from_char_offsets(text if isinstance(text, str) else data.decode("utf-8", "replace"),
                                    char_offsets, lens)


def _spans_from_char_offsets(text: str, offsets, lens) -> tuple[np.ndarray, np.ndarray]:
    """Fallback: character offsets → byte offsets; pieces sharing a character share its span."""
    char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
    if text:
        char_to_byte[1:] = np.cumsum([len(c.encode("utf-8")) for c in text])
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    off = np.clip(off, 0, len(text))
    starts, ends = char_to_byte[off[:, 0]], char_to_byte[off[:, 1]]
    special = np.asarray(lens) == 0
    ends = np.maximum.accumulate(np.where(special, 0, ends)) if len(ends) else ends
    starts = np.where(special, ends, np.minimum(starts, ends))
    return starts, ends


@dataclass(frozen=True)
class ChunkAlignment:
    """Chunk ids of the tokens of a batch on both sides.

    Attributes:
        chunk_a: ``(B, La)`` int64 chunk id per token of side a, ``-1`` = in no chunk.
        chunk_b: ``(B, Lb)`` same for side b.
        n_chunks: number of chunks C in the batch; ids are ``0..C-1`` ordered by (row, byte).
        chunk_row: ``(C,)`` row of each chunk.
        chunk_end: ``(C,)`` byte offset where each chunk ends (within its row).
    """

    chunk_a: np.ndarray
    chunk_b: np.ndarray
    n_chunks: int
    chunk_row: np.ndarray
    chunk_end: np.ndarray


def align_chunks(ends_a: np.ndarray, valid_a: np.ndarray, ends_b: np.ndarray, valid_b: np.ndarray) -> ChunkAlignment:
    """Align two batches of tokenizations of the same texts (vectorized).

    Args:
        ends_a: ``(B, La)`` byte end offset of each token of side a (non-decreasing per row).
        valid_a: ``(B, La)`` bool, False for padding and zero-length (special) tokens.
        ends_b, valid_b: the same for side b, ``(B, Lb)``.

    Returns:
        A :class:`ChunkAlignment`.
    """
    ends_a = np.asarray(ends_a, dtype=np.int64)
    ends_b = np.asarray(ends_b, dtype=np.int64)
    valid_a = np.asarray(valid_a, dtype=bool)
    valid_b = np.asarray(valid_b, dtype=bool)
    if ends_a.ndim != 2 or ends_b.ndim != 2 or ends_a.shape[0] != ends_b.shape[0]:
        raise ValueError(f"expected (B, L) arrays with the same B, got {ends_a.shape} and {ends_b.shape}")
    B = ends_a.shape[0]
    stride = int(max(ends_a.max(initial=0), ends_b.max(initial=0))) + 1
    rows_a = np.broadcast_to(np.arange(B)[:, None], ends_a.shape)
    rows_b = np.broadcast_to(np.arange(B)[:, None], ends_b.shape)
    key_a = rows_a * stride + ends_a
    key_b = rows_b * stride + ends_b
    common = np.intersect1d(key_a[valid_a], key_b[valid_b])  # sorted, unique: the chunk boundaries

    def lookup(keys, rows, valid):
        c = np.searchsorted(common, keys, side="left")
        inside = valid & (c < len(common))
        c_clip = np.minimum(c, max(len(common) - 1, 0))
        if len(common):
            inside &= (common[c_clip] // stride) == rows
        return np.where(inside, c, -1).astype(np.int64)

    return ChunkAlignment(
        chunk_a=lookup(key_a, rows_a, valid_a),
        chunk_b=lookup(key_b, rows_b, valid_b),
        n_chunks=int(len(common)),
        chunk_row=(common // stride).astype(np.int64),
        chunk_end=(common % stride).astype(np.int64),
    )


def align_chunks_reference(ends_a: Sequence[int], valid_a: Sequence[bool], ends_b: Sequence[int],
                           valid_b: Sequence[bool]) -> tuple[list[int], list[int], int]:
    """Brute-force two-pointer walk over one sequence pair (the test reference).

    Walk both token lists, always advancing the side whose current token ends
    first; when both end on the same byte, close the chunk. Tokens of a chunk
    that never closes (truncation) get ``-1``, as do invalid tokens.

    Returns:
        ``(chunk_a, chunk_b, n_chunks)`` as Python lists.
    """
    ia = [i for i, v in enumerate(valid_a) if v]
    ib = [j for j, v in enumerate(valid_b) if v]
    ca = [-1] * len(ends_a)
    cb = [-1] * len(ends_b)
    open_a: list[int] = []
    open_b: list[int] = []
    chunk = 0
    i = j = 0
    while i < len(ia) and j < len(ib):
        ea, eb = ends_a[ia[i]], ends_b[ib[j]]
        if ea < eb:
            open_a.append(ia[i]); i += 1
        elif eb < ea:
            open_b.append(ib[j]); j += 1
        else:
            open_a.append(ia[i]); open_b.append(ib[j]); i += 1; j += 1
            for t in open_a:
                ca[t] = chunk
            for t in open_b:
                cb[t] = chunk
            open_a, open_b = [], []
            chunk += 1
    return ca, cb, chunk


def position_chunks(token_chunks: np.ndarray) -> np.ndarray:
    """Chunk of the *prediction* made at each position: position p predicts token p+1.

    Args:
        token_chunks: ``(B, L)`` chunk id per token (``-1`` none).

    Returns:
        ``(B, L)`` chunk id per logits position; the last position predicts nothing (``-1``).
    """
    out = np.full_like(token_chunks, -1)
    out[:, :-1] = token_chunks[:, 1:]
    return out


def exact_chunks(al: ChunkAlignment, ids_a: np.ndarray, ids_b: np.ndarray, surfaces_a, surfaces_b) -> np.ndarray:
    """``(C,)`` bool: chunks made of one token on each side with identical canonical bytes.

    These are the chunks where both sides predict the same event (the X-Token reference's
    ``exact_token_match_only`` pairs); in a chunk like ``Konfiguration`` = ``▁Konfiguration`` (teacher)
    against ``ĠKon`` + ``fig`` + ``uration`` (student) the two next-token distributions are over
    different events.

    Args:
        al: the alignment of the batch.
        ids_a, ids_b: ``(B, La)`` / ``(B, Lb)`` token ids of the two sides (the tokens ``al`` aligned).
        surfaces_a, surfaces_b: canonical surfaces per id (``Vocabulary.surfaces``).
    """
    C = al.n_chunks
    out = np.zeros(C, dtype=bool)
    if C == 0:
        return out
    ca, cb = al.chunk_a.reshape(-1), al.chunk_b.reshape(-1)
    ia, ib = np.asarray(ids_a).reshape(-1), np.asarray(ids_b).reshape(-1)
    na = np.bincount(ca[ca >= 0], minlength=C)
    nb = np.bincount(cb[cb >= 0], minlength=C)
    tok_a = np.full(C, -1, dtype=np.int64)
    tok_b = np.full(C, -1, dtype=np.int64)
    tok_a[ca[ca >= 0]] = ia[ca >= 0]
    tok_b[cb[cb >= 0]] = ib[cb >= 0]
    for c in np.flatnonzero((na == 1) & (nb == 1)):
        out[c] = surfaces_a[tok_a[c]] == surfaces_b[tok_b[c]]
    return out
