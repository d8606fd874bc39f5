"""Which token sequences a tokenizer can produce: pre-token pieces and pairwise validity.

``canonical`` mode of :class:`~surgery.bytelevel.bytelm.ByteLM` admits only
encodings the tokenizer could have produced. This module answers the three
questions that definition needs, for one tokenizer:

- :meth:`Canonicalizer.encode`: the deterministic encoding of a byte string as it
  appears mid-text (the *trunk*: everything before the last pre-token boundary);
- :meth:`Canonicalizer.last_piece`: the byte offset where the last pre-token
  piece of a prefix starts and the tokens of the pieces before it (pieces come
  from the tokenizer's own pre-tokenizer and added-token matching, as reported
  by its ``word_ids``); :meth:`Canonicalizer.split_points`: where a continuation
  can still open a new piece inside the last one;
- :meth:`Canonicalizer.pair_valid` / :meth:`Canonicalizer.first_valid`: whether
  two adjacent tokens inside one piece are a pair the tokenizer can emit —
  encoding their joined bytes gives exactly ``[a, b]`` (ByteSampler's pairwise
  check; for BPE, a sequence inside one pre-token is canonical iff all its
  adjacent pairs are) — and whether a token can start a piece (encoding its own
  bytes gives ``[a]``).

The checks run a copy of the tokenizer without post-processor, dummy prefix or
Unicode normalizer (NFC, lower-casing, ...): the byte-level LM works on the raw
bytes of the text, so two encodings that normalize alike are kept distinct.
For a Llama-3 style BPE with ``ignore_merges`` a pair also counts as valid when
the merges alone produce it (a longer piece may continue past the pair).
Pairs whose joined bytes are not valid UTF-8 (a token holding part of a
character) are checked by the BPE model on the raw bytes (byte-level BPE) or by
the UTF-8 structure of byte-fallback tokens (SentencePiece).

A SentencePiece tokenizer with byte fallback spells a character with ``<0xNN>``
pieces only when the character is not a piece of its vocabulary:
:meth:`Canonicalizer.fallback_allowed` rejects a byte-fallback token that
completes a character of the vocabulary, and :meth:`Canonicalizer.banned_at`
lists the byte-fallback tokens that may not come next (the last token of a cover
encoding). Single-byte characters follow the core's emitted ids
(:attr:`~surgery.vocab.surfaces.Vocabulary.is_emitted`): canonical mode never uses
an id the tokenizer does not emit.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from tokenizers import Tokenizer

from surgery.errors import SurgeryError
from surgery.vocab.surfaces import BYTE_LEVEL, SENTENCEPIECE, Vocabulary, backend_json, gpt2_byte_decoder

LOG = logging.getLogger(__name__)

# One character per class the pre-tokenizer regexes distinguish (letter, upper case, digit,
# punctuation, apostrophe, space, newline, CJK): appended to a prefix, they reveal where a
# continuation can open a new piece inside the last one (see Canonicalizer.split_points).
PROBES = ("a", "A", "1", ".", "'", " ", "\n", "中")

_UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents", "BertNormalizer",
                        "Prepend", "Precompiled"}


def _strip_normalizer(node):
    """Drop Unicode / dummy-prefix normalizers; keep plain replacements (``" "`` → ``"▁"``)."""
    if node is None:
        return None
    if node.get("type") == "Sequence":
        kept = [n for n in (_strip_normalizer(x) for x in node.get("normalizers", [])) if n is not None]
        return {"type": "Sequence", "normalizers": kept} if kept else None
    if node.get("type") in _UNICODE_NORMALIZERS:
        return None
    if node.get("type") == "Replace" and "\\A" in json.dumps(node.get("pattern", {})):
        return None  # legacy SentencePiece emulation of the dummy prefix ("\A▁" → "▁▁")
    return node


def _normalizer_from(spec: dict | None):
    """A ``tokenizers`` normalizer object from its JSON description (``None`` stays ``None``)."""
    if spec is None:
        return None
    from tokenizers import normalizers

    obj = normalizers.Sequence([])
    obj.__setstate__(json.dumps(spec).encode("utf-8"))
    return obj


def _walk(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def checker_json(j: dict) -> dict:
    """Tokenizer JSON that encodes raw bytes mid-text: no post-processor, dummy prefix or normalizer.

    ``j`` is modified in place and returned.
    """
    j["post_processor"] = None
    j["truncation"] = None
    j["padding"] = None
    j["normalizer"] = _strip_normalizer(j.get("normalizer"))
    for node in _walk(j.get("pre_tokenizer")):
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            node.pop("add_prefix_space", None)
        elif node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
    return j


def _pre_tokenizer_splits(j: dict) -> bool:
    """Whether the pre-tokenizer or added-token matching can cut a text into several pieces."""
    if any(not a.get("special", False) for a in j.get("added_tokens", [])):
        return True
    for node in _walk(j.get("pre_tokenizer")):
        t = node.get("type")
        if t == "Metaspace" and node.get("split", True) is False:
            continue
        if t == "ByteLevel" and not node.get("use_regex", True):
            continue
        if t in ("Sequence", None):
            continue
        return True
    return False


def utf8_complete_len(data: bytes) -> int:
    """Length of ``data`` without a trailing incomplete UTF-8 sequence (which later bytes may complete)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:
            return n
        if b >= 0xC0:  # lead byte: complete iff the sequence it announces is all there
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return n if back >= need else n - back
    return n


def completions(part: bytes) -> tuple[str, ...]:
    """A few characters that start with the incomplete UTF-8 sequence ``part`` (probes for split points)."""
    lead = part[0]
    need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    out = []
    for fill in (0x80, 0x90, 0xA0, 0xBF):
        try:
            c = (part + bytes([fill]) * (need - len(part))).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if c not in out:
            out.append(c)
    return tuple(out)


def completed_char(data: bytes, end: int) -> bytes | None:
    """The character whose last byte is ``data[end-1]``, if ``data[:end]`` ends with a whole valid one."""
    for back in range(1, min(4, end) + 1):
        b = data[end - back]
        if 0x80 <= b < 0xC0:
            continue  # a continuation byte: the lead is further back
        need = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
        if need != back:
            return None
        char = data[end - back:end]
        try:
            char.decode("utf-8")
        except UnicodeDecodeError:
            return None
        return char
    return None


_NO_IDS = np.zeros(0, dtype=np.int64)


def split_utf8(data: bytes) -> list[tuple[bool, bytes]]:
    """Maximal valid-UTF-8 runs ``(True, run)`` and single invalid bytes ``(False, byte)``."""
    out: list[tuple[bool, bytes]] = []
    i, n = 0, len(data)
    while i < n:
        try:
            data[i:].decode("utf-8")
            out.append((True, data[i:]))
            break
        except UnicodeDecodeError as e:
            if e.start > 0:
                out.append((True, data[i:i + e.start]))
            for k in range(i + e.start, i + max(e.end, e.start + 1)):
                out.append((False, data[k:k + 1]))
            i += max(e.end, e.start + 1)
    return out


class Canonicalizer:
    """Pieces, canonical encoding and pairwise validity for one tokenizer (see module docstring).

    Args:
        tokenizer: a Hugging Face fast tokenizer (byte-level BPE or SentencePiece).
        vocab: its :func:`~surgery.vocab.surfaces.canonical_vocabulary` (built if omitted).

    Raises:
        SurgeryError: the tokenizer is WordPiece (not a generative tokenizer).
    """

    def __init__(self, tokenizer, vocab: Vocabulary | None = None):
        from surgery.vocab.surfaces import canonical_vocabulary

        self.vocab = vocab if vocab is not None else canonical_vocabulary(tokenizer)
        if self.vocab.family not in (BYTE_LEVEL, SENTENCEPIECE):
            raise SurgeryError(f"byte-level conversion needs a byte-level BPE or SentencePiece tokenizer, got "
                               f"{self.vocab.family}", "use the tokenizer of a causal LM")
        self.byte_level = self.vocab.family == BYTE_LEVEL
        raw = self.vocab.raw_encoder
        if raw is not None:  # the core's mid-text encoder: no post-processor, no dummy prefix
            self._tok = Tokenizer.from_str(raw.to_str())
            state = self._tok.normalizer.__getstate__() if self._tok.normalizer is not None else None
            norm = _strip_normalizer(json.loads(state)) if state else None
            if state and norm != json.loads(state):
                self._tok.normalizer = _normalizer_from(norm)
            pre = json.loads(self._tok.pre_tokenizer.__getstate__()) if self._tok.pre_tokenizer is not None else None
            added = [{"special": a.special} for a in self._tok.get_added_tokens_decoder().values()]
            self.splits = _pre_tokenizer_splits({"pre_tokenizer": pre, "added_tokens": added})
            ignore = bool(getattr(self._tok.model, "ignore_merges", False))
            text = self._tok.to_str() if ignore else None
        else:
            j = checker_json(backend_json(tokenizer))
            self.splits = _pre_tokenizer_splits(j)
            self._tok = Tokenizer.from_str(json.dumps(j))
            ignore = bool(j.get("model", {}).get("ignore_merges"))
            text = json.dumps(j) if ignore else None
        self._tok.encode_special_tokens = True
        self._tok_merges = None
        if ignore:  # Llama-3: a whole piece found in the vocabulary skips the merges
            self._tok_merges = Tokenizer.from_str(text)
            self._tok_merges.model.ignore_merges = False
            self._tok_merges.encode_special_tokens = True
        self._byte_encoder = {b: c for c, b in gpt2_byte_decoder().items()}
        byte_ids = self.vocab.byte_token_ids
        self._byte_token_value = {int(i): b for b, i in enumerate(byte_ids) if i >= 0}
        # byte-fallback pieces of non-ASCII bytes (a SentencePiece piece is valid UTF-8: a lone
        # byte >= 0x80 can only be a <0xNN> piece)
        self.fallback_ids: frozenset[int] = frozenset() if self.byte_level else frozenset(
            int(i) for i in byte_ids[0x80:] if i >= 0)
        self._banned: dict[bytes, np.ndarray] = {}
        self._pairs: dict[tuple[int, int], bool] = {}
        self._firsts: dict[int, bool] = {}
        self._splits: dict[bytes, frozenset[int]] = {}
        self._decisions: dict = {}

    # -- canonical encoding ----------------------------------------------------------------
    def encode(self, data: bytes) -> list[int]:
        """Mid-text encoding of ``data``; invalid UTF-8 bytes become single-byte tokens."""
        ids: list[int] = []
        bt = self.vocab.byte_token_ids
        for ok, chunk in split_utf8(data):
            if ok:
                ids.extend(self._tok.encode(chunk.decode("utf-8"), add_special_tokens=False).ids)
            elif bt[chunk[0]] >= 0:
                ids.append(int(bt[chunk[0]]))
            else:
                raise SurgeryError(f"byte {chunk!r} has no token in this vocabulary",
                                   "use mode='exact' or a tokenizer with byte fallback")
        return ids

    def _pieces(self, text: str) -> tuple[list[int], list[int], list[int]]:
        """Encode ``text``: token ids, the word (piece) index of each token, each token's start (bytes)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        starts, last_c, last_b = [], 0, 0
        for c, _ in enc.offsets:  # char offsets → byte offsets, incrementally
            last_b += len(text[last_c:c].encode("utf-8"))
            last_c = c
            starts.append(last_b)
        return enc.ids, list(enc.word_ids), starts

    def last_piece(self, data: bytes, start: int = 0) -> tuple[int, list[int]]:
        """Start of the last pre-token piece of ``data``, and the tokens of the pieces before it.

        ``start`` must be a piece boundary of ``data`` (0, or an earlier answer for a
        shorter prefix of the same text): pre-tokenization restarts there, and the tokens
        returned are those of ``data[start:B]`` split into pieces as in ``data`` (which can
        differ from the encoding of ``data[start:B]`` alone: ``"\n\n"`` is one piece at the
        end of a text but two before a letter). A trailing incomplete character belongs to
        the last piece; an invalid byte is a piece of its own.

        Returns:
            ``(B, tokens)`` with ``B >= start``.
        """
        if not self.splits:
            return start, []
        window = data[start:]
        end = utf8_complete_len(window)
        if end == 0:
            return start, []
        runs = split_utf8(window[:end])
        offset = end - len(runs[-1][1])
        ok, text = runs[-1]
        head = self.encode(window[:offset]) if offset else []
        if not ok:
            return start + offset, head
        ids, words, starts = self._pieces(text.decode("utf-8"))
        if not ids:
            return start + offset, head
        first = words.index(words[-1])
        return start + offset + starts[first], head + ids[:first]

    def last_piece_start(self, data: bytes, start: int = 0) -> int:
        """Byte offset where the last pre-token piece of ``data`` starts (see :meth:`last_piece`)."""
        return self.last_piece(data, start)[0]

    def split_points(self, data: bytes, start: int) -> frozenset[int]:
        """Offsets inside the last piece ``data[start:]`` where a continuation can open a new piece.

        A piece boundary can appear inside the last piece when more text arrives (a run
        of spaces before a word gives up its last space: ``"a  "`` is pieces ``a|␣␣`` but
        ``"a  b"`` is ``a|␣|␣b``). The candidates are found by appending each character of
        :data:`PROBES` (one per character class the pre-tokenizers distinguish); when ``data``
        ends inside a character, by appending completions of that character instead (the
        next character can only be one of them: a newline probe would invent piece
        boundaries before every multi-byte character).

        Returns:
            Absolute offsets ``p`` with ``start < p < len(data)``.
        """
        if not self.splits:
            return frozenset()
        tail = data[start:]
        got = self._splits.get(tail)
        if got is None:
            end = utf8_complete_len(tail)
            limit = end if end < len(tail) else end - 1  # a partial character may start a new piece
            got = set()
            runs = split_utf8(tail[:end])
            if limit > 0 and runs and runs[-1][0]:
                offset = end - len(runs[-1][1])
                text = runs[-1][1].decode("utf-8")
                for probe in (PROBES if end == len(tail) else completions(tail[end:])):
                    _, words, starts = self._pieces(text + probe)
                    for k in range(1, len(words)):
                        if words[k] != words[k - 1] and 0 < offset + starts[k] <= limit:
                            got.add(offset + starts[k])
            got = self._splits[tail] = frozenset(got)
        return frozenset(start + p for p in got)

    def split_decisions(self, data: bytes, start: int, points: tuple[int, ...]) -> np.ndarray:
        """What each possible next byte makes of the split points of ``data``.

        Returns:
            ``(257, len(points))`` int8: 1 (*split*: a piece opens there), 0 (*join*: it no
            longer can) or 2 (*open*: still undecided); row 256 is end of text (all join).
            Bytes that do not complete a character leave every point open.
        """
        key = (data[start:], tuple(p - start for p in points))
        got = self._decisions.get(key)
        if got is None:
            got = np.full((257, len(points)), 2, dtype=np.int8)
            got[256] = 0
            tail = data[start:]
            decidable = bool(tail) and utf8_complete_len(tail) == len(tail) and split_utf8(tail)[-1][0]
            if decidable:  # a byte after an incomplete or invalid character decides nothing
                for b in range(128):
                    nxt = data + bytes([b])
                    _, words, starts = self._pieces(tail.decode("utf-8") + chr(b))
                    opens = {start + starts[k] for k in range(1, len(words)) if words[k] != words[k - 1]}
                    still = self.split_points(nxt, start)
                    got[b] = [1 if p in opens else 2 if p in still else 0 for p in points]
            self._decisions[key] = got
        return got

    # -- byte fallback -----------------------------------------------------------------------
    def fallback_allowed(self, data: bytes, end: int) -> bool:
        """Whether a byte-fallback token may spell byte ``data[end-1]`` (only ``data[:end]`` is read).

        False when that byte completes a character that is a piece of the vocabulary (the
        tokenizer never spells it with byte pieces); a lead or middle byte, or a byte of an
        invalid sequence, is allowed.
        """
        char = completed_char(data, end)
        return char is None or len(char) < 2 or char not in self.vocab.surface_to_id

    def banned_at(self, data: bytes, m: int) -> np.ndarray:
        """Byte-fallback ids that may not start at offset ``m`` (only ``data[:m]`` is read).

        They are the continuation bytes that would complete, with the incomplete character
        at the end of ``data[:m]``, a character of the vocabulary.

        Returns:
            Sorted int64 ids (empty for a byte-level BPE or at a character boundary).
        """
        if not self.fallback_ids:
            return _NO_IDS
        tail = data[max(0, m - 3):m]
        part = tail[utf8_complete_len(tail):]  # the incomplete character at the end, if any
        if not part:
            return _NO_IDS
        got = self._banned.get(part)
        if got is None:
            bt = self.vocab.byte_token_ids
            out = []
            for b in range(0x80, 0xC0):
                char = part + bytes([b])
                if bt[b] >= 0 and completed_char(char, len(char)) == char and char in self.vocab.surface_to_id:
                    out.append(int(bt[b]))
            got = self._banned[part] = np.asarray(sorted(out), dtype=np.int64)
        return got

    # -- validity ----------------------------------------------------------------------------
    def _encode_ids(self, texts: list[str]) -> list[list[list[int]]]:
        outs = [[e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]]
        if self._tok_merges is not None:
            outs.append([e.ids for e in self._tok_merges.encode_batch(texts, add_special_tokens=False)])
        return [list(v) for v in zip(*outs)]

    def _model_ids(self, data: bytes) -> list[list[int]]:
        s = "".join(self._byte_encoder[b] for b in data)
        outs = [[t.id for t in self._tok.model.tokenize(s)]]
        if self._tok_merges is not None:
            outs.append([t.id for t in self._tok_merges.model.tokenize(s)])
        return outs

    def _sp_bytes_valid(self, a: int | None, b: int) -> bool:
        """UTF-8 structure of byte-fallback tokens (the pair's bytes are not valid UTF-8)."""
        va = self._byte_token_value.get(a) if a is not None else None
        vb = self._byte_token_value.get(b)
        if vb is not None and 0x80 <= vb < 0xC0:  # continuation byte: must follow a lead/continuation byte token
            return va is not None and va >= 0x80
        if va is not None and va >= 0xC0:  # a lead byte must be followed by a continuation byte token
            return False
        return True

    def _check_raw(self, items: list[tuple[int | None, int]]) -> list[bool]:
        surf = self.vocab.surfaces
        out: list[bool | None] = [None] * len(items)
        texts, where = [], []
        for k, (a, b) in enumerate(items):
            data = (surf[a] if a is not None else b"") + surf[b]
            want = [a, b] if a is not None else [b]
            try:
                texts.append(data.decode("utf-8"))
                where.append((k, want))
            except UnicodeDecodeError:
                if self.byte_level:
                    out[k] = any(ids == want for ids in self._model_ids(data))
                else:
                    out[k] = self._sp_bytes_valid(a, b)
        if texts:
            for (k, want), encs in zip(where, self._encode_ids(texts)):
                out[k] = any(ids == want for ids in encs)
        return [bool(v) for v in out]

    def pairs_valid(self, pairs: list[tuple[int, int]]) -> list[bool]:
        """Pairwise validity of ``(left, right)`` token pairs inside one piece (cached, batched)."""
        todo = sorted({p for p in pairs if p not in self._pairs})
        if todo:
            for p, ok in zip(todo, self._check_raw(todo)):
                self._pairs[p] = ok
        return [self._pairs[p] for p in pairs]

    def pair_valid(self, a: int, b: int) -> bool:
        return self.pairs_valid([(a, b)])[0]

    def first_valid(self, t: int) -> bool:
        """Whether token ``t`` can start a piece: encoding its own bytes gives ``[t]``."""
        ok = self._firsts.get(t)
        if ok is None:
            ok = self._firsts[t] = self._check_raw([(None, t)])[0]
        return ok
