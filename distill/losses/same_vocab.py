"""Same-vocabulary losses: ``kl`` and ``ce``.

- ``kl`` — plain KL for a teacher with the student's own tokenizer.
- ``ce`` — no distillation term (the student's cross-entropy only).
"""

from __future__ import annotations

import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss
from distill.losses.primitives import LOG_EPS, chunk_mean, divergence


@register_loss("ce")
class CELoss(KDLoss):
    """No distillation term."""

    needs = "none"

    def __call__(self, batch: ChunkedBatch) -> torch.Tensor:
        return batch.student_logits.sum() * 0.0


class _BlockKL(torch.autograd.Function):
    """Σ_rows KL between teacher rows and ``softmax(z_s / T)``, in row blocks, saving only the inputs.

    Forward ``KL(p ‖ q)``: gradient ``(q − p) / T``. Reverse ``KL(q ‖ p)``: gradient
    ``q ⊙ (log q − log p − KL_row) / T``. Both are recomputed block by block in backward, so
    no ``(N, V)`` intermediate outlives its block (a same-vocabulary KL at V = 262k would
    otherwise keep several copies of the logits alive).
    """

    @staticmethod
    def forward(ctx, zs, teacher_logp_fn, T, reverse, block):
        ctx.teacher_logp_fn, ctx.T, ctx.reverse, ctx.block = teacher_logp_fn, T, reverse, block
        ctx.save_for_backward(zs)
        total = torch.zeros((), dtype=torch.float32, device=zs.device)
        for a in range(0, zs.shape[0], block):
            logq = torch.log_softmax(zs[a:a + block].float() / T, dim=-1)
            logp = teacher_logp_fn(a, a + block)
            if reverse:
                total += (logq.exp() * (logq - logp.clamp_min(LOG_EPS))).sum()
            else:
                total += torch.where(logp > -float("inf"), logp.exp() * (logp - logq), 0.0).sum()
        return total

    @staticmethod
    def backward(ctx, grad):
        (zs,) = ctx.saved_tensors
        out = torch.empty_like(zs)
        T = ctx.T
        for a in range(0, zs.shape[0], ctx.block):
            logq = torch.log_softmax(zs[a:a + ctx.block].float() / T, dim=-1)
            logp = ctx.teacher_logp_fn(a, a + ctx.block)
            q = logq.exp()
            if ctx.reverse:
                d = logq - logp.clamp_min(LOG_EPS)
                g = q * (d - (q * d).sum(-1, keepdim=True))
            else:
                g = q - logp.exp()
            out[a:a + ctx.block] = (g * (grad / T)).to(zs.dtype)
        return out, None, None, None, None


@register_loss("kl")
class KLLoss(KDLoss):
    """KL between teacher and student sharing one vocabulary (chunks are then one-to-one)."""

    needs = "same_vocab"
    block = 256

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        t = batch.teacher
        C = batch.n_chunks
        one_to_one = (len(batch.student_chunk) == C and len(batch.teacher_chunk) == C)
        if one_to_one:
            # rows in chunk order on both sides; blockwise, memory-lean (see _BlockKL)
            zs = batch.student_logits[torch.argsort(batch.student_chunk)]
            t_rows = torch.argsort(batch.teacher_chunk)
            if t.dense:
                view = t.select(t_rows)

                def logp_fn(a, b):
                    return torch.log_softmax(view._z(a, min(b, view.n)), dim=-1)
            else:
                ids, logp_all = t.sparse_log_probs()
                ids, logp_all = ids[t_rows], logp_all[t_rows]

                def logp_fn(a, b):  # cached teacher: its top-k support only
                    out = torch.full((min(b, len(ids)) - a, t.vocab_size), float("-inf"), device=ids.device)
                    return out.scatter_(1, ids[a:b], logp_all[a:b])
            reverse = self.p.direction == "reverse"
            return _BlockKL.apply(zs, logp_fn, self.p.temperature, reverse, self.block) / C
        logq = self.student_log_probs(batch)
        if t.dense:
            pc = chunk_mean(t.full_log_probs().exp(), batch.teacher_chunk, C)
        else:
            ids, logp = t.sparse_log_probs()
            p_dense = torch.zeros(t.n, t.vocab_size, device=logq.device).scatter_(1, ids, logp.exp())
            pc = chunk_mean(p_dense, batch.teacher_chunk, C)
        qc = chunk_mean(logq.exp(), batch.student_chunk, C)
        return divergence(pc, qc, self.p.direction).mean()
