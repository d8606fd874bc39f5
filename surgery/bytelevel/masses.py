"""Closed-form sums over the last token of a cover encoding, from one node's next-token distribution.

For a node ending at byte ``m`` of the stream ``z`` with next-token log-probabilities
``lp`` (``(V,)``), the quantities the byte-level LM needs are

- ``M[j-1]`` = P(next token's surface starts with ``z[m:m+j]``) for ``j = 1..``;
- ``E[j-1]`` = P(next token's surface equals ``z[m:m+j]``) (tokens that end exactly there);
- ``S`` = P(next token has no surface) (specials: they end the text);
- the next-byte masses after ``z[m:m+j]``: ``(257,)`` for ``j = 0`` (index 256 = ``S``),
  ``(256,)`` for ``j >= 1``;
- ``Z0`` = the total of the ``j = 0`` masses: 1 less the ids the index drops and the
  ``banned`` ids (byte-fallback tokens that may not start at ``m`` in canonical mode).

All sums are taken over contiguous ranges of :class:`~surgery.bytelevel.cover.TokenIndex`
with a float64 cumulative sum restricted to the node's first-byte range.
"""

from __future__ import annotations

import numpy as np

from surgery.bytelevel.cover import TokenIndex


def as_numpy(lp) -> np.ndarray:
    """``(V,)`` float32 numpy log-probabilities from a torch or numpy row."""
    if hasattr(lp, "detach"):
        return lp.detach().float().cpu().numpy()
    return np.asarray(lp, dtype=np.float32)


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(x.astype(np.float64))


class NodeMasses:
    """Prefix masses of one node (see module docstring).

    Args:
        lp: ``(V,)`` next-token log-probabilities of the node (float32 numpy).
        index: the token index.
        z: the byte stream; ``m``: where the node ends.
        jmax: longest prefix ``z[m:m+jmax]`` of interest.
        banned: ids of one-byte tokens that may not be the next token (left out of every mass).
    """

    __slots__ = ("lp", "index", "z", "m", "lo1", "cs", "M", "E", "Z0", "banned")

    def __init__(self, lp: np.ndarray, index: TokenIndex, z: bytes, m: int, jmax: int,
                 banned: np.ndarray | None = None):
        self.lp, self.index, self.z, self.m = lp, index, z, m
        self.banned = banned if banned is not None and len(banned) else None
        gone = index.dropped_ids if self.banned is None else np.concatenate([index.dropped_ids, self.banned])
        self.Z0 = 1.0 - float(_exp(lp[gone]).sum()) if len(gone) else 1.0
        jmax = max(0, min(jmax, len(z) - m))
        self.M = np.zeros(jmax)
        self.E = np.zeros(jmax)
        self.lo1 = 0
        self.cs = None
        if jmax == 0:
            return
        lo1, hi1 = index.range(z[m:m + 1])
        if lo1 == hi1:
            return
        self.lo1 = lo1
        self.cs = np.concatenate([[0.0], np.cumsum(_exp(lp[index.order[lo1:hi1]]))])
        for j in range(1, jmax + 1):
            piece = z[m:m + j]
            lo, hi = index.range(piece)
            if lo == hi:
                break
            self.M[j - 1] = self.cs[hi - lo1] - self.cs[lo - lo1]
            ex = index.exact.get(piece)
            if ex:
                self.E[j - 1] = _exp(lp[ex]).sum()
        if self.banned is not None:  # one-byte tokens: they only weigh on z[m]
            here = self.banned[index.first_byte[self.banned] == z[m]]
            if len(here):
                off = float(_exp(lp[here]).sum())
                self.M[0] = max(0.0, self.M[0] - off)
                self.E[0] = max(0.0, self.E[0] - off)

    def next_bytes(self, j: int) -> np.ndarray:
        """Next-byte masses after ``z[m:m+j]``: ``(257,)`` with end-of-text at 256 for ``j == 0``, else ``(256,)``."""
        if j == 0:
            out = np.bincount(self.index.first_byte, weights=_exp(self.lp), minlength=258)[:257]
            if self.banned is not None:
                np.subtract.at(out, self.index.first_byte[self.banned], _exp(self.lp[self.banned]))
                np.maximum(out, 0.0, out=out)
            return out
        out = np.zeros(256)
        if self.cs is None:
            return out
        piece = self.z[self.m:self.m + j]
        lo, hi = self.index.range(piece)
        if lo == hi:
            return out
        bytes_, bounds = self.index.children(piece)
        if len(bytes_):
            b = bounds - self.lo1
            out[bytes_] = self.cs[b[1:]] - self.cs[b[:-1]]
        return out
