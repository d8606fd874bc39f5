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


def _plan(rng, V, T, V_pad):
    """Random CSR weights with 5 entries per target, two random rows, and a copy that lands on a target."""
    from surgery.transplant.methods import SRC_HYBRID, SRC_RANDOM

    r = np.repeat(np.arange(T), 5)
    coef = sp.csr_matrix((rng.random(T * 5), (r, rng.integers(0, V, T * 5))), shape=(T, V))
    coef.sum_duplicates()
    source = np.full(T, SRC_HYBRID, dtype=np.int8)
    source[[3, 17]] = SRC_RANDOM
    coef = sp.csr_matrix(coef.multiply((source != SRC_RANDOM)[:, None]))  # random rows combine nothing
    targets = np.sort(rng.choice(V_pad, T, replace=False))
    free = np.setdiff1d(np.arange(V_pad), targets)
    copies = ((np.array([free[0], targets[5]]), np.array([7, 8])),)  # a copy over a target wins
    return coef, source, targets, copies


def test_accumulation_dtype_is_float64_for_float32_outputs_and_float32_for_16_bit_ones():
    assert rows_mod.accumulation_dtype(torch.float32) == torch.float64
    assert rows_mod.accumulation_dtype(torch.float64) == torch.float64
    assert rows_mod.accumulation_dtype(torch.bfloat16) == torch.float32
    assert rows_mod.accumulation_dtype(torch.float16) == torch.float32


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_build_matrix_16_bit_rows_are_the_float64_rows_within_one_unit_of_the_output(monkeypatch, out_dtype):
    """16-bit outputs (float32 sums): every combined row is the dense float64 product rounded to the output
    dtype, within one unit in the last place (a float32 sum may round once more), and nearly all of them
    exactly; random rows, copies and the mean fill are as for float32 outputs."""
    rng = np.random.default_rng(4)
    V, d, T, V_pad = 3000, 48, 400, 512
    old = torch.from_numpy((rng.standard_normal((V, d)) * 0.05 + 0.01).astype(np.float32))
    coef, source, targets, copies = _plan(rng, V, T, V_pad)
    monkeypatch.setattr(rows_mod, "_EXACT_STATS_BYTES", 0)  # the chunked statistics too
    got = rows_mod.build_matrix(old, out_dtype, coef, source, targets, copies, V_pad, np.arange(V),
                                torch.Generator().manual_seed(3), chunk=64)

    x = old.double()
    mean, std = x.mean(0), x.std(0)
    comb = torch.from_numpy(np.asarray(coef @ x.numpy()))  # (T, d) float64 reference
    want = mean.to(out_dtype).expand(V_pad, d).clone()
    want[torch.as_tensor(targets)] = comb.to(out_dtype)
    rnd = (torch.randn(2, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * std + mean).float()
    want[torch.as_tensor(targets[[3, 17]])] = rnd.to(out_dtype)
    want[torch.as_tensor(copies[0][0])] = old[torch.as_tensor(copies[0][1])].to(out_dtype)
    assert got.dtype == out_dtype
    combined = torch.as_tensor(np.setdiff1d(targets[source != rows_mod.SRC_RANDOM], copies[0][0]))
    fi = torch.finfo(out_dtype)
    ulp = fi.eps * torch.maximum(want[combined].double().abs(), torch.tensor(fi.smallest_normal))  # >= one unit
    assert bool(((got[combined].double() - want[combined].double()).abs() <= ulp).all())
    assert (got[combined] == want[combined]).double().mean() > 0.99
    rest = torch.ones(V_pad, dtype=torch.bool)
    rest[combined] = False
    torch.testing.assert_close(got[rest].double(), want[rest].double(), rtol=torch.finfo(out_dtype).eps, atol=0)


def test_build_matrix_float32_rows_in_column_blocks_equal_one_product_of_the_upcast_matrix(monkeypatch):
    """float32 outputs (float64 sums): column blocks and target chunks (forced small here) give the rows of one
    float64 ``coef @ old`` bit for bit; random rows are N(mean, std) draws; copies are exact and win over
    everything."""
    out_dtype = torch.float32
    rng = np.random.default_rng(1)
    V, d, T, V_pad = 500, 40, 60, 96
    old = torch.from_numpy((rng.standard_normal((V, d)) * 0.05).astype(np.float32))
    coef, source, targets, copies = _plan(rng, V, T, V_pad)
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


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_build_matrix_from_16_bit_rows_equals_the_build_from_their_float32_upcast(monkeypatch, out_dtype):
    """Old rows handed over in bf16 (the stored dtype, upcast one column block at a time, forced small here)
    give the rows of the same build from their float32 upcast, bit for bit, for 16-bit and float32 outputs."""
    rng = np.random.default_rng(5)
    V, d, T, V_pad = 700, 40, 90, 128
    old = torch.from_numpy((rng.standard_normal((V, d)) * 0.05 + 0.01).astype(np.float32)).bfloat16()
    coef, source, targets, copies = _plan(rng, V, T, V_pad)

    def build():
        return rows_mod.build_matrix(old_in, out_dtype, coef, source, targets, copies, V_pad, np.arange(V),
                                     torch.Generator().manual_seed(3), chunk=32)

    old_in = old.float()
    want = build()
    monkeypatch.setattr(rows_mod, "_F32_BLOCK_BYTES", 6 * V * 4)  # 6 columns per float32 block: 7 blocks
    monkeypatch.setattr(rows_mod, "_BLOCK_BYTES", 9 * V * 8)  # 9 per float64 block
    old_in = old
    got = build()
    assert got.dtype == out_dtype and torch.equal(got, want)
