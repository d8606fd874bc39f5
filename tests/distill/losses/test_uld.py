"""``uld`` (distill/losses/uld.py): the exact variant against a naive sort, the top-k tail bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loss_problems import VS, VT, batch_for, make_problem, naive_uld

from distill.losses import LossConfig, LossContext, make_loss, uld_distance


@pytest.mark.parametrize("T", [1.0, 1.5])
def test_uld_exact_matches_naive(T):
    zs, zt, sc, tc, C, _ = make_problem(3)
    loss = make_loss("uld", LossConfig(temperature=T, uld_topk=0), LossContext(VS, VT))
    got = loss(batch_for(zs, zt, sc, tc, C, T))
    ref = naive_uld(torch.softmax(zs / T, -1), torch.softmax(zt / T, -1), sc, tc, C) * T * T
    (g1,) = torch.autograd.grad(got, zs)
    (g2,) = torch.autograd.grad(ref, zs)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_uld_topk_error_within_bound():
    zs, zt, sc, tc, C, _ = make_problem(4, n_chunks=8)
    exact = make_loss("uld", LossConfig(uld_topk=0), LossContext(VS, VT))(batch_for(zs, zt, sc, tc, C)).item()
    for k in (1, 2, 3, 5):
        approx = make_loss("uld", LossConfig(uld_topk=k), LossContext(VS, VT))(batch_for(zs, zt, sc, tc, C)).item()
        # tail bound per chunk: 2·min(tail_s, tail_t), averaged over chunks
        ps, pt = torch.softmax(zs.detach(), -1), torch.softmax(zt, -1)
        ts = 1 - torch.topk(ps, k).values.sum(-1)
        tt = 1 - torch.topk(pt, k).values.sum(-1)
        bound = np.mean([2 * min(ts[sc == c].mean().item(), tt[tc == c].mean().item()) for c in range(C)])
        assert approx <= exact + 1e-6  # the tail term is a lower bound
        assert exact - approx <= bound + 1e-6


def test_uld_distance_pads_shorter_vector():
    a = torch.tensor([[0.5, 0.3, 0.2]])
    b = torch.tensor([[0.6, 0.4]])
    d = uld_distance(a, torch.zeros(1), b, torch.zeros(1))
    assert d.item() == pytest.approx(0.1 + 0.1 + 0.2)
