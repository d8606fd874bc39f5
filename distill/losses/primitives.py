"""Tensor primitives shared by the distillation losses: chunk means, divergences, sorted top-k, rest columns."""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12
LOG_EPS = float(np.log(EPS))


def chunk_mean(x: torch.Tensor, chunk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """``(C, D)`` mean of the rows of ``x (N, D)`` per chunk id."""
    out = torch.zeros(n_chunks, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, chunk, x)
    cnt = torch.bincount(chunk, minlength=n_chunks).clamp_min(1).to(x.dtype)
    return out / cnt[:, None]


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(C,)`` KL(p ‖ q) per row for (sub-)probability rows; 0·log 0 = 0."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(EPS)) - torch.log(q.clamp_min(EPS))), torch.zeros_like(p)).sum(-1)


def divergence(p_teacher: torch.Tensor, q_student: torch.Tensor, direction: str) -> torch.Tensor:
    return kl_rows(p_teacher, q_student) if direction == "forward" else kl_rows(q_student, p_teacher)


def jsd_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (p + q)
    return 0.5 * kl_rows(p, m) + 0.5 * kl_rows(q, m)


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows divided by their sums; also returns which rows had any mass."""
    s = x.sum(-1, keepdim=True)
    return x / s.clamp_min(EPS), (s[:, 0] > 0)


def with_rest(x: torch.Tensor) -> torch.Tensor:
    """Append one column with the mass outside ``x``'s columns (rows of x sum to ≤ 1)."""
    return torch.cat([x, (1.0 - x.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)


def weighted_chunk_mean(d: torch.Tensor, mass: torch.Tensor, has: torch.Tensor, mass_weight: bool) -> torch.Tensor:
    """Mean of per-chunk divergences ``d (C,)`` over chunks with teacher mass (``has``).

    With ``mass_weight`` each chunk counts with the teacher's mass ``m_c`` on the compared
    columns: ``Σ m_c d_c / Σ m_c``. By the chain rule of KL,
    ``KL(p ‖ q) = KL([m, 1−m] ‖ [q_K, 1−q_K]) + m·KL(p̃_K ‖ q̃_K) + (1−m)·KL(p̃_rest ‖ q̃_rest)``:
    this keeps the conditional term of the part of the teacher's distribution the student can
    express (``m·KL(p̃_K ‖ q̃_K)``) and drops the split term, which would make the student copy the
    teacher's mass on tokens it cannot express (a long teacher word) onto arbitrary tokens of its own.
    """
    w = mass.detach() * has if mass_weight else has.to(d.dtype)
    return (d * w).sum() / w.sum().clamp_min(EPS)


def uld_distance(s_vals: torch.Tensor, s_tail: torch.Tensor, t_vals: torch.Tensor, t_tail: torch.Tensor) -> torch.Tensor:
    """``(C,)`` L1 between sorted vectors (zero-padded to equal length) + ``|tail_s − tail_t|``."""
    k = max(s_vals.shape[1], t_vals.shape[1])
    if s_vals.shape[1] < k:
        s_vals = torch.nn.functional.pad(s_vals, (0, k - s_vals.shape[1]))
    if t_vals.shape[1] < k:
        t_vals = torch.nn.functional.pad(t_vals, (0, k - t_vals.shape[1]))
    return (s_vals - t_vals).abs().sum(-1) + (s_tail - t_tail).abs()


def student_sorted_topk(p: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable descending top-k of student probabilities ``(N, V)`` and the remaining mass."""
    if exclude is not None:
        p = p.masked_fill(exclude[None, :], 0.0)
    V = p.shape[1]
    if k <= 0 or k >= V:
        v = torch.sort(p, dim=-1, descending=True).values
    else:
        v = torch.topk(p, k, dim=-1).values
    return v, (p.sum(-1) - v.sum(-1)).clamp_min(0)


def dense_times_sparse(dense: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """``dense (N, K) @ csr (K, V)`` without autograd, on CPU or CUDA."""
    if dense.is_cuda:
        return torch.sparse.mm(csr.to_sparse_coo().t().coalesce(), dense.t().contiguous()).t()
    return dense @ csr
