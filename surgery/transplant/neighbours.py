"""Exact top-k inner-product search, batched so that no ``Q × K`` score matrix is ever held.

For 262k queries against 128k keys a dense float32 score matrix would need 134 GB;
here queries go through in blocks (about 256 MB of scores per block by default),
each block keeping only its ``k`` best columns.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm.auto import tqdm

LOG = logging.getLogger(__name__)


def search_operands(queries, keys, k: int):
    """The float32 operands of a top-k search and its empty outputs.

    Args:
        queries: ``(Q, D)``; keys: ``(K, D)`` (arrays or tensors); k: neighbours per query.

    Returns:
        ``(q, keys, k, scores, indices)``: contiguous float32 ``(Q, D)`` and ``(K, D)``, ``k`` clipped to ``K``,
        and uninitialized ``(Q, k)`` float32 scores and int64 indices.

    Raises:
        ValueError: shapes that are not ``(Q, D)`` and ``(K, D)``.
    """
    q = torch.as_tensor(queries, dtype=torch.float32).contiguous()
    kk = torch.as_tensor(keys, dtype=torch.float32).contiguous()
    if q.ndim != 2 or kk.ndim != 2 or q.shape[1] != kk.shape[1]:
        raise ValueError(f"queries {tuple(q.shape)} and keys {tuple(kk.shape)} must be (Q, D) and (K, D)")
    k = min(k, kk.shape[0])
    return q, kk, k, torch.empty(q.shape[0], k, dtype=torch.float32), torch.empty(q.shape[0], k, dtype=torch.int64)


def topk_inner_product(
    queries: torch.Tensor | np.ndarray,
    keys: torch.Tensor | np.ndarray,
    k: int,
    device: str | torch.device | None = None,
    absolute: bool = False,
    max_block_bytes: int = 256 * 1024**2,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` keys with the largest inner product for every query (exact search).

    Args:
        queries: ``(Q, D)`` float.
        keys: ``(K, D)`` float.
        k: neighbours per query (clipped to ``K``).
        device: where the products run (default CPU); results come back on CPU.
        absolute: rank by ``|q·k|`` instead of ``q·k`` (scores keep their sign).
        max_block_bytes: budget of one block of float32 scores.
        dtype: precision of the products; float32 (default) is exact search, bfloat16 is a
            fast shortlist (e.g. OMP candidate pre-selection) whose ranks may differ on near ties.

    Returns:
        ``(scores, indices)``, both ``(Q, k)``, best first (equal scores: lower index first);
        ``scores`` float32, ``indices`` int64.
    """
    q, kk, k, scores, idx = search_operands(queries, keys, k)
    if scores.numel() == 0:
        return scores, idx
    dev = torch.device(device) if device is not None else torch.device("cpu")
    n_q, n_k = q.shape[0], kk.shape[0]
    kd = kk.to(dev, dtype)
    block = max(1, min(n_q, max_block_bytes // (4 * n_k)))
    with torch.inference_mode():
        for s in tqdm(range(0, n_q, block), desc="neighbour search", disable=not progress, leave=False):
            sims = (q[s:s + block].to(dev, dtype) @ kd.T).float()  # (block, K)
            rank = sims.abs() if absolute else sims
            # a few extra candidates so that ties resolve to the lowest key index (deterministic)
            m = min(n_k, k + 8)
            r, i = torch.topk(rank, m, dim=1)
            order = torch.from_numpy(np.lexsort((i.cpu().numpy(), -r.cpu().numpy()), axis=1)[:, :k])
            i = i.cpu().gather(1, order)
            scores[s:s + block] = sims.gather(1, i.to(dev)).cpu()
            idx[s:s + block] = i
    return scores, idx
