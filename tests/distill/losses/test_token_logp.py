"""The one-pass next-token log-probabilities against log_softmax + gather, and gradient balancing on them."""

from __future__ import annotations

import torch

from distill.losses import LossConfig, LossContext, make_loss
from distill.losses.base import balance_by_gradient
from distill.losses.token_logp import ROWS, balance_on_token_logp, mean_ce, token_log_probs


def problem(seed: int, n: int = 2 * ROWS + 5, v: int = 300):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g) * 4).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[[0, 7, n - 1]] = -100
    return z, t, g


def test_values_and_gradients_equal_log_softmax_gather():
    z, t, g = problem(0)
    up = torch.randn(z.shape[0], generator=g)  # an arbitrary upstream gradient dL/dℓ
    logp, r = token_log_probs(z, t)
    (g_fast,) = torch.autograd.grad((logp * up).sum(), z)
    zd = z.detach().double().requires_grad_()
    ref = torch.log_softmax(zd, -1).gather(1, t.clamp_min(0)[:, None])[:, 0] * (t >= 0)
    (g_ref,) = torch.autograd.grad((ref * up.double()).sum(), zd, retain_graph=True)
    torch.testing.assert_close(logp.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-5, atol=1e-6)
    assert (g_fast[t < 0] == 0).all() and (logp[t < 0] == 0).all()
    # r is the squared norm of each row's Jacobian dℓ_p/dz_p, computed here row by row
    for p in (1, 5, ROWS, z.shape[0] - 2, 7):
        (row,) = torch.autograd.grad(ref[p], zd, retain_graph=True)
        torch.testing.assert_close(r[p].double(), row.square().sum(), rtol=1e-4, atol=1e-6)


def test_mean_ce_equals_cross_entropy():
    z, t, _ = problem(1)
    ce = mean_ce(token_log_probs(z, t)[0], t)
    ref = torch.nn.functional.cross_entropy(z, t, ignore_index=-100)
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(torch.autograd.grad(ce, z)[0], torch.autograd.grad(ref, z)[0], rtol=1e-5, atol=1e-7)


def test_balancing_on_log_probs_equals_balancing_on_the_logits():
    """CE and alm read the logits only through ℓ: the (N,)-vector norms give the (N, V) gradients' ratio."""
    from distill.losses import ChunkedBatch
    from distill.teacher_dist import TeacherDist

    z, t, g = problem(2)
    leaf = z
    z = leaf * 1.0  # a non-leaf, as the trainer's logits
    n = z.shape[0]
    chunk = torch.arange(n) // 3
    C = int(chunk.max()) + 1
    logp, r = token_log_probs(z, t)
    ce = mean_ce(logp, t)
    alm = make_loss("alm", LossConfig(name="alm"), LossContext(z.shape[1], 7))
    tlp = -torch.rand(n, generator=g) * 5

    def batch(**kw):
        b = ChunkedBatch(kw.get("logits"), chunk, TeacherDist(7, logits=torch.zeros(n, 7)), chunk, C)
        b.student_targets, b.teacher_target_logp = t, tlp
        b.student_target_logp = kw.get("logp")
        return b

    kd_vec, kd_full = alm(batch(logp=logp)), alm(batch(logits=z))
    torch.testing.assert_close(kd_vec, kd_full, rtol=1e-5, atol=1e-7)  # the same loss either way
    torch.testing.assert_close(torch.autograd.grad(kd_vec, leaf, retain_graph=True)[0],
                               torch.autograd.grad(kd_full, leaf, retain_graph=True)[0], rtol=1e-4, atol=1e-8)
    (fast,) = balance_on_token_logp(ce, [kd_vec], logp, r)
    (slow,) = balance_by_gradient(ce, [kd_full], z)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-7)
    assert abs(float(fast.detach()) / float(kd_vec.detach()) - 1) > 0.1  # the balance did rescale the term


def test_bf16_logits_get_bf16_gradients():
    z, t, _ = problem(3)
    zb = z.detach().bfloat16().requires_grad_()
    logp, _ = token_log_probs(zb, t)
    ref = torch.log_softmax(zb.detach().float(), -1).gather(1, t.clamp_min(0)[:, None])[:, 0] * (t >= 0)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-4)
    logp.sum().backward()
    assert zb.grad.dtype == torch.bfloat16
