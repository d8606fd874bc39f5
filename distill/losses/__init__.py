"""Distillation losses by name: ``pkl``, ``hkl`` (X-Token), ``uld``, ``gold``, ``kl``, ``ce`` (ALGORITHMS.md §5).

Every cross-vocabulary loss works on *chunks* (:mod:`distill.chunks`): the
student's positions and the teacher's positions that predict the same bytes.
Within a chunk, each side's distributions are averaged over its positions; the
loss compares the two averages and is averaged over chunks, then scaled by
``T²`` (temperature T applied to both sides' logits). The trainer passes either
every position of a chunk (``loss.chunk_positions=mean``, the X-Token reference) or
only its first position on each side (``first``, the default: both see exactly the
bytes before the chunk and predict what starts there), in which case every chunk
is one student row against one teacher row.

The losses, one module per family, register themselves by name (:func:`register_loss`):

- :mod:`distill.losses.projected` — ``pkl`` (projected KL) and ``tkl`` (teacher-projected KL);
- :mod:`distill.losses.paired` — ``hkl`` (X-Token's hybrid) and ``gold`` (TRL GOLD);
- :mod:`distill.losses.uld` — ``uld`` (Universal Logit Distillation);
- :mod:`distill.losses.alm` — ``alm`` (approximate likelihood matching of aligned chunks);
- :mod:`distill.losses.hidden` — ``hidden`` (final hidden states at aligned chunk ends, for a student that shares
  the teacher's body);
- :mod:`distill.losses.same_vocab` — ``kl`` (one shared vocabulary) and ``ce`` (no distillation term).

:mod:`distill.losses.primitives` holds the tensor pieces they share, :mod:`distill.losses.operator` the
projection as a sparse device operator (:class:`ProjectionOperator`), :mod:`distill.losses.context` the
builder of what a loss needs for one teacher/student pair (:func:`build_context`).

Combining with the student's cross-entropy is the trainer's job
(:func:`combine`): ``ce_weight · CE + kd_weight · Σ_teachers w_t · KD_t``.
"""

from distill.losses import alm, hidden, paired, projected, same_vocab, uld  # noqa: F401  (registers the losses)
from distill.losses.base import (LOSSES, ChunkedBatch, KDLoss, LossConfig, LossContext, combine, loss_names,
                                 make_loss, register_loss)
from distill.losses.context import build_context, first_piece_projection
from distill.losses.operator import ProjectionOperator
from distill.losses.primitives import (EPS, chunk_mean, dense_times_sparse, divergence, jsd_rows, kl_rows,
                                       normalize_rows, student_sorted_topk, uld_distance, weighted_chunk_mean,
                                       with_rest)
from distill.losses.projected import projected_teacher_kl, projected_teacher_target

__all__ = ["LOSSES", "ChunkedBatch", "KDLoss", "LossConfig", "LossContext", "ProjectionOperator", "EPS",
           "build_context", "chunk_mean", "combine", "dense_times_sparse", "divergence",
           "first_piece_projection", "jsd_rows", "kl_rows", "loss_names", "make_loss",
           "normalize_rows", "projected_teacher_kl", "projected_teacher_target", "register_loss",
           "student_sorted_topk", "uld_distance", "weighted_chunk_mean", "with_rest"]
