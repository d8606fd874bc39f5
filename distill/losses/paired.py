"""Paired losses: a divergence on paired columns plus ULD on the rest.

- ``hkl`` — hybrid. Student tokens whose best ``W`` entry is ≥ ``hkl_threshold`` pair
  one-to-one with that teacher token (:func:`surgery.vocab.projection.hkl_pairs`). KL on
  the paired columns (renormalized and mass-weighted like ``pkl``; ``rest_column=true``: plus
  one "everything else" column, with the same defect), plus ``uld_weight`` × ULD on the
  unpaired rest of both vocabularies.
- ``gold`` — TRL GOLD's hybrid: exact matches get Jensen–Shannon divergence, the rest
  ULD; exact means identical canonical bytes (:func:`~surgery.vocab.projection.exact_pairs`),
  so ``▁Haus`` and ``ĠHaus`` match (raw vocabulary strings would not).
"""

from __future__ import annotations

import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss
from distill.losses.primitives import chunk_mean, divergence, jsd_rows, normalize_rows, weighted_chunk_mean, \
    with_rest
from distill.losses.uld import chunk_uld


class _PairedLoss(KDLoss):
    """Shared by ``hkl`` and ``gold``: a divergence on paired columns + ULD on the rest."""

    def paired_term(self, pc: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        c = self.ctx
        p_s = self.student_probs(batch)
        qc = chunk_mean(p_s[:, c.pairs_s], batch.student_chunk, batch.n_chunks)
        pc = chunk_mean(batch.teacher.probs_at(c.pairs_t), batch.teacher_chunk, batch.n_chunks)
        mass = pc.sum(-1)
        if self.p.rest_column:
            qc, pc = with_rest(qc), with_rest(pc)
            if not batch.teacher.dense:  # a cached teacher lacks its tail: renormalize what is known
                pc, _ = normalize_rows(pc)
            paired = self.paired_term(pc, qc).mean()
        else:
            qc, _ = normalize_rows(qc)
            pc, has = normalize_rows(pc)
            paired = weighted_chunk_mean(self.paired_term(pc, qc), mass, has, self.p.mass_weight)
        rest = chunk_uld(p_s, batch, self.p.uld_topk, c.mask_s, c.mask_t)
        return paired + self.p.uld_weight * rest.mean()


@register_loss("hkl")
class HKLLoss(_PairedLoss):
    """KL on H-KL pairs (+ rest column) and ULD on the unpaired rest."""

    needs = "hkl_pairs"

    def paired_term(self, pc, qc):
        return divergence(pc, qc, self.p.direction)


@register_loss("gold")
class GOLDLoss(_PairedLoss):
    """JSD on exact (canonical-byte) matches (+ rest column) and ULD on the rest."""

    needs = "exact_pairs"

    def paired_term(self, pc, qc):
        return jsd_rows(pc, qc)
