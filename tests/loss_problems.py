"""Tiny chunked problems and slow obvious references shared by the distillation loss tests
(``tests/distill/losses/``): random student/teacher logits over a 7- and an 11-token vocabulary, chunk ids in
shuffled row order, a projection with one-hot, spread and unmapped rows."""

from __future__ import annotations

import numpy as np
import torch

from distill.losses import ChunkedBatch
from distill.teacher_dist import TeacherDist

VS, VT = 7, 11


def make_problem(seed=0, n_chunks=5, vs=VS, vt=VT):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # chunk sizes 1..3 on each side
    cs = rng.integers(1, 4, n_chunks)
    ct = rng.integers(1, 4, n_chunks)
    s_chunk = torch.tensor(np.repeat(np.arange(n_chunks), cs))
    t_chunk = torch.tensor(np.repeat(np.arange(n_chunks), ct))
    # shuffle row order: the losses must not depend on rows being sorted by chunk
    s_chunk = s_chunk[torch.randperm(len(s_chunk), generator=g)]
    t_chunk = t_chunk[torch.randperm(len(t_chunk), generator=g)]
    zs = (torch.randn(len(s_chunk), vs, generator=g) * 2).requires_grad_()
    zt = torch.randn(len(t_chunk), vt, generator=g) * 2
    # projection: some exact one-hot rows, some spread rows, one unmapped row, one unreachable column
    W = np.zeros((vs, vt), dtype=np.float32)
    for i in range(vs - 1):
        if i % 2 == 0:
            W[i, i] = 1.0
        else:
            cols = rng.choice(vt - 1, size=3, replace=False)
            w = rng.random(3) + 0.1
            W[i, cols] = w / w.sum()
    return zs, zt, s_chunk, t_chunk, n_chunks, W


def naive_kl_t(p, q):
    """Differentiable KL on 1-D tensors, skipping p == 0."""
    m = p > 0
    return (p[m] * (torch.log(p[m]) - torch.log(q[m].clamp_min(1e-12)))).sum()


def naive_uld(ps, pt, s_chunk, t_chunk, C):
    """Exact: full sort, per-chunk mean of sorted vectors, zero padding."""
    ss = torch.sort(ps, -1, descending=True).values
    st = torch.sort(pt, -1, descending=True).values
    k = max(ss.shape[1], st.shape[1])
    ss = torch.nn.functional.pad(ss, (0, k - ss.shape[1]))
    st = torch.nn.functional.pad(st, (0, k - st.shape[1]))
    tot = 0.0
    for c in range(C):
        tot = tot + (ss[s_chunk == c].mean(0) - st[t_chunk == c].mean(0)).abs().sum()
    return tot / C


def batch_for(zs, zt, s_chunk, t_chunk, C, T=1.0, teacher=None):
    teacher = teacher or TeacherDist(zt.shape[1], T, logits=zt)
    return ChunkedBatch(zs, s_chunk, teacher, t_chunk, C)


def cached(zt, k):
    v, i = torch.topk(zt, k, dim=-1)
    return TeacherDist(zt.shape[1], 1.0, topk_ids=i, topk_logits=v, lse=torch.logsumexp(zt, -1))
