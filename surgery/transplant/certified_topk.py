"""Exact float32 top-k inner products on a CPU, through a bf16 shortlist with a proven error bound.

The TokenAdapt neighbour search (Gemma-3 targets against Llama-3 keys: 108k × 77k distinct aux
vectors of 384 dimensions) is one large GEMM; bf16 products (AVX512-BF16) run about 3x faster
than float32 on this project's 2-core Xeon, but their ranks may differ on near ties. Here bf16
only *shortlists*, and the answer is still the exact float32 search:

1. every query's ``m`` best keys by bf16 score, and the ``m``-th score ``c``
   (:func:`block_topk`: the top ``m`` of a block's scores through strided chunk maxima, one pass
   over the block instead of a row-wise partial sort);
2. of those, the keys whose bf16 score ``b`` is at least ``b_k − 2ε`` (``b_k`` the ``k``-th bf16
   score; a key of the exact top ``k`` has ``s ≥ b_k − ε``, hence ``b ≥ b_k − 2ε``: the others
   cannot be in it), and their float32 scores from the same BLAS GEMM as a full search
   (queries grouped by their best candidate, so a block needs few distinct keys; every GEMM
   has at least :data:`MIN_GEMM` rows and columns: MKL rounds the products of a GEMM with one or
   two rows or fewer than 16 columns differently, larger ones give every element bit for bit);
3. a key outside the shortlist has a bf16 score ``≤ c``, hence a float32 score ``≤ c + ε`` with
   ``ε = 2·(3u + 4u² + 3γ)·|q|·max|k|`` (``u = 2⁻⁸`` bf16 rounding of both factors and of the
   result, ``γ = D·2⁻²⁴`` float32 accumulation, a factor 2 to spare): a query whose ``k``-th
   float32 score exceeds ``c + ε`` has its exact top ``k`` in the shortlist; every other query is
   searched in full float32 (a few tenths of a percent of them: tokens in dense clusters such as numbers).

The result equals :func:`surgery.transplant.neighbours.topk_inner_product` (float32): the same
keys, the same scores bit for bit, ties to the lower key index.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

from surgery.transplant.neighbours import search_operands

LOG = logging.getLogger(__name__)

MIN_GEMM = 64  # rows and columns of every float32 GEMM (MKL's kernels change below 4 rows / 16 columns)
_U_BF16 = 2.0 ** -8


def error_bound(dim: int) -> float:
    """Relative bound ``ε / (|q|·|k|)`` of a bf16 GEMM score (fp32 accumulation, bf16 output) against float32."""
    gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)
    return 2.0 * (3 * _U_BF16 + 4 * _U_BF16 ** 2 + 3 * gamma)


def _exact_block(q: torch.Tensor, keys: torch.Tensor, cols: np.ndarray, k: int, n_keys: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 top-``k`` of the queries ``q`` (``(B, D)``) among the keys ``cols`` (ascending ids).

    The GEMM is padded to :data:`MIN_GEMM` rows and columns (extra rows repeat the last query,
    extra columns are the lowest ids not in ``cols``), so it runs in the kernels of a full search.

    Returns:
        ``(scores (B, k) float32, ids (B, k) int64)``.
    """
    B = q.shape[0]
    if len(cols) < MIN_GEMM:
        extra = np.setdiff1d(np.arange(min(n_keys, MIN_GEMM + len(cols))), cols)[:MIN_GEMM - len(cols)]
        cols = np.sort(np.concatenate([cols, extra]))
    qq = q if B >= MIN_GEMM else torch.cat([q, q[-1:].expand(MIN_GEMM - B, -1)])
    sims = (qq @ keys[torch.as_tensor(cols)].T)[:B]  # (B, |cols|), float32 as in a full search
    m = min(len(cols), k + 8)
    r, i = torch.topk(sims, m, dim=1)
    gid = cols[i.numpy()]
    order = torch.from_numpy(np.lexsort((gid, -r.numpy()), axis=1)[:, :k])
    i = i.gather(1, order)
    return sims.gather(1, i), torch.from_numpy(cols[i.numpy()])


def block_topk(scores: torch.Tensor, m: int, chunks: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest values of every row and their columns (ties: any of the tied columns).

    The columns are cut into ``chunks`` strided slices of ``G`` (column ``j`` is in group ``j mod G``);
    the element-wise maximum of the slices gives each group's maximum in one vectorized pass, and the
    ``m`` best groups hold every value of the top ``m`` (a group whose maximum is below the ``m``-th
    value holds none of them; at most ``m`` groups have a maximum at or above it, and enough of them to
    supply ``m`` values are among the ``m`` best). The top ``m`` of those ``m · chunks`` values (plus the
    columns beyond ``chunks · G``) are the row's top ``m``: one vectorized pass over the block where
    ``torch.topk`` partially sorts every whole row.

    Args:
        scores: ``(B, K)`` scores (no NaN).
        m: values per row (``≤ K``).

    Returns:
        ``(values (B, m), columns (B, m) int64)``, values in descending order, as ``torch.topk``'s values.
    """
    n = scores.shape[1]
    G = n // chunks
    if G < 4 * m:  # too few columns for the groups to save work
        return torch.topk(scores, m, dim=1)
    main = G * chunks
    group_max = scores[:, :main].unflatten(1, (chunks, G)).amax(dim=1)  # (B, G)
    _, best = torch.topk(group_max, m, dim=1)  # (B, m)
    cols = (best[:, :, None] + G * torch.arange(chunks)).reshape(len(scores), m * chunks)
    if main < n:
        cols = torch.cat([cols, torch.arange(main, n).expand(len(scores), -1)], dim=1)
    v, j = torch.topk(scores.gather(1, cols), m, dim=1)
    return v, cols.gather(1, j)


def topk_inner_product_certified(queries: torch.Tensor | np.ndarray, keys: torch.Tensor | np.ndarray, k: int,
                                 shortlist: int = 32, block: int = 1024, group: int = 256,
                                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys with the largest float32 inner product for every query (exact), on CPU.

    Args:
        queries: ``(Q, D)`` float.
        keys: ``(K, D)`` float.
        k: neighbours per query (clipped to ``K``).
        shortlist: bf16 candidates per query (``m``).
        block: queries per bf16 block (``block × K`` bf16 scores in memory).
        group: queries per exact float32 block.

    Returns:
        ``(scores, indices)``, both ``(Q, k)``, best first (equal scores: lower index first);
        ``scores`` float32 (bit for bit those of a full float32 search), ``indices`` int64.
    """
    q, kk, k, scores, idx = search_operands(queries, keys, k)
    if scores.numel() == 0:
        return scores, idx
    n_q, n_k = q.shape[0], kk.shape[0]
    m = min(n_k, max(shortlist, k + 8))
    with torch.inference_mode():
        if m >= n_k // 2:  # shortlisting would not save work: one exact pass
            for s in range(0, n_q, group):
                scores[s:s + group], idx[s:s + group] = _exact_block(q[s:s + group], kk, np.arange(n_k), k, n_k)
            return scores, idx
        kb = kk.bfloat16()
        eps = error_bound(q.shape[1]) * q.norm(dim=1) * float(kk.norm(dim=1).max())  # (Q,)
        cand = torch.empty(n_q, m, dtype=torch.int64)
        cand_score = torch.empty(n_q, m, dtype=torch.float32)
        for s in tqdm(range(0, n_q, block), desc="neighbour shortlist (bf16)", disable=not progress, leave=False):
            v, i = block_topk(q[s:s + block].bfloat16() @ kb.T, m)
            cand[s:s + block] = i
            cand_score[s:s + block] = v.float()
        floor = cand_score[:, -1]
        # only candidates within 2ε of the k-th bf16 score can be in the exact top k
        useful = (cand_score >= (cand_score[:, k - 1] - 2 * eps)[:, None]).numpy()
        # exact scores, queries grouped by their best candidate (few distinct keys per block)
        order = np.argsort(cand[:, 0].numpy(), kind="stable")
        cand_np = cand.numpy()
        failed = []
        for s in tqdm(range(0, n_q, group), desc="neighbour rescoring (float32)", disable=not progress, leave=False):
            rows = order[s:s + group]
            cols = np.unique(cand_np[rows][useful[rows]])
            sc, ix = _exact_block(q[torch.as_tensor(rows)], kk, cols, k, n_k)
            ok = (sc[:, -1] > floor[rows] + eps[rows]).numpy()
            scores[torch.as_tensor(rows[ok])] = sc[torch.as_tensor(ok)]
            idx[torch.as_tensor(rows[ok])] = ix[torch.as_tensor(ok)]
            failed.append(rows[~ok])
        failed = np.sort(np.concatenate(failed))
        if len(failed):  # not provably inside the shortlist: full float32 search
            LOG.info("neighbour search: %d of %d queries searched in full (near ties beyond the shortlist)",
                     len(failed), n_q)
            all_cols = np.arange(n_k)
            for s in range(0, len(failed), group):
                rows = failed[s:s + group]
                sc, ix = _exact_block(q[torch.as_tensor(rows)], kk, all_cols, k, n_k)
                scores[torch.as_tensor(rows)] = sc
                idx[torch.as_tensor(rows)] = ix
    return scores, idx
