"""Universal Logit Distillation (``uld``).

- ``uld`` — Universal Logit Distillation (Boizard et al.): L1 distance between the
  descending-sorted probability vectors.

Sorted ULD, top-k approximation. Sorting 262k probabilities per position is the
dominant cost of ULD, so the sorted vectors are truncated to ``uld_topk`` entries
(``torch.topk``) and the rest is summarized by its total mass t: the L1 distance
of the tails, ``Σ_{i>k} |a_i − b_i|``, is replaced by ``|t_a − t_b|``. That is a lower
bound of the exact tail term and the error is at most ``2·min(t_a, t_b)``, i.e. no
more than twice the smaller mass beyond rank k (``uld_topk = 0`` sorts everything,
the exact variant). Chunk-level ULD averages each side's sorted vectors over the
chunk's positions (for the usual one-to-one chunks this is exactly ULD).
"""

from __future__ import annotations

import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss
from distill.losses.primitives import chunk_mean, student_sorted_topk, uld_distance


def chunk_uld(p_s: torch.Tensor, batch: ChunkedBatch, k: int, exclude_s: torch.Tensor | None = None,
              exclude_t: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted ULD of each chunk: both sides' top-k sorted vectors and tail masses averaged over the chunk.

    Args:
        p_s: ``(N_s, V_s)`` student probabilities (differentiable).
        batch: the chunked batch (its teacher distribution and chunk ids).
        k: sorted entries compared (``0``: exact full sort).
        exclude_s, exclude_t: ``(V_s,)`` / ``(V_t,)`` bool columns left out on each side (the paired ones
            of ``hkl`` / ``gold``), or None.

    Returns:
        ``(C,)`` the L1 distance of each chunk (:func:`~distill.losses.primitives.uld_distance`).
    """
    sv, st = student_sorted_topk(p_s, k, exclude_s)
    tv, tt = batch.teacher.sorted_topk(k, exclude_t)
    return uld_distance(chunk_mean(sv, batch.student_chunk, batch.n_chunks),
                        chunk_mean(st[:, None], batch.student_chunk, batch.n_chunks)[:, 0],
                        chunk_mean(tv, batch.teacher_chunk, batch.n_chunks),
                        chunk_mean(tt[:, None], batch.teacher_chunk, batch.n_chunks)[:, 0])


@register_loss("uld")
class ULDLoss(KDLoss):
    """L1 between descending-sorted distributions (top-k with tail mass; ``uld_topk=0``: exact)."""

    needs = "none"

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        return chunk_uld(self.student_probs(batch), batch, self.p.uld_topk).mean()
