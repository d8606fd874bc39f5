"""``kl`` and ``ce`` (distill/losses/same_vocab.py): one shared vocabulary, dense and cached teachers."""

from __future__ import annotations

import pytest
import torch

from loss_problems import VS, VT, batch_for, cached, make_problem, naive_kl_t

from distill.losses import ChunkedBatch, LossConfig, LossContext, make_loss
from distill.teacher_dist import TeacherDist


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_matches_naive(direction):
    g = torch.Generator().manual_seed(6)
    N, V = 9, VS
    zs = torch.randn(N, V, generator=g).requires_grad_()
    zt = torch.randn(N, V, generator=g)
    sc = torch.arange(N)
    tc = torch.randperm(N, generator=g)  # one-to-one chunks; teacher row j belongs to chunk tc[j]
    got = make_loss("kl", LossConfig(direction=direction), LossContext(V, V))(
        ChunkedBatch(zs, sc, TeacherDist(V, logits=zt), tc, N))
    zt_aligned = torch.stack([zt[int((tc == c).nonzero())] for c in range(N)])
    lp, lq = torch.log_softmax(zt_aligned, -1), torch.log_softmax(zs, -1)
    ref = ((lp.exp() * (lp - lq)) if direction == "forward" else (lq.exp() * (lq - lp))).sum(-1).mean()
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    g_ref = torch.autograd.grad(ref, zs)[0]
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], g_ref)
    # the same through a complete top-k cache
    got_c = make_loss("kl", LossConfig(direction=direction), LossContext(V, V))(
        ChunkedBatch(zs, sc, cached(zt, V), tc, N))
    assert got_c.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got_c, zs)[0], g_ref, rtol=1e-4, atol=1e-6)
    # and with a temperature
    T = 1.8
    got_t = make_loss("kl", LossConfig(direction=direction, temperature=T), LossContext(V, V))(
        ChunkedBatch(zs, sc, TeacherDist(V, T, logits=zt), tc, N))
    lp, lq = torch.log_softmax(zt_aligned / T, -1), torch.log_softmax(zs / T, -1)
    ref_t = ((lp.exp() * (lp - lq)) if direction == "forward" else (lq.exp() * (lq - lp))).sum(-1).mean() * T * T
    assert got_t.item() == pytest.approx(ref_t.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got_t, zs)[0], torch.autograd.grad(ref_t, zs)[0])


def test_kl_many_to_one_chunks_match_naive():
    zs, zt, sc, tc, C, _ = make_problem(7, vs=VS, vt=VS)
    got = make_loss("kl", LossConfig(), LossContext(VS, VS))(batch_for(zs, zt, sc, tc, C))
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    ref = sum(naive_kl_t(pt[tc == c].mean(0), ps[sc == c].mean(0)) for c in range(C)) / C
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_kl_cache_equals_dense_when_complete():
    zs, zt, sc, tc, C, _ = make_problem(9, vs=VS, vt=VS)
    loss = make_loss("kl", LossConfig(), LossContext(VS, VS))
    assert loss(batch_for(zs, zt, sc, tc, C, teacher=cached(zt, VS))).item() == pytest.approx(
        loss(batch_for(zs, zt, sc, tc, C)).item(), rel=1e-5)


def test_ce_loss_is_zero_with_grad_path():
    zs, zt, sc, tc, C, _ = make_problem(10)
    out = make_loss("ce", LossConfig(), LossContext(VS, VT))(batch_for(zs, zt, sc, tc, C))
    assert out.item() == 0.0 and out.requires_grad
