"""Cover encodings of a byte string: a prefix index over token surfaces and the covering tree.

A *cover encoding* of a byte string ``x`` is a token sequence whose tokens before
the last decode to a proper prefix of ``x`` and whose last token reaches or
passes the end of ``x``. Every cover encoding is a *node* (a token sequence
decoding to ``x[:m]``, ``m < len(x)``) followed by one token whose surface starts
with ``x[m:]``. :class:`CoverTree` enumerates the nodes; the last token is summed
in closed form from the node's next-token distribution with
:class:`TokenIndex` (all tokens whose surface starts with a given byte string
form one contiguous range of the surfaces sorted as bytes).
"""

from __future__ import annotations

import bisect
import logging

import numpy as np

from surgery.errors import SurgeryError
from surgery.vocab.surfaces import Vocabulary

LOG = logging.getLogger(__name__)


class TokenIndex:
    """Token surfaces sorted as bytes, for prefix-range and next-byte queries.

    Args:
        vocab: canonical vocabulary (surfaces; ``None`` = no bytes).
        n_out: size of the model's output layer (``>= 1``); ids at or past
            ``len(vocab)`` have no surface.
        keep: ``(V,)`` bool, the ids with a surface to index (default all); the others are
            *dropped*: neither bytes nor end of text (canonical mode drops the ids the
            tokenizer never emits, :attr:`~surgery.vocab.surfaces.Vocabulary.is_emitted`).

    Attributes:
        order: ``(S,)`` ids with a surface, sorted by surface.
        sorted: the ``S`` surfaces in that order.
        lengths: ``(S,)`` surface lengths in that order.
        no_surface: ``(n_out,)`` bool, ids that contribute no bytes (special, undefined);
            ``no_surface_ids`` the same as indices.
        dropped_ids: ids left out by ``keep``.
        first_byte: ``(n_out,)`` first byte of each id's surface, 256 for none, 257 for dropped.
        max_len: longest surface.
    """

    def __init__(self, vocab: Vocabulary, n_out: int, keep: np.ndarray | None = None):
        surfaces = list(vocab.surfaces[:n_out]) + [None] * max(0, n_out - len(vocab.surfaces))
        dropped = []
        if keep is not None:
            dropped = [i for i, s in enumerate(surfaces) if s and i < len(keep) and not keep[i]]
            for i in dropped:
                surfaces[i] = None
        ids = [i for i, s in enumerate(surfaces) if s]
        ids.sort(key=lambda i: surfaces[i])
        self.n_out = n_out
        self.order = np.asarray(ids, dtype=np.int64)
        self.sorted = [surfaces[i] for i in ids]
        self.lengths = np.asarray([len(s) for s in self.sorted], dtype=np.int64)
        self.max_len = int(self.lengths.max()) if len(ids) else 0
        self.dropped_ids = np.asarray(dropped, dtype=np.int64)
        self.no_surface = np.ones(n_out, dtype=bool)
        self.no_surface[self.order] = False
        self.no_surface[self.dropped_ids] = False
        self.no_surface_ids = np.flatnonzero(self.no_surface)
        width = max(self.max_len, 1)
        self.byte_matrix = np.frombuffer(b"".join(s.ljust(width, b"\0") for s in self.sorted),
                                         dtype=np.uint8).reshape(len(self.sorted), width)
        self.first_byte = np.full(n_out, 256, dtype=np.int64)
        self.first_byte[self.order] = [s[0] for s in self.sorted]
        self.first_byte[self.dropped_ids] = 257
        self.exact: dict[bytes, list[int]] = {}
        for i in ids:
            self.exact.setdefault(surfaces[i], []).append(i)
        self._ranges: dict[bytes, tuple[int, int]] = {}
        self._children: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self._columns: dict[int, np.ndarray] = {}

    def range(self, prefix: bytes) -> tuple[int, int]:
        """``[lo, hi)`` in sorted order of the surfaces that start with ``prefix`` (non-empty)."""
        r = self._ranges.get(prefix)
        if r is None:
            lo = bisect.bisect_left(self.sorted, prefix)
            hi = bisect.bisect_right(self.sorted, prefix + b"\xff" * (self.max_len + 1), lo)
            r = self._ranges[prefix] = (lo, hi)
        return r

    def _column(self, j: int) -> np.ndarray:
        """``(S,)`` byte ``j`` of each sorted surface, -1 where the surface is not longer than ``j``."""
        col = self._columns.get(j)
        if col is None:
            col = np.where(self.lengths > j, self.byte_matrix[:, j].astype(np.int16), np.int16(-1))
            self._columns[j] = col
        return col

    def children(self, prefix: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Next bytes after ``prefix`` and their sub-ranges.

        Returns:
            ``(bytes_, bounds)``: ``bytes_`` ``(k,)`` the distinct next bytes (ascending),
            ``bounds`` ``(k+1,)`` sorted-order indices; surfaces ``prefix + bytes_[i] + ...``
            are ``bounds[i]:bounds[i+1]``. Surfaces equal to ``prefix`` are excluded.
        """
        got = self._children.get(prefix)
        if got is None:
            lo, hi = self.range(prefix)
            col = self._column(len(prefix))[lo:hi]
            start = int(np.searchsorted(col, 0))  # surfaces equal to prefix (-1) sort first
            col = col[start:]
            if len(col):
                cut = np.flatnonzero(np.diff(col)) + 1
                firsts = np.concatenate([[0], cut])
                bytes_ = col[firsts].astype(np.int64)
                bounds = np.concatenate([firsts, [len(col)]]) + lo + start
            else:
                bytes_, bounds = np.zeros(0, np.int64), np.asarray([lo + start], np.int64)
            got = self._children[prefix] = (bytes_, bounds.astype(np.int64))
        return got


JOIN, SPLIT, OPEN = 0, 1, 2  # what the next byte makes of a split point (see Canonicalizer.split_decisions)


class CoverTree:
    """The nodes of the cover encodings of a growing byte string, from a segment start.

    Node 0 is the root: the (fixed) encoding of ``data[:start]``. Every other node is
    its parent followed by one token; ``end[i]`` is the byte offset where node ``i``
    ends. In ``exact`` mode (``canon is None``) every token whose surface fits the
    text is a child; in ``canonical`` mode a child must be a valid pair with its
    parent's token, the first token after the root must be able to start a piece,
    and a byte-fallback token may not complete a character of the vocabulary
    (:meth:`~surgery.bytelevel.validity.Canonicalizer.fallback_allowed`).
    At a *split point* (an offset where a continuation may open a new piece) a token
    that can start a piece is a child too; ``splits_used[i]`` lists the split points
    node ``i`` relies on (it is admitted for a prefix only while they are all split
    points of that prefix) and ``split_ok[i]`` the split points where it has a token
    boundary followed by a token that can start a piece (it stays admitted when the
    next byte opens a piece there).

    Args:
        index: the :class:`TokenIndex` of the vocabulary.
        canon: a :class:`~surgery.bytelevel.validity.Canonicalizer`, or ``None`` for exact mode.
        start: byte offset of the root.
        splits: split points (absolute offsets) to honour.
        split_sets: the split-point sets of the prefixes the tree serves (default: ``[splits]``);
            a node relying on split points that no single prefix offers is never created
            (a long run of spaces would otherwise admit exponentially many readings).
        max_nodes: raise beyond this many nodes (exact mode grows exponentially).
        splits_from: ``{n: points}``, the split points of the prefixes of length ``>= n`` that the
            tree serves (their union); a node relying on others is not extended past ``n`` (no
            prefix would admit it). Default: no such limit.
    """

    def __init__(self, index: TokenIndex, canon=None, start: int = 0, max_nodes: int = 200_000,
                 splits=frozenset(), split_sets=None, splits_from: dict | None = None):
        self.index = index
        self.canon = canon
        self.start = start
        self.splits = frozenset(splits)
        self.split_sets = [frozenset(x) for x in split_sets] if split_sets is not None else [self.splits]
        self.max_nodes = max_nodes
        self.splits_from = splits_from
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]
        self.end: list[int] = [start]
        self.depth: list[int] = [0]
        self.splits_used: list[tuple[int, ...]] = [()]
        self.split_ok: list[tuple[int, ...]] = [()]
        self.open: list[int] = [0]  # nodes some token can still extend past the current end
        self.n = start
        self.data = b""

    def __len__(self) -> int:
        return len(self.parent)

    def extend(self, data: bytes) -> None:
        """Grow the tree to cover ``data`` (which extends the data seen so far)."""
        if len(data) < self.n or (self.data and not data.startswith(self.data)):
            raise ValueError("CoverTree.extend: data must extend the previous data")
        self.data = data
        for n in range(self.n + 1, len(data) + 1):
            self._step(data, n)
        self.n = len(data)

    def _step(self, data: bytes, n: int) -> None:
        index = self.index
        still, cand = [], []
        ahead = self.splits_from.get(n) if self.splits_from is not None else None
        for e in self.open:
            if ahead is not None and self.splits_used[e] and not ahead.issuperset(self.splits_used[e]):
                continue  # relies on a split point no prefix from here on has
            piece = data[self.end[e]:n]
            lo, hi = index.range(piece)
            if lo == hi:
                continue
            for t in index.exact.get(piece, ()):
                cand.append((e, t))
            if hi - lo > len(index.exact.get(piece, ())):
                still.append(e)
        used = [self.splits_used[e] for e, _ in cand]
        oks = [self.split_ok[e] for e, _ in cand]
        if cand and self.canon is not None and self.canon.fallback_ids:
            fb = self.canon.fallback_ids
            cand = [(e, t) for e, t in cand if t not in fb or self.canon.fallback_allowed(data, n)]
            used = [self.splits_used[e] for e, _ in cand]
            oks = [self.split_ok[e] for e, _ in cand]
        if cand and self.canon is not None:
            pairs = [(self.token[e], t) for e, t in cand if e != 0]
            ok_pairs = iter(self.canon.pairs_valid(pairs))
            kept, used, oks = [], [], []
            for e, t in cand:
                m = self.end[e]
                if e == 0:
                    pair_ok, first_ok = False, self.canon.first_valid(t)
                else:
                    pair_ok = next(ok_pairs)
                    first_ok = m in self.splits and self.canon.first_valid(t)
                if pair_ok or first_ok:
                    split = e != 0 and not pair_ok
                    u = self.splits_used[e] + ((m,) if split else ())
                    if split and not any(all(p in S for p in u) for S in self.split_sets):
                        continue
                    kept.append((e, t))
                    used.append(u)
                    oks.append(self.split_ok[e] + ((m,) if first_ok and e != 0 else ()))
            cand = kept
        for (e, t), u, ok in zip(cand, used, oks):
            i = len(self.parent)
            self.parent.append(e)
            self.token.append(t)
            self.end.append(n)
            self.depth.append(self.depth[e] + 1)
            self.splits_used.append(u)
            self.split_ok.append(ok)
            still.append(i)
        self.open = still
        if len(self.parent) > self.max_nodes:
            if self.canon is None:
                hint = "exact mode is exponential in the text length: use mode='canonical' or a shorter text"
            else:
                hint = "pass a larger max_nodes to ByteLM, or score a shorter text"
            raise SurgeryError(f"more than {self.max_nodes} cover-encoding nodes for {n - self.start} bytes "
                               f"({'exact' if self.canon is None else 'canonical'} mode)", hint)

    def copy(self) -> "CoverTree":
        """An independent copy (to try a continuation without changing this tree)."""
        other = object.__new__(CoverTree)
        other.__dict__.update(self.__dict__)
        for name in ("parent", "token", "end", "depth", "splits_used", "split_ok", "open"):
            setattr(other, name, list(getattr(self, name)))
        return other

    def path(self, i: int) -> list[int]:
        """Tokens from the root to node ``i``."""
        out = []
        while i > 0:
            out.append(self.token[i])
            i = self.parent[i]
        return out[::-1]

    def live(self, splits=None) -> list[int]:
        """Nodes that can still contribute to the next byte (ending at the current end, or open).

        Args:
            splits: split points of the current prefix; nodes relying on others are left out.
        """
        if splits is None:
            return list(self.open)
        return [i for i in self.open if self.admitted(i, splits)]

    def admitted(self, i: int, splits) -> bool:
        """Whether node ``i`` belongs to the tree of a prefix whose split points are ``splits``."""
        return all(p in splits for p in self.splits_used[i])

    def consistent(self, i: int, points: tuple[int, ...], decision: tuple[int, ...]) -> bool:
        """Whether node ``i`` (with a last token starting at its end) fits the next byte's pieces.

        Args:
            points: the split points of the prefix; ``decision``: for each, what the next
                byte makes of it (:data:`JOIN`, :data:`SPLIT` or :data:`OPEN`).
        """
        for p, d in zip(points, decision):
            if d == SPLIT and not (self.end[i] == p or p in self.split_ok[i]):
                return False
            if d == JOIN and p in self.splits_used[i]:
                return False
        return True

    def consistency_mask(self, i: int, points: tuple[int, ...], decisions: np.ndarray) -> np.ndarray:
        """``(257,)`` 1.0 for the next bytes whose pieces node ``i`` is consistent with, else 0.0.

        Args:
            points: the split points of the prefix; ``decisions``: ``(257, len(points))`` from
                :meth:`~surgery.bytelevel.validity.Canonicalizer.split_decisions`.
        """
        rows, inverse = np.unique(decisions, axis=0, return_inverse=True)
        ok = np.array([self.consistent(i, points, tuple(r)) for r in rows], dtype=np.float64)
        return ok[inverse.reshape(-1)]
