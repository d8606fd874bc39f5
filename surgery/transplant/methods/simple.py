"""Baseline init methods: ``random`` (``N(mean, std)`` of the old rows) and ``mean`` (mean of the pieces)."""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from surgery.transplant.methods.base import SRC_MEAN, SRC_RANDOM, MethodInputs, RowPlan, register_method
from surgery.vocab.pieces import decompose


@register_method("random")
def random_init(inp: MethodInputs) -> RowPlan:
    """Every target row drawn from ``N(mean, std)`` of the old rows."""
    T, V = len(inp.targets), inp.old_in.shape[0]
    empty = sp.csr_matrix((T, V), dtype=np.float64)
    return RowPlan(empty, None, np.full(T, SRC_RANDOM, dtype=np.int8), {"random": T})


@register_method("mean")
def mean_init(inp: MethodInputs) -> RowPlan:
    """Uniform mean of the pieces' old rows (random where the old tokenizer yields no piece)."""
    t0 = time.time()
    pieces = decompose(inp.new_vocab, inp.old_vocab, inp.targets)
    w = 1.0 / np.repeat(np.maximum(pieces.counts, 1), pieces.counts)
    coef = pieces.matrix(w, inp.old_in.shape[0])
    src = np.where(pieces.counts > 0, SRC_MEAN, SRC_RANDOM).astype(np.int8)
    return RowPlan(coef, None, src, {"seconds_decompose": round(time.time() - t0, 2)})
