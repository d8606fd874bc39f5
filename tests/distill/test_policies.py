"""Parameter policies of the one trainer (row-sparse new rows, head, LoRA, all) and its NaN guard."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from distill.distributed import DistEnv
from distill.trainer import LoopSpec, NonFiniteError, ParamSpec, Policy, fit
from distill.trainer.policy import grad_norm
from helpers import tiny_llama

V = 300


class SameBatch:
    """A task repeating one batch (so a lazy per-row Adam and a dense Adam see the same rows every step)."""

    def __init__(self, batch, nan_at: int | None = None):
        self.batch, self.nan_at, self.calls = batch, nan_at, 0

    def micro_batches(self, step):
        return [self.batch]

    def loss(self, model, batch, autocast):
        self.calls += 1
        loss = model(input_ids=batch, labels=batch).loss
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return loss, {}

    def step_metrics(self):
        return {}


def _run(model, spec: ParamSpec, steps=2, task=None, **kw):
    batch = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    policy = Policy(model, spec)
    policy.attach(policy.model)
    task = task or SameBatch(batch)
    loop = LoopSpec(steps=steps, warmup=0, scheduler="constant", grad_clip=0.0, progress=False, **kw)
    fit(policy.model, task, policy, loop, DistEnv())
    return policy, batch


@pytest.mark.parametrize("tie", [False, True])
def test_row_sparse_equals_dense_adam_on_touched_rows(tie):
    """Two steps on one batch: trained rows equal a dense Adam on the gradient restricted to those rows;
    frozen rows and rows the batch never touches are bit-identical; the body does not move."""
    model = tiny_llama(V, seed=3, tie=tie).float()
    ref = tiny_llama(V, seed=3, tie=tie).float()
    w_in0 = model.get_input_embeddings().weight.detach().clone()
    w_out0 = model.get_output_embeddings().weight.detach().clone()
    trainable = np.ones(V, dtype=bool)
    trainable[:40] = False  # "copied" rows
    policy, batch = _run(model, ParamSpec(dense="none", rows=trainable, row_lr=1e-2), steps=2)
    # dense reference: the same Adam on full gradients with every row outside the step's rows zeroed
    emb, head = ref.get_input_embeddings(), ref.get_output_embeddings()
    for p in ref.parameters():
        p.requires_grad_(False)
    params = [emb.weight] if tie else [emb.weight, head.weight]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.98), eps=1e-8)
    rows_in = torch.unique(batch)
    rows_out = torch.unique(batch[:, 1:])
    if tie:
        rows_in = rows_out = torch.unique(torch.cat([rows_in, rows_out]))
    keep_in = torch.zeros(V, dtype=torch.bool)
    keep_in[rows_in] = True
    keep_out = torch.zeros(V, dtype=torch.bool)
    keep_out[rows_out] = True
    keep_in &= torch.as_tensor(trainable)
    keep_out &= torch.as_tensor(trainable)
    for _ in range(2):
        opt.zero_grad()
        ref(input_ids=batch, labels=batch).loss.backward()
        emb.weight.grad[~keep_in] = 0
        if not tie:
            head.weight.grad[~keep_out] = 0
        opt.step()
    w_in = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(w_in[keep_in], emb.weight.detach()[keep_in], rtol=1e-5, atol=1e-6)
    assert torch.equal(w_in[~keep_in], w_in0[~keep_in])  # untouched and frozen rows: bit-identical
    assert not torch.equal(w_in[keep_in], w_in0[keep_in])
    if not tie:
        w_out = model.get_output_embeddings().weight.detach()
        torch.testing.assert_close(w_out[keep_out], head.weight.detach()[keep_out], rtol=1e-5, atol=1e-6)
        assert torch.equal(w_out[~keep_out], w_out0[~keep_out])
    body = {n: p for n, p in tiny_llama(V, seed=3, tie=tie).named_parameters() if "embed" not in n and "lm_head" not in n}
    for n, p in model.named_parameters():
        if n in body:
            assert torch.equal(p, body[n]), n


def test_head_policy_moves_only_the_head():
    model = tiny_llama(V, seed=4, tie=False).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, ParamSpec(dense="head", lr=1e-2))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != ("lm_head" in n), n


def test_lora_policy_trains_adapters_and_merges():
    model = tiny_llama(V, seed=5, tie=False).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy, _ = _run(model, ParamSpec(dense="lora", lr=1e-2))
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    merged = policy.finish(policy.model)
    after = dict(merged.named_parameters())
    assert not any("lora_" in n for n in after)
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    assert any(not torch.equal(after[n], before[n]) for n in before if "proj" in n)


def test_all_policy_moves_every_matrix():
    model = tiny_llama(V, seed=6, tie=False).float()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _run(model, ParamSpec(dense="all", lr=1e-2))
    still = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert still == []


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint():
    model = tiny_llama(V, seed=7, tie=False).float()
    batch = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    policy = Policy(model, ParamSpec(dense="all", lr=1e-2))
    policy.attach(policy.model)
    saved = []
    snapshot = {}

    def checkpoint(step, elapsed):
        saved.append(step)
        snapshot.update({n: p.detach().clone() for n, p in model.named_parameters()})

    loop = LoopSpec(steps=6, warmup=0, grad_clip=1.0, checkpoint_every=2, progress=False)
    with pytest.raises(NonFiniteError) as e:
        fit(model, SameBatch(batch, nan_at=4), policy, loop, DistEnv(), checkpoint=checkpoint)
    assert "at step 4" in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2
    assert saved == [2]
    # step 3 was applied, step 4 (NaN) was not: the weights are finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_row_sparse_policy_with_a_task_whose_batches_are_not_ids():
    """A task that names its batches' token ids (``token_ids``) trains the rows of those ids, as with an id batch."""

    class Wrapped(SameBatch):
        def micro_batches(self, step):
            return [("some text", self.batch)]

        def token_ids(self, batch):
            return batch[1]

        def loss(self, model, batch, autocast):
            return super().loss(model, batch[1], autocast)

    batch = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    trainable = np.ones(V, dtype=bool)
    a, b = tiny_llama(V, seed=8, tie=False).float(), tiny_llama(V, seed=8, tie=False).float()
    _run(a, ParamSpec(dense="none", rows=trainable), task=SameBatch(batch))
    _run(b, ParamSpec(dense="none", rows=trainable), task=Wrapped(batch))
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.get_input_embeddings().weight, tiny_llama(V, seed=8, tie=False).get_input_embeddings().weight)


def _embedding_like_gradient() -> list[torch.Tensor]:
    """The gradient of a tied 49k × 32 embedding (a few large rows of the batch's tokens, tiny softmax entries
    everywhere else) and of a norm weight."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(49152, 32, generator=g) * 3e-6
    emb[torch.randint(0, 49152, (100,), generator=g)] += torch.randn(100, 32, generator=g) * 1e-2
    return [emb, torch.randn(32, generator=g) * 1e-2]


def test_grad_norm_is_the_float64_norm_however_the_rows_are_split():
    """FSDP shards every gradient by rows: the norm must not depend on the split (CONTRIBUTING.md, Tests)."""
    grads = _embedding_like_gradient()
    ref = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    got = grad_norm(grads)
    # torch.linalg.vector_norm in float32 is 2.2e-5 low here: once the sum holds a large row, the tiny squares
    # fall below its rounding step and are dropped
    assert got == pytest.approx(ref, rel=1e-7)
    for cut in (1, 20000, 49151):
        halves = grad_norm([grads[0][:cut], grads[1][:cut % 32]]), grad_norm([grads[0][cut:], grads[1][cut % 32:]])
        assert math.hypot(*halves) == pytest.approx(got, rel=1e-14)
    assert grad_norm([]) == 0.0


@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_clip_scales_gradients_as_torch_clip_grad_norm(clip):
    model = tiny_llama(V, seed=7, tie=True).float()
    ref = copy.deepcopy(model)
    batch = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    policy = Policy(model, ParamSpec(dense="all"))
    policy.attach(policy.model)
    for m in (policy.model, ref):
        m(input_ids=batch, labels=batch).loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), clip))
    assert policy.clip(clip) == pytest.approx(ref_norm, rel=1e-5)
    for (n, p), q in zip(policy.model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=n)

