"""Row arithmetic: chunked statistics and combinations against plain float64 references."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from surgery.transplant import rows as rows_mod


def test_chunked_row_stats_match_the_exact_reduction(monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 24, generator=g) * 0.02 + 0.01
    pick = np.sort(np.random.default_rng(0).choice(1000, 700, replace=False))
    exact = w[torch.as_tensor(pick)].double()
    monkeypatch.setattr(rows_mod, "_EXACT_STATS_BYTES", 0)  # force the chunked path
    mean, std = rows_mod.row_stats(w, pick, chunk=64)
    torch.testing.assert_close(mean, exact.mean(0), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(std, exact.std(0), rtol=1e-9, atol=1e-15)


def test_combine_equals_scipy_on_the_upcast_matrix_bit_for_bit():
    rng = np.random.default_rng(1)
    src = (rng.standard_normal((500, 40)) * 0.05).astype(np.float32)
    r = np.repeat(np.arange(60), 5)
    coef = sp.csr_matrix((rng.random(300), (r, rng.integers(0, 500, 300))), shape=(60, 500))
    coef.sum_duplicates()
    want = np.asarray(coef @ src.astype(np.float64)).astype(np.float32)  # the whole matrix upcast, as scipy does
    got = rows_mod._combine(coef, src)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
