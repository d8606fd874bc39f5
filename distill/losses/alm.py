"""``alm`` — approximate likelihood matching (Minixhofer, Vulić, Ponti 2025, arXiv 2503.20083).

Instead of comparing next-token distributions (which live on two different vocabularies), ALM compares
the likelihoods that teacher and student give to the *same bytes*: for every aligned chunk ``c``
(:mod:`distill.chunks`: a span both tokenizations start and end a token on),

- ``log p_T(c) = Σ`` of the teacher's log-probabilities of its own tokens inside ``c``,
- ``log p_S(c) = Σ`` of the student's log-probabilities of its own tokens inside ``c``,

both at softmax temperature 1 and clipped at 0. The two are compared as Bernoulli events ("the chunk
happens" against "anything else") with a *binarised* divergence on tempered likelihoods, the form
tokenkit ships as its default (``alm_diff_fn: binary_ce``, ``binarization_temp: 100``,
``tokenkit/training/losses.py::compute_alm_loss``):

``a = log p_T(c) / τ − ε``, ``b = log p_S(c) / τ − ε`` (``τ = 100``, ``ε = 1e-6``),

``ℓ_c = −( eᵃ · b + (1 − eᵃ) · log(1 − eᵇ) )``  (binary cross-entropy of Bernoulli(eᵇ) against
Bernoulli(eᵃ); it differs from the binary KL only by the teacher's binary entropy, a constant, so the
gradients are those of the binarised KL), averaged over chunks (tokenkit's ``chunk_count`` numerator and
denominator: every chunk counts once, whatever its length).

Every student token inside a chunk gets gradient (``∂ℓ/∂ log p_S(c)`` is shared by the chunk's
tokens), not only the chunk's first position as with ``pkl``/``hkl``; it needs no projection, so no
teacher mass is lost to tokens the student cannot express. With ``τ = 100`` the gradient is
``(1/τ)·(1 − a/b)`` to first order: a bounded pull of the student's chunk log-likelihood towards the
teacher's, zero when they agree, whatever the chunk's length.

What we took and what we left out of tokenkit (documented choices, not tuned):

- chunks: the plain common-boundary chunks (tokenkit's ``unconstrained`` kind). tokenkit's default
  config adds debiasing (``append_space``: each side's probability that the next token starts with a
  space is added at the chunk's end; ``merge_by_space_prob``: chunks merged until that probability
  exceeds a threshold); not implemented here;
- a chunk is compared only when every token in it is predicted on both sides
  (``ChunkedBatch.chunk_complete``; e.g. the first token of a block has no predicting position when
  the tokenizer adds no start token), so both sums cover exactly the same bytes;
- ``loss.temperature`` (the softmax temperature of the next-token losses) does not apply: ALM's
  temperature is the binarisation temperature ``τ`` (``loss.alm_temperature`` when the config has it,
  else 100), and no ``T²`` factor is applied.

The trainer supplies, for every position of every chunk on both sides (``positions = "all"``), the
student's next-token ids (``ChunkedBatch.student_targets``) and the teacher's log-probability of its own
next token (``ChunkedBatch.teacher_target_logp``; from the top-k cache's per-position statistics when
the teacher is cached, :func:`distill.losses.token_logp.token_log_probs` of its logits for a live teacher;
the student's own log-probabilities come the same way, ``ChunkedBatch.student_target_logp``, computed once with
its cross-entropy).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss
from distill.losses.token_logp import token_log_probs
from distill.teacher_dist import TeacherDist

ALM_TEMPERATURE = 100.0  # tokenkit's binarization_temp default
ALM_EPSILON = 1e-6  # tokenkit's epsilon in compute_alm_loss
LOG_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − eˣ)`` for ``x < 0``, stable on both sides of ``log ½`` (and NaN-free gradients)."""
    small = torch.log1p(-torch.exp(x.clamp(max=LOG_HALF)))
    near0 = torch.log(-torch.expm1(x.clamp(min=LOG_HALF)))
    return torch.where(x < LOG_HALF, small, near0)


def binary_ce(log_t: torch.Tensor, log_s: torch.Tensor, temperature: float = ALM_TEMPERATURE,
              eps: float = ALM_EPSILON) -> torch.Tensor:
    """Elementwise binarised cross-entropy of chunk log-likelihoods (tokenkit's ``binary_ce``).

    Args:
        log_t: ``(C,)`` teacher chunk log-likelihoods (≤ 0).
        log_s: ``(C,)`` student chunk log-likelihoods (≤ 0).

    Returns:
        ``(C,)`` ``−(eᵃ·b + (1−eᵃ)·log(1−eᵇ))`` with ``a = log_t/τ − ε``, ``b = log_s/τ − ε``.
    """
    a = log_t.float() / temperature - eps
    b = log_s.float() / temperature - eps
    return -(torch.exp(a) * b + (-torch.expm1(a)) * log1mexp(b))


def chunk_sum(x: torch.Tensor, chunk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """``(C,)`` sum of ``x (N,)`` per chunk id."""
    return torch.zeros(n_chunks, dtype=x.dtype, device=x.device).index_add(0, chunk, x)


@torch.no_grad()
def target_log_probs(dist: TeacherDist, targets: torch.Tensor) -> torch.Tensor:
    """``(N,)`` log-probability (temperature 1) of ``targets (N,)`` under a dense teacher; ``-100`` → 0."""
    if not dist.dense or dist.temperature != 1.0:
        raise ValueError("target_log_probs needs a dense teacher at temperature 1")
    idx = torch.arange(dist.n, device=dist.device) if dist.rows is None else dist.rows
    t = targets.to(dist.device)
    z = dist.logits[idx, t.clamp_min(0)].float()
    return (z - dist.lse_t()) * (t >= 0)


def complete_chunks(chunk_tokens: np.ndarray, chunk_positions: np.ndarray, n_chunks: int) -> np.ndarray:
    """``(C,)`` bool: chunks whose every token (on this side) is predicted by some position.

    Args:
        chunk_tokens: ``(B, L)`` chunk id per token (``ChunkAlignment.chunk_a`` / ``chunk_b``).
        chunk_positions: ``(B, L)`` chunk id per predicting position (:func:`distill.chunks.position_chunks`).
    """
    tok = np.bincount(chunk_tokens[chunk_tokens >= 0], minlength=n_chunks)
    pos = np.bincount(chunk_positions[chunk_positions >= 0], minlength=n_chunks)
    return tok[:n_chunks] == pos[:n_chunks]


@register_loss("alm")
class ALMLoss(KDLoss):
    """Binarised cross-entropy of aligned-chunk likelihoods (module docstring)."""

    needs = "none"
    positions = "all"  # every position of a chunk on both sides, whatever loss.chunk_positions says
    needs_targets = True  # student_targets / teacher_target_logp / chunk_complete in the ChunkedBatch
    reads_student = "target_logp"  # the student's log-probs of its own next tokens, nothing else of its logits
    t_squared = False  # no T² factor: the softmax temperature does not apply

    @property
    def binarization_temperature(self) -> float:
        return float(getattr(self.p, "alm_temperature", ALM_TEMPERATURE))

    def chunk_log_likelihoods(self, batch: ChunkedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(log p_T(c), log p_S(c), valid)``, each ``(C,)``."""
        if batch.student_targets is None or batch.teacher_target_logp is None:
            raise ValueError("loss 'alm' needs ChunkedBatch.student_targets and teacher_target_logp")
        if batch.student_target_logp is not None:  # the trainer's (distill.losses.token_logp): no second pass
            s_tok = batch.student_target_logp.float()
        else:
            s_tok = token_log_probs(batch.student_logits, batch.student_targets)[0]
        dev = s_tok.device
        C = batch.n_chunks
        log_s = chunk_sum(s_tok, batch.student_chunk.to(dev), C).clamp(max=0.0)
        log_t = chunk_sum(batch.teacher_target_logp.float().to(dev), batch.teacher_chunk.to(dev), C).clamp(max=0.0)
        valid = (torch.bincount(batch.student_chunk.to(dev), minlength=C)[:C] > 0) & \
                (torch.bincount(batch.teacher_chunk.to(dev), minlength=C)[:C] > 0)
        if batch.chunk_complete is not None:
            valid = valid & batch.chunk_complete.to(valid.device)
        return log_t, log_s, valid

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        log_t, log_s, valid = self.chunk_log_likelihoods(batch)
        d = binary_ce(log_t, log_s, self.binarization_temperature)
        w = valid.to(d.dtype)
        return (d * w).sum() / w.sum().clamp_min(1.0)
