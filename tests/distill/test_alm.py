"""ALM (approximate likelihood matching): the vectorized loss against a per-chunk Python loop, and its wiring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.chunks import align_chunks, align_chunks_reference, position_chunks
from distill.losses import ChunkedBatch, LossConfig, LossContext, loss_names, make_loss
from distill.losses.alm import binary_ce, complete_chunks, log1mexp, target_log_probs
from distill.teacher_dist import TeacherDist
from distill.teachers import position_stats


def naive_alm(student_logits, student_chunk, student_targets, teacher_logp, teacher_chunk, n_chunks, complete,
              tau=100.0, eps=1e-6):
    """The published form written out chunk by chunk in float64 (tokenkit's binary_ce, chunk_count weights)."""
    logq = torch.log_softmax(student_logits.double(), dim=-1)
    terms = []
    for c in range(n_chunks):
        s_rows = [i for i in range(len(student_chunk)) if int(student_chunk[i]) == c]
        t_rows = [j for j in range(len(teacher_chunk)) if int(teacher_chunk[j]) == c]
        if not s_rows or not t_rows or not complete[c]:
            continue
        ls = sum(logq[i, int(student_targets[i])] for i in s_rows if int(student_targets[i]) >= 0)
        lt = sum(float(teacher_logp[j]) for j in t_rows)
        ls = torch.clamp(torch.as_tensor(ls, dtype=torch.float64), max=0.0)
        lt = min(lt, 0.0)
        a = lt / tau - eps
        b = ls / tau - eps
        terms.append(-(math.exp(a) * b + (1 - math.exp(a)) * torch.log(1 - torch.exp(b))))
    return torch.stack(terms).mean() if terms else student_logits.sum() * 0.0


def random_batch(seed: int, n_chunks=40, vs=50):
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes_s = rng.integers(1, 4, n_chunks)  # 1..3 student tokens per chunk
    sizes_t = rng.integers(1, 3, n_chunks)
    cs = torch.from_numpy(np.repeat(np.arange(n_chunks), sizes_s))
    ct = torch.from_numpy(np.repeat(np.arange(n_chunks), sizes_t))
    zs = (torch.randn(len(cs), vs, generator=g) * 2).requires_grad_()
    targets = torch.randint(0, vs, (len(cs),), generator=g)
    targets[3] = -100  # a position without a target contributes nothing
    tlp = -torch.rand(len(ct), generator=g) * 6  # teacher log-probs of its own tokens
    complete = torch.ones(n_chunks, dtype=torch.bool)
    complete[0] = False  # e.g. a block's first chunk whose first token nobody predicts
    b = ChunkedBatch(zs, cs, TeacherDist(7, logits=torch.zeros(len(ct), 7)), ct, n_chunks)
    b.student_targets, b.teacher_target_logp, b.chunk_complete = targets, tlp, complete
    return b


def test_alm_is_registered():
    assert "alm" in loss_names()
    assert LossConfig(name="alm").validate() == []
    assert LossConfig(name="alm", alm_temperature=0).validate()


@pytest.mark.parametrize("seed,tau", [(0, 100.0), (1, 100.0), (2, 1.0)])
def test_vectorized_matches_naive_loop_values_and_gradients(seed, tau):
    b = random_batch(seed)
    loss = make_loss("alm", LossConfig(name="alm", alm_temperature=tau), LossContext(50, 7))
    fast = loss(b)
    (g_fast,) = torch.autograd.grad(fast, b.student_logits)
    slow = naive_alm(b.student_logits, b.student_chunk, b.student_targets, b.teacher_target_logp, b.teacher_chunk,
                     b.n_chunks, b.chunk_complete, tau=tau)
    (g_slow,) = torch.autograd.grad(slow, b.student_logits)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_fast.double(), g_slow.double(), rtol=1e-4, atol=1e-8)
    # every position of a compared chunk gets a signal, not only the chunk's first one
    cs = b.student_chunk
    later = torch.ones(len(cs), dtype=torch.bool)
    later[0] = False
    later[1:] = cs[1:] == cs[:-1]
    later &= b.chunk_complete[cs] & (b.student_targets >= 0)
    assert later.sum() > 10
    assert (g_fast[later].abs().sum(-1) > 0).all()
    assert (g_fast[~b.chunk_complete[cs]] == 0).all()  # incomplete chunks are not compared


def test_softmax_temperature_does_not_scale_alm():
    """alm compares the student's own-token likelihoods: the KD temperature (and its T² factor) do not act on it."""
    b = random_batch(3)
    plain = make_loss("alm", LossConfig(name="alm"), LossContext(50, 7))(b)
    hot = make_loss("alm", LossConfig(name="alm", temperature=2.0), LossContext(50, 7))(b)
    slow = naive_alm(b.student_logits, b.student_chunk, b.student_targets, b.teacher_target_logp, b.teacher_chunk,
                     b.n_chunks, b.chunk_complete, tau=100.0)
    torch.testing.assert_close(hot.double(), slow, rtol=1e-5, atol=1e-7)
    assert hot.item() == plain.item()


def test_binary_ce_is_minimal_where_the_likelihoods_agree():
    log_t = torch.tensor([-0.5, -3.0, -20.0, -80.0], dtype=torch.float64)
    grid = torch.linspace(-120, -0.01, 20000, dtype=torch.float64)
    for lt in log_t:
        vals = binary_ce(lt.expand_as(grid), grid)
        best = grid[torch.argmin(vals)]
        assert abs(float(best) - float(lt)) < 0.05 * abs(float(lt)) + 0.02


def test_log1mexp_stable_and_finite_gradients():
    x = torch.tensor([-1e-7, -1e-3, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    ref = torch.log(-torch.expm1(x.detach()))
    torch.testing.assert_close(y.detach(), ref)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_target_log_probs_equals_the_cached_statistic():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 100, generator=g) * 3
    targets = torch.randint(0, 100, (30,), generator=g)
    targets[5] = -100
    rows = torch.tensor([1, 5, 7, 29])
    dist = TeacherDist(100, logits=logits).select(rows)
    torch.testing.assert_close(target_log_probs(dist, targets[rows]), position_stats(logits, targets)[rows, 0])


def test_complete_chunks_against_a_walk():
    # side a: BOS (zero length) then 4 tokens; side b: no start token, 3 tokens; same 10 bytes
    ends_a = np.array([[0, 2, 5, 7, 10]]); valid_a = np.array([[False, True, True, True, True]])
    ends_b = np.array([[5, 7, 10]]); valid_b = np.ones((1, 3), bool)
    al = align_chunks(ends_a, valid_a, ends_b, valid_b)
    ca, cb, n = align_chunks_reference(ends_a[0], valid_a[0], ends_b[0], valid_b[0])
    assert al.chunk_a[0].tolist() == ca and al.chunk_b[0].tolist() == cb and n == 3
    ok = complete_chunks(al.chunk_a, position_chunks(al.chunk_a), n) & \
        complete_chunks(al.chunk_b, position_chunks(al.chunk_b), n)
    # chunk 0 (bytes 0..5): side b's first token has no predicting position -> not comparable
    assert ok.tolist() == [False, True, True]


def test_alm_recipe_loads_and_validates():
    from distill.config import DistillConfig
    from surgery.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(DistillConfig, root / "recipes" / "distill_alm_gemma3_to_smollm2.yaml", ["train.steps=3"])
    assert cfg.loss.name == "alm" and cfg.loss.alm_temperature == 100.0 and cfg.cache.enabled


def test_balance_by_gradient_equalizes_gradient_norms_on_the_logits():
    from distill.losses.base import balance_by_gradient

    g = torch.Generator().manual_seed(0)
    leaf = torch.randn(2, 5, 30, generator=g, requires_grad=True)
    logits = leaf * 1.0  # a non-leaf, as the trainer's logits
    labels = torch.randint(0, 30, (10,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), labels)
    kd = 1e-3 * (torch.log_softmax(logits, -1) ** 2).mean()  # a small term with a gradient
    (kd_b,) = balance_by_gradient(ce, [kd], logits)
    g_ce = torch.autograd.grad(ce, logits, retain_graph=True)[0].norm()
    g_kd = torch.autograd.grad(kd_b, logits, retain_graph=True)[0].norm()
    torch.testing.assert_close(g_kd, g_ce)
    assert torch.autograd.grad(kd, logits, retain_graph=True)[0].norm() < 0.1 * g_ce  # it was much weaker
