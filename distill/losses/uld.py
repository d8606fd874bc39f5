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


@register_loss("uld")
class ULDLoss(KDLoss):
    """L1 between descending-sorted distributions (top-k with tail mass; ``uld_topk=0``: exact)."""

    needs = "none"

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        p_s = torch.softmax(batch.student_logits.float() / self.p.temperature, dim=-1)
        sv, st = student_sorted_topk(p_s, self.p.uld_topk)
        tv, tt = batch.teacher.sorted_topk(self.p.uld_topk)
        d = uld_distance(chunk_mean(sv, batch.student_chunk, batch.n_chunks),
                         chunk_mean(st[:, None], batch.student_chunk, batch.n_chunks)[:, 0],
                         chunk_mean(tv, batch.teacher_chunk, batch.n_chunks),
                         chunk_mean(tt[:, None], batch.teacher_chunk, batch.n_chunks)[:, 0])
        return d.mean()
