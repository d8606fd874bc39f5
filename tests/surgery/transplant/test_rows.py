"""Row arithmetic: chunked statistics and combinations against plain float64 references."""

from __future__ import annotations

import numpy as np
import pytest
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


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_build_matrix_in_column_blocks_equals_one_product_of_the_upcast_matrix(monkeypatch, out_dtype):
    """Column blocks and target chunks (forced small here) give the rows of one float64 ``coef @ old``
    bit for bit; random rows are N(mean, std) draws; copies are exact and win over everything."""
    from surgery.transplant.methods import SRC_HYBRID, SRC_RANDOM

    rng = np.random.default_rng(1)
    V, d, T, V_pad = 500, 40, 60, 96
    old = torch.from_numpy((rng.standard_normal((V, d)) * 0.05).astype(np.float32))
    r = np.repeat(np.arange(T), 5)
    coef = sp.csr_matrix((rng.random(T * 5), (r, rng.integers(0, V, T * 5))), shape=(T, V))
    coef.sum_duplicates()
    source = np.full(T, SRC_HYBRID, dtype=np.int8)
    source[[3, 17]] = SRC_RANDOM
    coef = sp.csr_matrix(coef.multiply((source != SRC_RANDOM)[:, None]))  # random rows combine nothing
    targets = np.sort(rng.choice(V_pad, T, replace=False))
    free = np.setdiff1d(np.arange(V_pad), targets)
    copies = ((np.array([free[0], targets[5]]), np.array([7, 8])),)  # a copy over a target wins
    base = np.arange(V)
    monkeypatch.setattr(rows_mod, "_BLOCK_BYTES", 7 * V * 8)  # 7 columns per float64 block: 6 blocks
    got = rows_mod.build_matrix(old, out_dtype, coef, source, targets, copies, V_pad, base,
                                torch.Generator().manual_seed(3), chunk=16)

    x = old.double()
    mean, std = x.mean(0), x.std(0)
    want = mean.to(out_dtype).expand(V_pad, d).clone()
    comb = torch.from_numpy(np.asarray(coef @ old.numpy().astype(np.float64)).astype(np.float32))
    want[torch.as_tensor(targets)] = comb.to(out_dtype)
    rnd = (torch.randn(2, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * std + mean).float()
    want[torch.as_tensor(targets[[3, 17]])] = rnd.to(out_dtype)
    want[torch.as_tensor(copies[0][0])] = old[torch.as_tensor(copies[0][1])].to(out_dtype)
    assert got.dtype == out_dtype
    assert torch.equal(got, want)
