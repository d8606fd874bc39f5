"""``pkl`` and ``tkl`` (distill/losses/projected.py) against naive dense references (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from loss_problems import VS, VT, batch_for, cached, make_problem, naive_kl_t

from distill.losses import ChunkedBatch, LossConfig, LossContext, ProjectionOperator, make_loss
from distill.teacher_dist import TeacherDist


def naive_pkl(zs, zt, s_chunk, t_chunk, C, W, k, T, direction, rest=False, mass_weight=False):
    Wd = torch.tensor(W)
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    reach = Wd.sum(0) > 0
    mass = torch.where(reach, pt.sum(0), torch.tensor(-1.0))
    K = torch.topk(mass, min(k, int(reach.sum()))).indices
    q_full = ps @ Wd  # dense (N_s, V_t): fine at this size, forbidden at real sizes
    total = 0.0
    n = 0
    for c in range(C):
        qa = q_full[s_chunk == c][:, K].mean(0)
        pa = pt[t_chunk == c][:, K].mean(0)
        if rest:
            qa = torch.cat([qa, (1 - qa.sum()).clamp_min(0)[None]])
            pa = torch.cat([pa, (1 - pa.sum()).clamp_min(0)[None]])
        if pa.sum() <= 0:
            continue
        w = float(pa.sum()) if (mass_weight and not rest) else 1.0  # teacher mass on K (before renormalizing)
        qa = qa / qa.sum()
        pa = pa / pa.sum()
        total = total + w * (naive_kl_t(pa, qa) if direction == "forward" else naive_kl_t(qa, pa))
        n += w
    return total / n * T * T


@pytest.mark.parametrize("k,T,direction,rest,mw", [(4, 1.0, "forward", False, False), (100, 2.0, "forward", False, False),
                                                   (5, 0.7, "reverse", False, False), (4, 1.0, "forward", True, False),
                                                   (6, 1.5, "reverse", True, False), (4, 1.0, "forward", False, True),
                                                   (5, 1.3, "reverse", False, True)])
def test_pkl_matches_naive(k, T, direction, rest, mw):
    zs, zt, sc, tc, C, W = make_problem(1)
    ctx = LossContext(VS, VT, projection=ProjectionOperator(sp.csr_matrix(W)))
    loss = make_loss("pkl", LossConfig(temperature=T, direction=direction, top_k=k, rest_column=rest, mass_weight=mw,
                                       expressible_rest=False), ctx)
    got = loss(batch_for(zs, zt, sc, tc, C, T))
    (g_got,) = torch.autograd.grad(got, zs)
    ref = naive_pkl(zs, zt, sc, tc, C, W, k, T, direction, rest, mw)
    (g_ref,) = torch.autograd.grad(ref, zs)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-6)


def naive_pkl_expressible(zs, zt, s_chunk, t_chunk, C, W, k, T, direction, mass_weight=True):
    """The default pkl: teacher conditioned on the columns some student token reaches; K plus one rest column."""
    Wd = torch.tensor(W)
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    reach = Wd.sum(0) > 0
    K = torch.topk(torch.where(reach, pt.sum(0), torch.tensor(-1.0)), min(k, int(reach.sum()))).indices
    q_full = ps @ Wd  # dense (N_s, V_t): fine at this size, forbidden at real sizes
    m_rows = (pt * reach).sum(-1)  # teacher mass on what the student can express
    num, den = 0.0, 0.0
    for c in range(C):
        qa = q_full[s_chunk == c][:, K].mean(0)
        m = m_rows[t_chunk == c].mean()
        pa = pt[t_chunk == c][:, K].mean(0) / m
        qa = torch.cat([qa, (1 - qa.sum()).clamp_min(0)[None]])
        pa = torch.cat([pa, (1 - pa.sum()).clamp_min(0)[None]])
        w = float(m) if mass_weight else 1.0
        num = num + w * (naive_kl_t(pa, qa) if direction == "forward" else naive_kl_t(qa, pa))
        den += w
    return num / den * T * T


@pytest.mark.parametrize("k,T,direction,mw", [(4, 1.0, "forward", True), (100, 2.0, "forward", True),
                                              (5, 0.7, "reverse", True), (3, 1.0, "forward", False)])
def test_pkl_expressible_rest_matches_naive(k, T, direction, mw):
    zs, zt, sc, tc, C, W = make_problem(13)
    zt = zt.clone()
    zt[:, VT - 1] += 2.0  # real mass on the column no student token reaches
    ctx = LossContext(VS, VT, projection=ProjectionOperator(sp.csr_matrix(W)))
    loss = make_loss("pkl", LossConfig(temperature=T, direction=direction, top_k=k, mass_weight=mw), ctx)
    got = loss(batch_for(zs, zt, sc, tc, C, T))
    ref = naive_pkl_expressible(zs, zt, sc, tc, C, W, k, T, direction, mw)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(ref, zs)[0], rtol=1e-4, atol=1e-6)
    # the same through a complete top-k cache
    cached_loss = loss(batch_for(zs, zt, sc, tc, C, T, teacher=cached(zt, VT))) if T == 1.0 else None
    if cached_loss is not None:
        assert cached_loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_pkl_never_uses_unreachable_columns():
    zs, zt, sc, tc, C, W = make_problem(2)
    zt = zt.clone()
    zt[:, VT - 1] = 20.0  # the teacher loves a column no student token maps to
    ctx = LossContext(VS, VT, projection=ProjectionOperator(sp.csr_matrix(W)))
    loss = make_loss("pkl", LossConfig(top_k=3), ctx)
    cols = loss.select_columns(TeacherDist(VT, logits=zt))
    assert VT - 1 not in cols.tolist()
    assert torch.isfinite(loss(batch_for(zs, zt, sc, tc, C)))


def test_pkl_exact_chunks_only_matches_naive():
    zs, zt, sc, tc, C, W = make_problem(12)
    exact = torch.tensor([True, False, True, True, False])
    ctx = LossContext(VS, VT, projection=ProjectionOperator(sp.csr_matrix(W)))
    loss = make_loss("pkl", LossConfig(top_k=5, exact_chunks_only=True, expressible_rest=False), ctx)
    got = loss(ChunkedBatch(zs, sc, TeacherDist(VT, logits=zt), tc, C, exact))
    # naive: the mass-weighted renormalized KL over the exact chunks only
    keep = exact.nonzero()[:, 0].tolist()
    s_rows = torch.cat([(sc == c).nonzero()[:, 0] for c in keep])
    t_rows = torch.cat([(tc == c).nonzero()[:, 0] for c in keep])
    remap = {c: i for i, c in enumerate(keep)}
    sc2 = torch.tensor([remap[int(c)] for c in sc[s_rows]])
    tc2 = torch.tensor([remap[int(c)] for c in tc[t_rows]])
    Wd = torch.tensor(W)
    pt = torch.softmax(zt, -1)
    reach = Wd.sum(0) > 0
    K = torch.topk(torch.where(reach, pt.sum(0), torch.tensor(-1.0)), 5).indices  # columns: the whole batch's mass
    ps = torch.softmax(zs, -1)
    num, den = 0.0, 0.0
    for c in range(len(keep)):
        qa = (ps[s_rows][sc2 == c] @ Wd)[:, K].mean(0)
        pa = pt[t_rows][tc2 == c][:, K].mean(0)
        w = float(pa.sum())
        num = num + w * naive_kl_t(pa / pa.sum(), qa / qa.sum())
        den += w
    ref = num / den
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(ref, zs)[0], rtol=1e-4, atol=1e-6)
    # without the mask every chunk counts
    assert make_loss("pkl", LossConfig(top_k=5, expressible_rest=False), ctx)(
        batch_for(zs, zt, sc, tc, C)).item() != pytest.approx(got.item())


def test_pkl_teacher_to_student_is_the_projected_teacher_kl():
    """pkl with the teacher projected (first pieces) equals the naive dense KL in the student's space; auto picks it
    exactly when the teacher is the coarser side."""
    zs, zt, sc, tc, C, W = make_problem(14)
    rng = np.random.default_rng(3)
    R = np.zeros((VT, VS), dtype=np.float32)  # teacher token → its first student piece (weight 1)
    R[np.arange(VT - 1), rng.integers(0, VS, VT - 1)] = 1.0  # the last teacher token maps nowhere
    ctx = LossContext(VS, VT, projection=ProjectionOperator(sp.csr_matrix(W)),
                      down_projection=ProjectionOperator.rows_of(sp.csr_matrix(R)))
    k = 6
    got = make_loss("pkl", LossConfig(top_k=k, project="teacher_to_student"), ctx)(batch_for(zs, zt, sc, tc, C))
    pt, ps = torch.softmax(zt, -1), torch.softmax(zs, -1)
    mapped = torch.tensor(R.sum(1) > 0)
    K = torch.topk(torch.where(mapped, pt.sum(0), torch.tensor(-1.0)), k).indices
    target = pt[:, K] @ torch.tensor(R)[K]
    ref = 0.0
    for c in range(C):
        p = target[tc == c].mean(0)
        ref = ref + naive_kl_t(p / p.sum(), ps[sc == c].mean(0))
    ref = ref / C
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(ref, zs)[0], rtol=1e-4, atol=1e-6)
    auto = make_loss("pkl", LossConfig(top_k=k), ctx)
    coarse = ChunkedBatch(zs, sc, TeacherDist(VT, logits=zt), tc, C, teacher_coarser=True)
    fine = ChunkedBatch(zs, sc, TeacherDist(VT, logits=zt), tc, C, teacher_coarser=False)
    assert auto(coarse).item() == pytest.approx(got.item(), rel=1e-6)
    s2t = make_loss("pkl", LossConfig(top_k=k, project="student_to_teacher"), ctx)(batch_for(zs, zt, sc, tc, C))
    assert auto(fine).item() == pytest.approx(s2t.item(), rel=1e-6) and s2t.item() != pytest.approx(got.item())


@pytest.mark.parametrize("k,T,direction", [(100, 1.0, "forward"), (3, 1.5, "forward"), (5, 1.0, "reverse")])
def test_tkl_matches_naive(k, T, direction):
    zs, zt, sc, tc, C, W = make_problem(11)
    rng = np.random.default_rng(1)
    Wts = rng.random((VT, VS)).astype(np.float32) * (rng.random((VT, VS)) < 0.3)
    Wts[VT - 2] = 0.0  # an unmapped teacher token
    Wts = Wts / np.maximum(Wts.sum(1, keepdims=True), 1e-9)
    ctx = LossContext(VS, VT, projection=ProjectionOperator.rows_of(sp.csr_matrix(Wts)))
    got = make_loss("tkl", LossConfig(temperature=T, direction=direction, top_k=k), ctx)(batch_for(zs, zt, sc, tc, C, T))
    pt = torch.softmax(zt / T, -1)
    mapped = torch.tensor(Wts.sum(1) > 0)
    K = torch.topk(torch.where(mapped, pt.sum(0), torch.tensor(-1.0)), min(k, int(mapped.sum()))).indices
    target = pt[:, K] @ torch.tensor(Wts)[K]
    ps = torch.softmax(zs / T, -1)
    ref = 0.0
    for c in range(C):
        p = target[tc == c].mean(0)
        p = p / p.sum()
        q = ps[sc == c].mean(0)
        ref = ref + (naive_kl_t(p, q) if direction == "forward" else naive_kl_t(q, p.clamp_min(1e-12)))
    ref = ref / C * T * T
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got, zs)[0], torch.autograd.grad(ref, zs)[0], rtol=1e-4, atol=1e-6)
