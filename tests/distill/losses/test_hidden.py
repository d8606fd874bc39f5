"""``hidden``: chunk ends against a walk, the loss against its formula, the lagged balance against exact norms."""

from __future__ import annotations

import numpy as np
import torch

from distill.losses import ChunkedBatch, LossConfig, LossContext, loss_names, make_loss
from distill.losses.hidden import HiddenBalance, chunk_last_tokens
from distill.teacher_dist import TeacherDist


def test_chunk_last_tokens_against_a_loop():
    rng = np.random.default_rng(0)
    chunks = np.full((3, 12), -1)
    c = 0
    for b in range(3):
        i = int(rng.integers(0, 2))  # a leading special token in no chunk
        while i < 11:
            n = int(rng.integers(1, 4))
            chunks[b, i:i + n] = c
            c, i = c + 1, i + n
        chunks[b, 11] = -1  # a truncated tail
    got = chunk_last_tokens(chunks, c + 1)  # one more id than used: no token
    flat = chunks.reshape(-1)
    want = [max((i for i in range(len(flat)) if flat[i] == k), default=-1) for k in range(c + 1)]
    assert got.tolist() == want and want[-1] == -1


def test_loss_is_the_relative_squared_error():
    assert "hidden" in loss_names()
    g = torch.Generator().manual_seed(0)
    hs, ht = torch.randn(9, 16, generator=g, requires_grad=True), torch.randn(9, 16, generator=g)
    b = ChunkedBatch(None, torch.arange(9), TeacherDist(3, logits=torch.zeros(9, 3)), torch.arange(9), 9)
    b.student_hidden, b.teacher_hidden = hs, ht
    got = make_loss("hidden", LossConfig(name="hidden"), LossContext(5, 3))(b)
    want = sum(float(((hs[c] - ht[c]) ** 2).sum()) for c in range(9)) / sum(float((ht[c] ** 2).sum()) for c in range(9))
    assert abs(float(got.detach()) - want) < 1e-5 * want
    b.n_chunks = 0
    assert float(make_loss("hidden", LossConfig(name="hidden"), LossContext(5, 3))(b).detach()) == 0.0


def _step(seed, w_body, head, balance):
    """A body (h = tanh(x W)), a head, CE on every position and the hidden term at some rows; one backward."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 6, generator=g)
    h = torch.tanh(x @ w_body)  # (2, 7, 8), the head's input
    logits = h @ head.T
    labels = torch.randint(0, head.shape[0], (14,), generator=g)
    ce = torch.nn.functional.cross_entropy(logits.reshape(14, -1), labels)
    rows = torch.tensor([1, 4, 8, 13])
    h_rows = h.reshape(-1, 8)[rows]
    target = torch.randn(4, 8, generator=g)
    kd = (h_rows - target).square().sum() / target.square().sum()
    exact = (torch.autograd.grad(ce, h, retain_graph=True)[0].norm()
             / torch.autograd.grad(kd, h, retain_graph=True)[0].norm()).item()
    scaled = balance.apply(ce, kd, h, rows, h_rows)
    (ce + scaled).backward()
    return exact, scaled.item() / kd.item()


def test_balance_exact_first_then_the_ratio_measured_in_the_last_backward():
    torch.manual_seed(0)
    w_body = torch.randn(6, 8, requires_grad=True)
    head = torch.randn(11, 8, requires_grad=True)
    bal = HiddenBalance()
    exact0, used0 = _step(0, w_body, head, bal)
    assert abs(used0 - exact0) < 1e-4 * exact0  # step 1: the exact ratio
    exact1, used1 = _step(1, w_body, head, bal)
    assert abs(used1 - exact0) < 1e-4 * exact0  # step 2 uses what step 1's backward measured ...
    assert abs(bal.scale - exact1) < 1e-4 * exact1  # ... and its own backward measured step 2's exact ratio
    assert abs(exact1 - exact0) > 1e-3 * exact0  # (the two steps differ, so the lag is visible)
