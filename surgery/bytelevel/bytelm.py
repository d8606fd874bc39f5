"""A token LM seen as a language model over bytes.

Definitions (the model ``p`` is conditioned on the document-start token of
:func:`surgery.evaluate.document_start_id`; probabilities are its raw softmax):

- The *stream* of a text is its UTF-8 bytes, with one leading space for a
  SentencePiece tokenizer that adds a dummy prefix (Llama-2, Mistral v1); that
  space is conditioned on, never scored.
- A *cover encoding* of a byte string ``x`` is a token sequence ``t1..tk`` whose
  first ``k-1`` tokens decode to a proper prefix of ``x`` and whose last token
  reaches or passes the end of ``x``. A token without bytes (end-of-sequence and
  every other special token, or an id the tokenizer does not define) ends the
  text: its probability goes to end-of-text.
- ``exact`` mode: ``P(x) = Σ p(t1..tk)`` over all cover encodings, the true
  marginal of the token LM over byte strings; ``P(b | x) = P(x·b) / P(x)`` for the
  256 bytes and end-of-text, which sum to 1 without any renormalization.
  Exponential in the text length (a tree of every segmentation): for short texts.
- ``canonical`` mode (default): only encodings the tokenizer can produce, the
  valid covering tree of ByteSampler. For a prefix ``x`` let ``B`` be the start of
  its last pre-token piece (the tokenizer's own pre-tokenizer and added-token
  matching applied to ``x``). A cover encoding of ``x·b`` is admitted when it is:
  the tokens of the pieces of ``x`` before ``B`` (deterministic: the tokenizer's
  encoding of each piece); then tokens spelling ``x[B:m]`` whose first token can
  start a piece (encoding its bytes gives itself) and whose adjacent pairs are
  valid (encoding the pair's bytes gives the pair: :mod:`surgery.bytelevel.validity`);
  then one last token, unconstrained, whose bytes start with ``x[m:]·b``. Ids the
  tokenizer never emits (byte-fallback twins of pieces,
  :attr:`~surgery.vocab.surfaces.Vocabulary.is_emitted`) are never used, and a
  byte-fallback token (``<0xNN>``) never completes a character that is a piece of
  the vocabulary, judged on the bytes up to that token (last token included). At a
  *split point* (an offset inside the last piece where one more character can
  open a new piece: a run of spaces gives up its last space to a following word,
  :meth:`~surgery.bytelevel.validity.Canonicalizer.split_points`) a token that can
  start a piece may also follow, and each reading counts only for the bytes ``b``
  that agree with it. End of text (``b = 256``) takes the admitted encodings of
  exactly ``x`` times the probability of the tokens without bytes. With ``Q(x·b)``
  the sum of ``p`` over the admitted encodings, ``P(b | x) = Q(x·b) / Σ_b' Q(x·b')``:
  renormalized at every byte, so the 257 probabilities sum to 1, and ``logprob``
  is the sum of the log-probabilities of the bytes.

:meth:`ByteLM.next_byte_logprobs` and :meth:`ByteLM.generate` keep the live
branches of the covering tree in one KV cache (:class:`~surgery.bytelevel.treeattn.PathCache`);
a forward pass, when one is needed, also evaluates the nodes along the likeliest
next tokens, so generation needs well under one pass per byte. :meth:`ByteLM.logprob` scores a whole text on
its canonical tokenization with the branches attached by tree attention
(:mod:`surgery.bytelevel.scoring`), with the windowing of :mod:`surgery.evaluate`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from surgery.bytelevel.cover import CoverTree, TokenIndex
from surgery.bytelevel.masses import NodeMasses, as_numpy
from surgery.bytelevel.treeattn import PathCache
from surgery.bytelevel.validity import Canonicalizer
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

MODES = ("canonical", "exact")
EOT = 256


@dataclass
class _State:
    """The covering tree of the current prefix and its place in the KV cache."""

    z: bytes
    start: int
    root_path: list[int]
    tree: CoverTree
    root_slot: int = 0
    slots: dict = field(default_factory=dict)  # tree node -> cache slot
    logp: list = field(default_factory=list)  # tree node -> log p(node | root), None until known


def sample_index(logprobs: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> int:
    """Draw an index from log-probabilities (for bytes: one of 257 outcomes, 256 = end of text).

    ``temperature == 0`` is greedy; ``top_p < 1`` keeps the smallest set of outcomes whose
    probability reaches ``top_p``.
    """
    lp = logprobs.double().cpu()
    if temperature <= 0:
        return int(torch.argmax(lp))
    p = torch.softmax(lp / temperature, dim=-1)
    if top_p < 1.0:
        srt, idx = torch.sort(p, descending=True)
        keep = torch.cumsum(srt, 0) - srt < top_p
        keep[0] = True
        mask = torch.zeros_like(p, dtype=torch.bool)
        mask[idx[keep]] = True
        p = torch.where(mask, p, torch.zeros_like(p))
        p = p / p.sum()
    return int(torch.multinomial(p, 1, generator=generator))


class ByteLM:
    """Byte-level view of a causal token LM (see module docstring for the definitions).

    Args:
        model: a Hugging Face causal LM (eval mode, any device).
        tokenizer: its fast tokenizer (byte-level BPE, or SentencePiece with byte fallback).
        mode: ``"canonical"`` (default) or ``"exact"``.
        max_length: context window (tokens) of :meth:`logprob`, as in :func:`surgery.evaluate.bits_per_byte`.
        stride: new trunk tokens per scoring window (default ``max_length // 2``).
        batch_size: rows per LM-head batch when scoring.
        max_nodes: limit on covering-tree nodes (exact mode grows exponentially).
        canon: a :class:`~surgery.bytelevel.validity.Canonicalizer` of this tokenizer to share
            (building one reads the whole vocabulary).
        speculate: when :meth:`next_byte_logprobs` needs a forward pass, also evaluate the
            tree nodes along this many of the likeliest next tokens, so that the following
            bytes usually need none (0 = off; results are identical either way).

    Raises:
        SurgeryError: unknown mode, a WordPiece tokenizer, a tokenizer without BOS/EOS,
            or a model whose output layer is smaller than the vocabulary.
    """

    def __init__(self, model, tokenizer, mode: str = "canonical", *, max_length: int = 1024,
                 stride: int | None = None, batch_size: int = 64, max_nodes: int = 200_000,
                 canon: Canonicalizer | None = None, speculate: int = 4):
        from surgery.evaluate import document_start_id

        if mode not in MODES:
            raise SurgeryError(f"unknown byte-level mode {mode!r}", f"choose one of: {', '.join(MODES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.mode = mode
        self.canon = canon if canon is not None else Canonicalizer(tokenizer)
        self.vocab = self.canon.vocab
        n_out = model.get_output_embeddings().weight.shape[0]
        defined = sum(1 for s in self.vocab.surfaces[n_out:] if s is not None)
        if defined:
            raise SurgeryError(f"the model's output layer has {n_out} rows but the tokenizer defines {defined} "
                               "more tokens", "use the tokenizer that belongs to this checkpoint")
        # canonical mode never uses an id the tokenizer does not emit (byte-fallback twins)
        self.index = TokenIndex(self.vocab, n_out, keep=self.vocab.is_emitted if mode == "canonical" else None)
        start = document_start_id(tokenizer)
        if start is None:
            raise SurgeryError("the tokenizer has neither BOS nor EOS to condition the first byte on",
                               "set tokenizer.bos_token (or eos_token)")
        self.start_id = start
        max_pos = getattr(model.config, "max_position_embeddings", None)
        self.max_positions = int(max_pos) if max_pos else None
        self.max_length = min(max_length, self.max_positions) if self.max_positions else max_length
        self.stride = stride
        self.batch_size = batch_size
        self.max_nodes = max_nodes
        self.speculate = speculate
        self.cache = PathCache(model, start)
        self._state: _State | None = None

    # -- streams ------------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Bytes of the stream before the text (1 for a dummy-prefix space, else 0)."""
        return 1 if self.vocab.dummy_prefix else 0

    def stream(self, data: bytes) -> bytes:
        return b" " + data if self.vocab.dummy_prefix else data

    @property
    def forwards(self) -> int:
        """Forward passes run by :meth:`next_byte_logprobs` / :meth:`generate` so far."""
        return self.cache.forwards

    # -- the covering tree of the current prefix -------------------------------------------
    def _new_state(self, z: bytes, start: int, root_path: list[int], splits=frozenset()) -> _State:
        tree = CoverTree(self.index, self.canon if self.mode == "canonical" else None, start, self.max_nodes,
                         splits=splits)
        tree.extend(z)
        return _State(z, start, root_path, tree, logp=[None] * len(tree))

    def _state_for(self, z: bytes) -> tuple[_State, frozenset]:
        """The covering tree of prefix ``z`` (reusing the previous one when ``z`` extends it), and its split points."""
        st = self._state
        canonical = self.mode == "canonical"
        if st is not None and z.startswith(st.z):
            if len(z) > len(st.z):
                start, head = self.canon.last_piece(z, st.start) if canonical else (0, [])
                if start == st.start:
                    st.tree.extend(z)
                    st.z = z
                    st.logp.extend([None] * (len(st.tree) - len(st.logp)))
                else:
                    st = self._state = self._new_state(z, start, st.root_path + head)
        else:
            start, head = self.canon.last_piece(z, 0) if canonical else (0, [])
            st = self._state = self._new_state(z, start, head)
        splits = self.canon.split_points(z, st.start) if canonical else frozenset()
        if splits != st.tree.splits:  # where a piece may open has changed: rebuild the tail
            st = self._state = self._new_state(z, st.start, st.root_path, splits)
        return st, splits

    def _evaluate(self, st: _State, live: list[int]) -> None:
        """Log-probability rows for the live nodes; log-probabilities for them and their ancestors."""
        tree = st.tree
        need = set(live)
        for i in live:
            while i > 0 and st.logp[i] is None:
                i = tree.parent[i]
                need.add(i)
        st.logp[0] = 0.0
        nodes = sorted(need)
        total = len(st.root_path) + max(tree.depth[i] for i in nodes) + 1
        if self.max_positions and total > self.max_positions:
            raise SurgeryError(f"the prefix needs {total} positions, more than the model's {self.max_positions}",
                               "shorten the prompt (ByteLM.logprob scores long texts with windows)")
        cache = self.cache
        root = cache.find(st.root_path)
        want_root = 0 in need
        others = [i for i in nodes if i != 0]
        tails = [tree.path(i) for i in others]
        found = [cache.find(p, root) if root is not None else None for p in tails]
        if root is None or (want_root and root not in cache.logp) or any(f is None or f not in cache.logp
                                                                          for f in found):
            # a forward pass is needed: add the nodes the likeliest next tokens would create
            spec = self._speculate(st, live) if self.speculate else []
            paths = [st.root_path] + [st.root_path + p for p in tails] + [st.root_path + p for p in spec]
            slots = cache.ensure(paths, [want_root] + [True] * (len(tails) + len(spec)))
            base, found = slots[0], slots[1:1 + len(tails)]
        else:
            base = root
        st.root_slot = base
        st.slots = dict(zip(others, found))
        st.slots[0] = base
        for i in nodes:
            if st.logp[i] is None:
                p = tree.parent[i]
                st.logp[i] = st.logp[p] + float(self.cache.logp[st.slots[p]][tree.token[i]])
        self.cache.trim(st.slots.values())
        if len(self.cache) > 4 * (len(st.root_path) + len(tree)) + 4096:
            remap = self.cache.compact(list(st.slots.values()))
            st.root_slot = remap[st.root_slot]
            st.slots = {i: remap[s] for i, s in st.slots.items()}

    def _speculate(self, st: _State, live: list[int]) -> list[list[int]]:
        """Tail paths the likeliest next tokens of the evaluated live nodes would add to the tree.

        Evaluated in the same forward pass as the nodes that are needed now (nearly free: the
        weights are read once), they let the next bytes along those tokens skip the model.
        """
        tree, z, n = st.tree, st.z, len(st.z)
        cands = []
        rows = {i: self.cache.logp.get(self.cache.find(tree.path(i), self.cache.find(st.root_path) or 0))
                for i in live if st.logp[i] is not None}
        known = [i for i in rows if rows[i] is not None]
        if not known:
            return []
        ref = max(st.logp[i] for i in known)
        for i in known:
            m = tree.end[i]
            lo, hi = self.index.range(z[m:n]) if m < n else (0, len(self.index.sorted))
            if lo == hi:
                continue
            ids = self.index.order[lo:hi]
            lp = as_numpy(rows[i])[ids]
            top = np.argsort(lp)[-self.speculate:]
            w = math.exp(st.logp[i] - ref)
            for k in top:
                t = int(ids[k])
                if len(self.vocab.surfaces[t]) > n - m:
                    cands.append((w * math.exp(float(lp[k])), m, t))
        cands.sort(reverse=True)
        paths, seen = [], set()
        for score, m, t in cands[: self.speculate]:
            if score < 1e-3:
                break
            trial = tree.copy()
            trial.extend(z + self.vocab.surfaces[t][n - m:n - m + 16])
            for j in range(len(tree), len(trial)):
                p = tuple(trial.path(j))
                if p not in seen:
                    seen.add(p)
                    paths.append(list(p))
        return paths

    # -- public API ---------------------------------------------------------------------
    @torch.no_grad()
    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        """Log-probabilities of the next byte after ``prefix``.

        Returns:
            ``(257,)`` float64 tensor; index 256 is end of text.

        Raises:
            SurgeryError: no admitted encoding covers the prefix (canonical mode), or the
                prefix is longer than the model's context.
        """
        dist, norm, _ = self._next_masses(prefix)
        with np.errstate(divide="ignore"):
            return torch.from_numpy(np.log(dist) - math.log(norm))

    @torch.no_grad()
    def next_byte_masses(self, prefix: bytes) -> tuple[np.ndarray, float, list[int]]:
        """The unnormalized next-byte masses after ``prefix`` and what renormalization divides them by.

        ``Q(prefix·b)``, the mass of the admitted encodings of ``prefix·b`` (the numerators of
        :meth:`next_byte_logprobs`), and their sum ``N``, both relative to the root of the
        prefix's covering tree: the tokens before the last pre-token piece (canonical mode; the
        start of the text in exact mode), which are a prefix of the text's own tokenization.
        In exact mode ``N`` equals the mass of ``prefix`` itself; in canonical mode the mass
        of ``prefix`` the tree held one byte earlier (its numerator then, divided by the
        probability of the tokens its root gained since) exceeds ``N`` by what the rule took
        away: other segmentations of a finished piece, pairs the tokenizer never emits,
        byte-fallback spellings of characters the vocabulary has.

        Returns:
            ``(log Q (257,), log N, root)``: natural logs, index 256 end of text; ``root`` the root's tokens.
        """
        dist, norm, ref = self._next_masses(prefix)
        with np.errstate(divide="ignore"):
            return np.log(dist) + ref, math.log(norm) + ref, list(self._state.root_path)

    def _next_masses(self, prefix: bytes) -> tuple[np.ndarray, float, float]:
        """``(257,)`` next-byte masses and their normalizer, both divided by ``exp(ref)``, and ``ref``
        (log, relative to the root of the covering tree)."""
        z = self.stream(bytes(prefix))
        st, splits = self._state_for(z)
        n = len(z)
        tree = st.tree
        live = tree.live(splits)
        self._evaluate(st, live)
        ref = max(st.logp[i] for i in live)
        points = tuple(sorted(splits))
        decisions = self.canon.split_decisions(z, st.start, points) if points else None
        canonical = self.mode == "canonical"
        dist = np.zeros(257)
        norm = 0.0
        for i in live:
            w = math.exp(st.logp[i] - ref)
            m = tree.end[i]
            banned = self.canon.banned_at(z, n) if m == n and canonical else None
            nm = NodeMasses(as_numpy(self.cache.logp[st.slots[i]]), self.index, z, m, n - m, banned)
            if decisions is not None:  # the next byte decides whether pieces open at the split points
                row = np.zeros(257)
                if m == n:
                    row += nm.next_bytes(0)
                else:
                    row[:256] = nm.next_bytes(n - m)
                dist += w * row * tree.consistency_mask(i, points, decisions)
            elif m == n:
                dist += w * nm.next_bytes(0)
                norm += w * nm.Z0
            else:
                dist[:256] += w * nm.next_bytes(n - m)
                norm += w * (nm.M[-1] - nm.E[-1])
        if decisions is not None:
            norm = float(dist.sum())
        if norm <= 0:
            raise SurgeryError("no admitted encoding covers this prefix", "use mode='exact'")
        return dist, norm, ref

    @torch.no_grad()
    def generate(self, prefix: bytes = b"", max_bytes: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, stop: bytes | None = None) -> bytes:
        """Sample bytes after ``prefix`` until end of text, ``stop`` or ``max_bytes``.

        Returns:
            The generated bytes (without the prefix; may end inside a UTF-8 character).
        """
        return generate_bytes(self.next_byte_logprobs, prefix, max_bytes, temperature, top_p, seed, stop)

    def logprob(self, data: bytes) -> float:
        """Natural log of the probability that a text starts with ``data`` (the prefix probability)."""
        from surgery.bytelevel.scoring import score

        return score(self, bytes(data)).logprob

    def byte_logprobs(self, data: bytes) -> torch.Tensor:
        """Next-byte log-probabilities after every prefix of ``data``: ``(len(data)+1, 257)`` float64."""
        from surgery.bytelevel.scoring import score

        return torch.from_numpy(score(self, bytes(data), full=True).dists)

    def bits_per_byte(self, text: str) -> float:
        """Bits per UTF-8 byte of ``text`` at byte level (comparable to :func:`surgery.evaluate.bits_per_byte`)."""
        data = text.encode("utf-8")
        if not data:
            raise SurgeryError("empty text", "pass a non-empty text")
        return -self.logprob(data) / math.log(2) / len(data)


def generate_bytes(next_fn, prefix: bytes, max_bytes: int, temperature: float, top_p: float, seed: int | None,
                   stop: bytes | None = None) -> bytes:
    """Sampling loop shared by :class:`ByteLM` and the ensembles."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = bytearray()
    prefix = bytes(prefix)
    for _ in range(max_bytes):
        b = sample_index(next_fn(prefix + bytes(out)), temperature, top_p, gen)
        if b == EOT:
            break
        out.append(b)
        if stop and bytes(out).endswith(stop):
            break
    return bytes(out)
