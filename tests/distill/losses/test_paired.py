"""``hkl`` and ``gold`` (distill/losses/paired.py) against a naive reference: a divergence on the paired
columns plus ULD on the rest (values and gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loss_problems import VS, VT, batch_for, make_problem, naive_kl_t, naive_uld

from distill.losses import LossConfig, LossContext, make_loss


def naive_paired(zs, zt, sc, tc, C, ids_s, ids_t, T, direction, uld_weight, jsd, rest=True, mass_weight=False):
    ps = torch.softmax(zs / T, -1)
    pt = torch.softmax(zt / T, -1)
    mask_s = torch.zeros(zs.shape[1], dtype=torch.bool)
    mask_s[ids_s] = True
    mask_t = torch.zeros(zt.shape[1], dtype=torch.bool)
    mask_t[ids_t] = True
    paired, n = 0.0, 0.0
    for c in range(C):
        q = ps[sc == c][:, ids_s].mean(0)
        p = pt[tc == c][:, ids_t].mean(0)
        w = float(p.sum()) if (mass_weight and not rest) else 1.0
        if rest:
            q = torch.cat([q, (1 - q.sum()).clamp_min(0)[None]])
            p = torch.cat([p, (1 - p.sum()).clamp_min(0)[None]])
        else:
            q, p = q / q.sum(), p / p.sum()
        if jsd:
            m = (p + q) / 2
            paired = paired + w * (0.5 * naive_kl_t(p, m) + 0.5 * naive_kl_t(q, m))
        else:
            paired = paired + w * (naive_kl_t(p, q) if direction == "forward" else naive_kl_t(q, p))
        n += w
    rest = naive_uld(ps.masked_fill(mask_s, 0), pt.masked_fill(mask_t, 0), sc, tc, C)
    return (paired / n + uld_weight * rest) * T * T


@pytest.mark.parametrize("name,T,direction,rest,mw", [("hkl", 1.0, "forward", True, False),
                                                      ("hkl", 2.0, "reverse", True, False),
                                                      ("gold", 1.3, "forward", True, False),
                                                      ("hkl", 1.0, "forward", False, False),
                                                      ("gold", 1.0, "forward", False, False),
                                                      ("hkl", 1.2, "forward", False, True),
                                                      ("gold", 1.0, "forward", False, True)])
def test_paired_losses_match_naive(name, T, direction, rest, mw):
    zs, zt, sc, tc, C, _ = make_problem(5)
    ids_s, ids_t = np.array([0, 2, 3, 5]), np.array([4, 0, 7, 1])
    ctx = LossContext.with_pairs(VS, VT, ids_s, ids_t, "cpu")
    params = LossConfig(temperature=T, direction=direction, uld_topk=0, uld_weight=0.7, rest_column=rest,
                        mass_weight=mw)
    got = make_loss(name, params, ctx)(batch_for(zs, zt, sc, tc, C, T))
    ref = naive_paired(zs, zt, sc, tc, C, torch.tensor(ids_s), torch.tensor(ids_t), T, direction, 0.7,
                       jsd=name == "gold", rest=rest, mass_weight=mw)
    (g1,) = torch.autograd.grad(got, zs)
    (g2,) = torch.autograd.grad(ref, zs)
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
