"""The bf16-shortlisted neighbour search against the plain float32 search and the previous dedup search."""

from __future__ import annotations

import logging

import numpy as np
import torch

from surgery.transplant.certified_topk import block_topk, error_bound, topk_inner_product_certified
from surgery.transplant.methods.tokenadapt import distinct_rows, neighbours_dedup
from surgery.transplant.neighbours import topk_inner_product


def _clustered(rng, n, d, centres, spread):
    """Unit vectors around a few centres, rounded through float16 as aux vectors are: many near ties."""
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)


def _previous_dedup(queries, keys, k):
    """The neighbour search as it was: keys deduplicated with ``np.unique(axis=0)``, every query searched."""
    uniq, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse, minlength=len(uniq))
    starts = np.cumsum(sizes) - sizes
    perm = np.argsort(first, kind="stable")
    u_scores, u_idx = topk_inner_product(queries, uniq[perm], k)
    u_idx = perm[u_idx.numpy()]
    u_scores = u_scores.numpy().astype(np.float64)
    Q = len(queries)
    out_i = np.full((Q, k), -1, dtype=np.int64)
    out_s = np.full((Q, k), -np.inf)
    filled = np.zeros(Q, dtype=np.int64)
    rows = np.arange(Q)
    for r in range(u_idx.shape[1]):
        u = u_idx[:, r]
        for j in range(k):
            has = (sizes[u] > j) & (filled < k)
            out_i[rows[has], filled[has]] = order[starts[u[has]] + j]
            out_s[rows[has], filled[has]] = u_scores[has, r]
            filled[has] += 1
    return out_s, out_i


def test_certified_search_equals_float32_search_bit_for_bit(caplog):
    rng = np.random.default_rng(0)
    keys = _clustered(rng, 3000, 48, 40, 0.15)
    queries = _clustered(rng, 700, 48, 40, 0.15)
    want_s, want_i = topk_inner_product(queries, keys, 3)
    with caplog.at_level(logging.INFO, logger="surgery.transplant.certified_topk"):
        got_s, got_i = topk_inner_product_certified(queries, keys, 3, shortlist=12, block=256, group=64)
    assert "searched in full" in caplog.text  # dense clusters: some queries fall back to the full search
    np.testing.assert_array_equal(got_i.numpy(), want_i.numpy())
    assert torch.equal(got_s, want_s)  # the same GEMM kernels: scores bit for bit
    # a generous shortlist certifies every query and gives the same answer
    got_s2, got_i2 = topk_inner_product_certified(queries, keys, 3, shortlist=200, block=256, group=64)
    np.testing.assert_array_equal(got_i2.numpy(), want_i.numpy())
    assert torch.equal(got_s2, want_s)


def test_certified_search_small_inputs_and_exact_ties():
    rng = np.random.default_rng(1)
    base = _clustered(rng, 20, 8, 5, 0.3)
    keys = base[rng.integers(0, 20, 90)]  # exact duplicates: ties go to the lower index
    queries = _clustered(rng, 5, 8, 5, 0.3)
    s, i = topk_inner_product_certified(queries, keys, 4)
    dense = queries.astype(np.float64) @ keys.T.astype(np.float64)
    for r in range(len(queries)):
        ref = sorted(range(len(keys)), key=lambda j: (-round(float(dense[r, j]), 5), j))[:4]
        assert i[r].tolist() == ref
    s0, i0 = topk_inner_product_certified(queries[:0], keys, 4)
    assert s0.shape == (0, 4) and i0.shape == (0, 4)


def test_block_topk_gives_the_values_of_torch_topk():
    """The strided-chunk top-m against torch.topk: the same values in the same order, and columns that hold them;
    bf16 scores rounded to a few levels make ties at every rank, and K is no multiple of the chunk count."""
    torch.manual_seed(0)
    for n_cols, levels in ((5003, None), (5003, 9), (2100, 3), (300, None)):
        x = torch.randn(64, n_cols)
        if levels:
            x = (x * levels).round() / levels
        x = x.bfloat16()
        x[5, -3:] = 10  # the best values in the columns beyond the last whole chunk
        x[6, :40] = 10  # more maxima than m in one place
        for m in (1, 11, 32):
            v, c = block_topk(x, m)
            want, _ = torch.topk(x, m, dim=1)
            assert torch.equal(v, want)
            assert torch.equal(x.gather(1, c), v)
            assert all(len(set(r.tolist())) == m for r in c)  # distinct columns


def test_bf16_scores_stay_within_the_error_bound():
    rng = np.random.default_rng(2)
    q = torch.as_tensor(_clustered(rng, 400, 384, 30, 0.2))
    k = torch.as_tensor(_clustered(rng, 2000, 384, 30, 0.2))
    diff = ((q.bfloat16() @ k.bfloat16().T).float() - q @ k.T).abs()
    bound = error_bound(384) * q.norm(dim=1)[:, None] * k.norm(dim=1)[None, :]
    assert (diff <= bound).all()
    assert diff.max() > 0  # bf16 does round: the bound is not vacuous


def test_distinct_rows_matches_np_unique():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 6)).astype(np.float32)
    base[3, 2] = -0.0
    base[7] = base[3]
    base[7, 2] = 0.0  # equal by value to row 3
    x = base[rng.integers(0, 50, 400)]
    first, inverse = distinct_rows(x)
    uniq, inv_ref = np.unique(x, axis=0, return_inverse=True)
    assert len(first) == len(uniq)
    assert np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(x[first[inverse]], x)
    # same partition as np.unique
    inv_ref = inv_ref.reshape(-1)
    for a in range(len(first)):
        members = np.flatnonzero(inverse == a)
        assert len(set(inv_ref[members].tolist())) == 1
        assert (inv_ref == inv_ref[members[0]]).sum() == len(members)


def test_neighbours_dedup_equals_the_previous_search_bit_for_bit():
    rng = np.random.default_rng(4)
    base = _clustered(rng, 900, 32, 25, 0.2)
    keys = base[rng.integers(0, 900, 2500)]  # duplicated keys, as cased variants have
    qbase = _clustered(rng, 400, 32, 25, 0.2)
    queries = qbase[rng.integers(0, 400, 1000)]  # duplicated queries too
    want_s, want_i = _previous_dedup(queries, keys, 3)
    got_s, got_i = neighbours_dedup(queries, keys, 3)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)


def test_neighbour_cache_answers_the_same_search_and_ignores_bad_files(tmp_path, caplog):
    """A repeated search is read from the cache with the same answer; a corrupt or mismatched file is ignored
    (with a warning) and the search runs again; other operands never share a file."""
    from surgery.transplant import neighbour_cache

    rng = np.random.default_rng(5)
    keys = _clustered(rng, 300, 16, 10, 0.2)[rng.integers(0, 300, 700)]
    queries = _clustered(rng, 200, 16, 10, 0.2)[rng.integers(0, 200, 400)]
    ref = neighbours_dedup(queries, keys, 3)
    st1, st2 = {}, {}
    first = neighbours_dedup(queries, keys, 3, cache_dir=tmp_path, stats=st1)
    files = list(tmp_path.glob("neighbours-*.npz"))
    assert len(files) == 1 and st1 == {"neighbours_cached": False}
    second = neighbours_dedup(queries, keys, 3, cache_dir=tmp_path, stats=st2)
    assert st2 == {"neighbours_cached": True}
    for got in (first, second):
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
    # other operands: another file
    neighbours_dedup(queries[:50], keys, 3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("neighbours-*.npz"))) == 2
    # a truncated file and a file with ids out of range are not trusted
    for bad in ("truncated", "ids"):
        if bad == "truncated":
            files[0].write_bytes(files[0].read_bytes()[:100])
        else:
            with np.load(files[0]) as z:
                meta, scores, idx = z["meta"], z["scores"], z["idx"]
            np.savez(files[0], meta=meta, scores=scores, idx=idx + 10**6)
        st = {}
        with caplog.at_level("WARNING"):
            got = neighbours_dedup(queries, keys, 3, cache_dir=tmp_path, stats=st)
        assert st == {"neighbours_cached": False} and "neighbour cache" in caplog.text
        np.testing.assert_array_equal(got[1], ref[1])
        assert neighbour_cache.read(tmp_path, files[0].stem.split("-")[1] + "x", 1, 1, 1) is None
