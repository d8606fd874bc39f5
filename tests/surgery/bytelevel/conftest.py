"""Fixtures of the byte-level tests: a brute-force reference for byte-level probabilities.

Enumerates every token sequence whose surfaces spell a prefix of the byte string
(all ids, duplicates included), runs the model on each sequence from scratch (no
KV cache, no tree attention) and sums the last token in closed form over the
whole vocabulary with plain ``startswith`` tests. The canonical variant filters
the sequences with the Hugging Face tokenizer itself: the text before the start
of the last pre-token piece (from the tokenizer's ``word_ids``) must be the
tokenizer's encoding of those pieces, the first token of the piece must encode
to itself and every adjacent pair inside the piece must encode to the pair, or
meet at an offset where appending one probe character opens a new piece (and
the right token encodes to itself).

Byte-fallback pieces (``<0xNN>``, found by their token strings): a run of them that
spells a whole character of the text is one unit (judged like a token: encoding
the character must give exactly those pieces), and a character that is a piece of
the vocabulary is never spelled with them, neither inside a node nor as the last
token (judged on the bytes up to that token); pieces of a character not yet
complete pass.
"""

from __future__ import annotations

import functools
import re

import pytest

import numpy as np
import torch

from helpers import gpt2_bytes_to_unicode
from surgery.bytelevel.validity import PROBES  # the probe characters are part of the definition


_GPT2_BYTES = gpt2_bytes_to_unicode()


class BruteForce:
    def __init__(self, model, tokenizer, surfaces, start_id: int, dummy_prefix: bool = False):
        self.model = model
        self.tok = tokenizer
        self.start_id = start_id
        self.dummy = dummy_prefix
        n_out = model.get_output_embeddings().weight.shape[0]
        self.surf = list(surfaces[:n_out]) + [None] * max(0, n_out - len(surfaces))
        self.by_surface: dict[bytes, list[int]] = {}
        for i, s in enumerate(self.surf):
            if s:
                self.by_surface.setdefault(s, []).append(i)
        self.special = np.array([s is None for s in self.surf])
        self._lp = {}
        names = tokenizer.convert_ids_to_tokens(list(range(min(len(self.surf), len(tokenizer)))))
        self.fallback = {i: int(t[3:5], 16) for i, t in enumerate(names)
                         if t and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)}
        self.piece_set = {s for i, s in enumerate(self.surf) if s and i not in self.fallback}

    # -- model ---------------------------------------------------------------------------------
    def prefetch(self, seqs, chunk: int = 64) -> None:
        """Evaluate every prefix of ``seqs`` from scratch, batched by length (plain causal forward)."""
        todo = {s[:i] for s in seqs for i in range(len(s) + 1)} - set(self._lp)
        by_len: dict[int, list] = {}
        for s in todo:
            by_len.setdefault(len(s), []).append(s)
        for group in by_len.values():
            for k in range(0, len(group), chunk):
                part = group[k:k + chunk]
                with torch.no_grad():
                    ids = torch.tensor([[self.start_id, *s] for s in part])
                    logits = self.model(ids, logits_to_keep=1).logits[:, -1].double()
                for s, row in zip(part, torch.log_softmax(logits, -1).numpy()):
                    self._lp[s] = row

    def logprobs(self, seq: tuple[int, ...]) -> np.ndarray:
        got = self._lp.get(seq)
        if got is None:
            with torch.no_grad():
                logits = self.model(torch.tensor([[self.start_id, *seq]])).logits[0, -1].double()
            got = self._lp[seq] = torch.log_softmax(logits, -1).numpy()
        return got

    def seq_logp(self, seq: tuple[int, ...]) -> float:
        return sum(float(self.logprobs(seq[:i])[t]) for i, t in enumerate(seq))

    @functools.cached_property
    def _matrix(self) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(s) for s in self.surf if s)
        mat = np.zeros((len(self.surf), width), dtype=np.int16)
        lens = np.zeros(len(self.surf), dtype=np.int64)
        for i, s in enumerate(self.surf):
            if s:
                mat[i, : len(s)] = list(s)
                lens[i] = len(s)
        return mat, lens

    @functools.lru_cache(maxsize=None)
    def _starts(self, piece: bytes) -> np.ndarray:
        """Ids whose surface starts with ``piece``."""
        mat, lens = self._matrix
        k = len(piece)
        if k > mat.shape[1]:
            return np.zeros(len(lens), dtype=bool)
        return (lens >= k) & (mat[:, :k] == np.frombuffer(piece, dtype=np.uint8)).all(axis=1)

    @functools.lru_cache(maxsize=None)
    def _byte_at(self, j: int) -> np.ndarray:
        """Byte ``j`` of every surface, 256 where the surface is not longer."""
        mat, lens = self._matrix
        if j >= mat.shape[1]:
            return np.full(len(lens), 256)
        return np.where(lens > j, mat[:, j], 256)

    # -- enumeration ---------------------------------------------------------------------------
    def segmentations(self, data: bytes, first: int = 0):
        """All (end, tokens) with tokens spelling data[first:end], end ≤ len(data) (the empty one first)."""
        out = [(first, ())]
        stack = [(first, ())]
        while stack:
            m, seq = stack.pop()
            for e in range(m + 1, len(data) + 1):
                for t in self.by_surface.get(data[m:e], ()):
                    item = (e, seq + (t,))
                    out.append(item)
                    stack.append(item)
        return out

    # -- canonical filter (the Hugging Face tokenizer is the judge) -----------------------------
    @staticmethod
    def _char_spans(data: bytes) -> list[tuple[int, int, bool]]:
        """``(start, end, complete)`` of each character, parsing from the start; stray bytes alone."""
        out, i = [], 0
        while i < len(data):
            for L in (1, 2, 3, 4):
                try:
                    if len(data[i:i + L].decode("utf-8")) == 1:
                        out.append((i, i + L, True))
                        i += L
                        break
                except UnicodeDecodeError:
                    pass
            else:
                out.append((i, i + 1, False))
                i += 1
        return out

    def _fallback_ok(self, data: bytes, p: int) -> bool:
        """A byte-fallback piece may spell byte ``p`` of ``data`` (judged on ``data``)."""
        for s, e, complete in self._char_spans(data):
            if s <= p < e:
                return not (complete and data[s:e] in self.piece_set)
        raise AssertionError("position outside the data")

    def _units(self, data: bytes, B: int, seq) -> list[tuple[tuple[int, ...], bytes]] | None:
        """Split ``seq`` (spelling ``data[B:...]``) into units; ``None`` if a fallback piece is not allowed."""
        spans = {s: (e, c) for s, e, c in self._char_spans(data)}
        units, pos, k = [], B, 0
        while k < len(seq):
            t = seq[k]
            if t in self.fallback:
                if not self._fallback_ok(data, pos):
                    return None
                e, complete = spans.get(pos, (pos + 1, False))
                n = e - pos
                group = seq[k:k + n]
                if complete and n > 1 and len(group) == n and all(g in self.fallback for g in group):
                    units.append((tuple(group), data[pos:e]))
                    pos, k = e, k + n
                    continue
            units.append(((t,), self.surf[t]))
            pos += len(self.surf[t])
            k += 1
        return units

    def _judge(self, raw: bytes, ids: list[int]) -> bool:
        """Encoding ``raw`` gives ``ids``. Bytes that are not UTF-8 (part of a character): the BPE model
        alone on the raw bytes for a byte-level BPE; always for SentencePiece (characters not complete
        yet are judged once complete, by :meth:`_fallback_ok`)."""
        try:
            return self._enc_mid(raw) == ids
        except UnicodeDecodeError:
            if self.fallback:
                return True
            mapped = "".join(_GPT2_BYTES[b] for b in raw)
            return [t.id for t in self.tok.backend_tokenizer.model.tokenize(mapped)] == ids

    def _unit_first_ok(self, unit) -> bool:
        return self._judge(unit[1], list(unit[0]))

    def _unit_pair_ok(self, u, v) -> bool:
        return self._judge(u[1] + v[1], list(u[0]) + list(v[0]))

    def _enc(self, data: bytes) -> list[int]:
        text = data.decode("utf-8")
        if self.dummy:  # stream starts with the dummy-prefix space; encode without adding another
            assert text.startswith(" ")
            return self.tok(text[1:], add_special_tokens=False)["input_ids"]
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _enc_mid(self, data: bytes) -> list[int]:
        """Encoding of ``data`` in the middle of a text (a marker in front, then removed)."""
        if self.dummy:
            ids = self.tok("\n" + data.decode("utf-8"), add_special_tokens=False)["input_ids"]
            lead = self.tok("\n", add_special_tokens=False)["input_ids"]
            assert ids[: len(lead)] == lead
            return ids[len(lead):]
        return self.tok(data.decode("utf-8"), add_special_tokens=False)["input_ids"]

    def _word_starts(self, text: str) -> tuple[list[int], list[int], list[int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        words, offs = enc.word_ids(), enc["offset_mapping"]
        starts = [len(text[: o[0]].encode("utf-8")) for o in offs]
        return enc["input_ids"], words, starts

    def pieces(self, data: bytes) -> tuple[int, tuple[int, ...], set[int]]:
        """Start of the last piece, tokens of the pieces before it, offsets where a piece may open."""
        text = self._complete_text(data)  # an incomplete last character belongs to the last piece
        if not text or self.dummy:
            return 0, (), set()
        ids, words, starts = self._word_starts(text)
        first = words.index(words[-1])
        B = starts[first]
        splits = set()
        part = data[len(text.encode()):]
        probes = PROBES
        if part:  # the next character completes the partial one: probe with characters starting so
            need = 2 if part[0] < 0xE0 else 3 if part[0] < 0xF0 else 4
            probes = []
            for fill in (0x80, 0x90, 0xA0, 0xBF):
                try:
                    probes.append((part + bytes([fill]) * (need - len(part))).decode("utf-8"))
                except UnicodeDecodeError:
                    pass
        for probe in probes:
            _, w2, s2 = self._word_starts(text + probe)
            splits |= {s2[k] for k in range(1, len(w2)) if w2[k] != w2[k - 1] and B < s2[k] < len(data)}
        return B, tuple(ids[:first]), splits

    def _first_ok(self, t: int) -> bool:
        return self._enc_mid(self.surf[t]) == [t]

    def admitted(self, data: bytes, B: int, splits: set[int]):
        """Canonical nodes of prefix ``data`` after the trunk, inside the last piece.

        Returns:
            ``(end, tokens, used, ok)``: ``used`` the split points the node needs (a junction
            there that is not a valid pair), ``ok`` those where its next token can start a piece.
        """
        out = []
        for end, seq in self.segmentations(data, B):
            units = self._units(data, B, seq)
            if units is None:
                continue
            good = all(self._unit_first_ok(u) for u in units[:1])
            used, ok = set(), set()
            pos = B + (len(units[0][1]) if units else 0)
            for a, b in zip(units, units[1:]):
                pair = self._unit_pair_ok(a, b)
                first = pos in splits and self._unit_first_ok(b)
                if not (pair or first):
                    good = False
                    break
                if not pair:
                    used.add(pos)
                if first:
                    ok.add(pos)
                pos += len(b[1])
            if good:
                out.append((end, seq, used, ok))
        return out

    @staticmethod
    def _complete_text(data: bytes) -> str:
        """``data`` without a trailing incomplete character, as text."""
        for cut in range(4):
            try:
                return data[: len(data) - cut].decode("utf-8")
            except UnicodeDecodeError:
                pass
        raise AssertionError("not UTF-8")

    def decisions(self, data: bytes, B: int, points: list[int]) -> np.ndarray:
        """(257, len(points)): 1 a piece opens there after this byte, 0 it cannot any more, 2 undecided."""
        out = np.full((257, len(points)), 2)
        out[256] = 0
        if self._complete_text(data).encode() != data:
            return out  # a byte inside a character decides nothing yet
        for b in range(128):
            text = data.decode("utf-8") + chr(b)
            _, words, starts = self._word_starts(text)
            opens = {starts[k] for k in range(1, len(words)) if words[k] != words[k - 1]}
            later = set()
            for probe in PROBES:
                _, w2, s2 = self._word_starts(text + probe)
                later |= {s2[k] for k in range(1, len(w2)) if w2[k] != w2[k - 1]}
            out[b] = [1 if p in opens else 2 if p in later else 0 for p in points]
        return out

    # -- next-byte distributions ---------------------------------------------------------------
    def next_bytes(self, data: bytes, mode: str) -> np.ndarray:
        """(257,) probabilities of the next byte (256 = end of text) after the stream ``data``."""
        n = len(data)
        if mode == "exact":
            trunk, nodes, points = (), [(e, q, set(), set()) for e, q in self.segmentations(data)], []
        else:
            B, trunk, splits = self.pieces(data)
            nodes = self.admitted(data, B, splits)
            points = sorted(splits)
        decisions = self.decisions(data, B, points) if points else None
        self.prefetch([trunk + seq for _, seq, _, _ in nodes])
        base = self.seq_logp(trunk)
        dist = np.zeros(257)
        total = 0.0  # Q(data) in exact mode
        for end, seq, used, ok in nodes:
            full = trunk + seq
            w = np.exp(self.seq_logp(full) - base)
            p = np.exp(self.logprobs(full))
            row = np.zeros(257)
            if end == n:
                row[:256] = np.bincount(self._byte_at(0)[~self.special], weights=p[~self.special],
                                        minlength=257)[:256]
                row[256] = p[self.special].sum()
                if mode == "canonical":  # last token: no fallback piece completing a vocabulary character
                    for t, b in self.fallback.items():
                        if not self._fallback_ok(data + bytes([b]), n):
                            row[b] -= p[t]
                total += w
            else:
                sel = self._starts(data[end:])
                row[:256] = np.bincount(self._byte_at(n - end)[sel], weights=p[sel], minlength=257)[:256]
                longer = sel & (self._byte_at(n - end) < 256)
                total += w * p[longer].sum()
            if decisions is not None:
                for b in range(257):
                    fits = all((d != 1 or end == q or q in ok) and (d != 0 or q not in used)
                               for q, d in zip(points, decisions[b]))
                    if not fits:
                        row[b] = 0.0
            dist += w * row
        if mode == "exact":
            return dist / total
        return dist / dist.sum()

    def prefix_logprob_exact(self, data: bytes) -> float:
        """log P(text starts with data) = log Σ over all cover encodings."""
        n = len(data)
        q = 0.0
        segs = self.segmentations(data)
        self.prefetch([seq for _, seq in segs])
        for end, seq in segs:
            if end == n and seq:
                continue  # counted as the last token of its parent
            if end == n:
                return 0.0
            p = np.exp(self.logprobs(seq))
            q += np.exp(self.seq_logp(seq)) * p[self._starts(data[end:])].sum()
        return float(np.log(q))


@pytest.fixture(scope="session")
def brute_force():
    """The :class:`BruteForce` class (``brute_force(model, tokenizer, surfaces, start_id, dummy_prefix)``)."""
    return BruteForce
