"""The student's log-probability of its own next tokens, in one pass over the vocabulary each way.

The student's cross-entropy and ``alm`` (:mod:`distill.losses.alm`) read the logits only through
``ℓ_p = z_{p,t_p} − logsumexp(z_p)``, the log-probability of the next token ``t_p`` at position ``p``.
Written with ``log_softmax`` + ``gather`` (and a second ``log_softmax`` for ``alm`` on a row-selected copy
of the logits, then ``autograd.grad`` twice on the ``(N, V)`` logits to balance the two terms), a heal step
over a 262k-token head spends seconds on full-vocabulary passes: ``(N, V)`` outputs, zero-filled
gradients, index copies. Here:

- :class:`TokenLogProb` — ``ℓ (N,)`` from ``z (N, V)`` in row blocks (max, one ``exp``, two sums); the backward
  pass writes ``∂L/∂z = g · (e_t − softmax(z))`` once, block by block (``g = ∂L/∂ℓ``);
- the same forward pass gives ``Σ_v q_v²`` per row, hence ``r_p = ‖e_t − q_p‖² = 1 − 2 q_t + Σ_v q_v²``, the
  squared norm of ``∂ℓ_p/∂z_p``; a loss of ``ℓ`` alone has ``‖∂L/∂z‖² = Σ_p (∂L/∂ℓ_p)² · r_p`` exactly, so
  :func:`balance_on_token_logp` balances CE and a teacher term by gradient norm on the logits (what
  :func:`distill.losses.base.balance_by_gradient` computes on the ``(N, V)`` tensor) from ``(N,)`` vectors.

Positions whose target is ``-100`` get ``ℓ = 0`` and no gradient (``r = 0``).
"""

from __future__ import annotations

import torch

ROWS = 16  # rows per block: 16 × 262k float32 = 16 MiB of temporaries


class TokenLogProb(torch.autograd.Function):
    """``(ℓ (N,), r (N,))`` of logits ``z (N, V)`` and targets ``t (N,)``; ``r`` carries no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor):
        z = logits.detach()
        n = z.shape[0]
        valid = targets >= 0
        tgt = targets.clamp_min(0)
        lse = torch.empty(n, dtype=torch.float32, device=z.device)
        sumsq = torch.empty(n, dtype=torch.float32, device=z.device)
        for a in range(0, n, ROWS):
            blk = z[a:a + ROWS].float()
            m = blk.max(dim=-1).values
            e = torch.exp(blk - m[:, None])
            s = e.sum(-1)
            lse[a:a + ROWS] = m + torch.log(s)
            sumsq[a:a + ROWS] = torch.linalg.vector_norm(e, dim=-1).square() / s.square()
        zt = z.gather(1, tgt[:, None])[:, 0].float()
        logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
        r = torch.where(valid, (1.0 - 2.0 * logp.exp() + sumsq).clamp_min(0.0), torch.zeros_like(lse))
        ctx.save_for_backward(logits, tgt, valid, lse)
        ctx.mark_non_differentiable(r)
        return logp, r

    @staticmethod
    def backward(ctx, g, _g_r):
        logits, tgt, valid, lse = ctx.saved_tensors
        if g is None:
            return None, None
        g = torch.where(valid, g.float(), torch.zeros_like(g, dtype=torch.float32))
        n = logits.shape[0]
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for a in range(0, n, ROWS):
            blk = logits[a:a + ROWS].float()
            q = torch.exp(blk - lse[a:a + ROWS, None])
            out[a:a + ROWS] = q.mul_(-g[a:a + ROWS, None])
        rows = torch.arange(n, device=logits.device)
        out[rows, tgt] += g.to(out.dtype)
        return out, None


def token_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``ℓ = log softmax(z)[t]`` per row and ``r = ‖∂ℓ/∂z‖²`` (module docstring).

    Args:
        logits: ``(N, V)`` (grad flows back into them through ``ℓ``).
        targets: ``(N,)`` long, ``-100`` = no target.

    Returns:
        ``(ℓ (N,), r (N,))`` float32; both 0 where the target is ``-100``.
    """
    return TokenLogProb.apply(logits, targets.to(logits.device))


def mean_ce(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over positions with a target (``F.cross_entropy(..., ignore_index=-100)``)."""
    return -logp.sum() / (targets >= 0).sum().clamp_min(1)


def balance_on_token_logp(ce: torch.Tensor, kd_terms: list[torch.Tensor], logp: torch.Tensor,
                          r: torch.Tensor) -> list[torch.Tensor]:
    """Each KD term times ``‖∂CE/∂z‖ / ‖∂KD/∂z‖`` (detached), for terms that read the logits ``z`` only through
    ``logp`` (``(N,)`` from :func:`token_log_probs`, ``r`` its squared gradient norms): the norms are
    ``sqrt(Σ_p (∂·/∂ℓ_p)² r_p)``, equal to :func:`distill.losses.base.balance_by_gradient`'s on ``z``."""

    def norm(term: torch.Tensor) -> torch.Tensor | None:
        (g,) = torch.autograd.grad(term, logp, retain_graph=True, allow_unused=True)
        return None if g is None else (g.square() * r).sum().sqrt()

    g_ce = norm(ce)
    out = []
    for kd in kd_terms:
        g = norm(kd) if kd.requires_grad else None
        out.append(kd if g is None or g_ce is None else kd * (g_ce / g.clamp_min(1e-12)).detach())
    return out
