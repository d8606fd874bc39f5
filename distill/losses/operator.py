"""The projection as a device-resident sparse operator for the losses (column blocks of ``W``, no dense copies).

:class:`ProjectionOperator` wraps the matrix of the core's :class:`surgery.vocab.projection.Projection`.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class _SparseColumnsMM(torch.autograd.Function):
    """``(N, V_s) @ W_K`` for a sparse column block ``W_K (V_s, K)`` held as CSR of its transpose.

    CPU: ``dense @ W_Kᵀᵀ`` and ``grad @ W_Kᵀ`` (dense-times-sparse kernels, no transposed copies of the
    ``(N, V_s)`` operand). CUDA: the cuSPARSE-friendly ``CSR @ dense`` form on both passes.
    """

    @staticmethod
    def forward(ctx, dense, wk_t):  # wk_t: sparse CSR (K, V_s)
        ctx.wk_t = wk_t
        if dense.is_cuda:
            return torch.sparse.mm(wk_t, dense.t().contiguous()).t()
        return dense @ wk_t.t()

    @staticmethod
    def backward(ctx, grad):
        wk_t = ctx.wk_t
        if grad.is_cuda:
            wk = wk_t.to_sparse_coo().t().coalesce().to_sparse_csr()  # (V_s, K)
            return torch.sparse.mm(wk, grad.t().contiguous()).t(), None
        return grad @ wk_t, None


class ProjectionOperator:
    """The projection ``W (V_s, V_t)`` on a device, organized for fast column blocks.

    Stores ``Wᵀ`` as CSR ``(V_t, V_s)`` so that the columns ``K`` of ``W`` are the rows ``K``
    of ``Wᵀ``: gathering them is index arithmetic on ``crow_indices``.
    """

    def __init__(self, matrix, device: torch.device | str = "cpu"):
        import scipy.sparse as sp

        wt = sp.csr_matrix(matrix).T.tocsr()
        wt.sort_indices()
        self.shape = tuple(matrix.shape)  # (V_s, V_t)
        self.crow = torch.from_numpy(wt.indptr.astype(np.int64)).to(device)
        self.col = torch.from_numpy(wt.indices.astype(np.int64)).to(device)
        self.val = torch.from_numpy(wt.data.astype(np.float32)).to(device)
        self.reachable = (self.crow[1:] > self.crow[:-1])  # (V_t,) teacher columns some student token maps to

    @staticmethod
    def rows_of(matrix, device="cpu") -> "ProjectionOperator":
        """Wrap a matrix whose *rows* are gathered (``row_block``), e.g. ``W_ts (V_t, V_s)``."""
        return ProjectionOperator(matrix.T, device)

    @property
    def row_mapped(self) -> torch.Tensor:
        """For :meth:`rows_of`: ``(rows,)`` bool, rows with at least one entry."""
        return self.reachable

    def row_block(self, rows: torch.Tensor) -> torch.Tensor:
        """For :meth:`rows_of`: sparse CSR ``(len(rows), cols)`` of the wrapped matrix."""
        return self.column_block(rows)

    def column_block(self, cols: torch.Tensor) -> torch.Tensor:
        """Sparse CSR ``(K, V_s)`` = ``W[:, cols]ᵀ``."""
        starts = self.crow[cols]
        lens = self.crow[cols + 1] - starts
        crow = torch.zeros(len(cols) + 1, dtype=torch.long, device=cols.device)
        crow[1:] = torch.cumsum(lens, 0)
        total = int(crow[-1])
        offs = torch.arange(total, device=cols.device) - torch.repeat_interleave(crow[:-1], lens) \
            + torch.repeat_interleave(starts, lens)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on mm only
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, self.col[offs], self.val[offs], size=(len(cols), self.shape[0]),
                                           check_invariants=False)

    def project(self, p_student: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` = ``p_student (N, V_s) @ W[:, cols]`` (differentiable in ``p_student``)."""
        return _SparseColumnsMM.apply(p_student, self.column_block(cols))
