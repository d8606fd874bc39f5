"""Token → pieces: each token's bytes re-encoded mid-text by another tokenizer, as one sparse structure.

This is the one decomposition of the alignment core: the X-Token projection
(:func:`surgery.vocab.projection.build_projection`) weights the pieces by position
(arXiv 2605.21699), the transplant init methods (mean of pieces, TokenAdapt's local
estimate, arXiv 2505.09738) weight them by similarity and byte length. Pieces come
from the destination tokenizer's own encoding, so they are always ids it emits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Pieces:
    """Pieces of ``T`` tokens, flattened in token order.

    Attributes:
        ids: ``(P,)`` piece ids (in the destination vocabulary).
        owner: ``(P,)`` index (``0..T-1``) of the token each piece belongs to.
        counts: ``(T,)`` pieces per token (0 when the destination cannot spell its bytes).
        lengths: ``(P,)`` byte length of each piece, or ``None`` when not known.
    """

    ids: np.ndarray
    owner: np.ndarray
    counts: np.ndarray
    lengths: np.ndarray | None = None

    @property
    def starts(self) -> np.ndarray:
        """``(T,)`` offset of each token's first piece in :attr:`ids`."""
        return np.cumsum(self.counts) - self.counts

    @property
    def position(self) -> np.ndarray:
        """``(P,)`` index of each piece within its token (0 for the first piece)."""
        return np.arange(len(self.ids)) - np.repeat(self.starts, self.counts)

    def first(self) -> np.ndarray:
        """``(T,)`` first piece's id (-1 when none)."""
        out = np.full(len(self.counts), -1, dtype=np.int64)
        nz = self.counts > 0
        out[nz] = self.ids[self.starts[nz]]
        return out

    def last(self) -> np.ndarray:
        """``(T,)`` last piece's id (-1 when none)."""
        out = np.full(len(self.counts), -1, dtype=np.int64)
        nz = self.counts > 0
        out[nz] = self.ids[self.starts[nz] + self.counts[nz] - 1]
        return out

    def select(self, keep: np.ndarray) -> "Pieces":
        """The pieces where the ``(P,)`` bool ``keep`` holds (token count unchanged)."""
        keep = np.asarray(keep, dtype=bool)
        return Pieces(self.ids[keep], self.owner[keep], np.bincount(self.owner[keep], minlength=len(self.counts)),
                      None if self.lengths is None else self.lengths[keep])

    def truncate(self, max_pieces: int) -> "Pieces":
        """At most the first ``max_pieces`` pieces of each token."""
        return self.select(self.position < max_pieces)

    def matrix(self, values: np.ndarray, n_cols: int) -> sp.csr_matrix:
        """``(T, n_cols)`` CSR with ``values[p]`` at ``(owner[p], ids[p])`` (repeated pieces add up)."""
        return coef_matrix(self.owner, self.ids, values, (len(self.counts), n_cols))


def coef_matrix(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape) -> sp.csr_matrix:
    """A float64 CSR from coordinates, duplicates summed."""
    m = sp.csr_matrix((np.asarray(vals, dtype=np.float64), (rows, cols)), shape=shape)
    m.sum_duplicates()
    return m


def decompose(src, dst, ids) -> Pieces:
    """Re-encode the ``src`` tokens ``ids`` mid-text with ``dst``'s tokenizer.

    Args:
        src: :class:`~surgery.vocab.surfaces.Vocabulary` the tokens belong to.
        dst: :class:`~surgery.vocab.surfaces.Vocabulary` whose pieces are wanted.
        ids: ``(T,)`` ``src`` ids, each with a surface.

    Returns:
        :class:`Pieces` with byte lengths (``dst`` surface lengths).
    """
    ids = np.asarray(ids, dtype=np.int64)
    encs = dst.encode_bytes_many([src.surfaces[int(t)] for t in ids])
    counts = np.fromiter((len(e) for e in encs), dtype=np.int64, count=len(encs))
    flat = np.fromiter((i for e in encs for i in e), dtype=np.int64, count=int(counts.sum()))
    owner = np.repeat(np.arange(len(ids)), counts)
    return Pieces(flat, owner, counts, dst.surface_lengths[flat])
