"""Projected losses: ``pkl`` (projected KL) and ``tkl`` (teacher-projected KL).

- ``pkl`` — projected KL. Which side goes through a projection is ``project``: ``auto`` (default)
  projects the *coarser* side — the one that spelled the batch's text in fewer tokens per byte — onto the
  finer side's vocabulary. At a chunk's first position the coarse side's next token (Gemma-3's
  ``▁Konfiguration``) is a union of the fine side's events (SmolLM2's next token is ``ĠKon``), not
  the other way round, so only that direction compares like with like. Teacher coarser
  (``teacher_to_student``, X-Token's ``project_teacher_to_student``): the teacher's top-k columns are
  mapped onto the first student token of each (:func:`first_piece_projection`) and compared with
  the student's own distribution (:func:`projected_teacher_kl`). Student coarser
  (``student_to_teacher``, ALGORITHMS.md §5): the student distribution is mapped into teacher space,
  ``q = Wᵀ softmax(z_s / T)`` with the core's projection ``W (V_s, V_t)``, only on a
  set of ``top_k`` teacher columns: the columns with the most teacher mass in the
  batch among those some student token maps to. ``q`` is computed as
  ``p_s @ W[:, K]`` with the sparse ``(V_s, K)`` column block of ``W`` (never a dense
  ``B×T×V_s×V_t`` or ``V_s×V_t`` tensor). KL(teacher ‖ student) (``forward``) or
  KL(student ‖ teacher) (``reverse``) over ``K`` plus one column for the other teacher columns
  some student token reaches, with the teacher conditioned on those reachable columns
  (``expressible_rest``, default): both sides are then distributions over the same events, the
  student cannot leak mass outside ``K`` unnoticed, and it is not asked to copy the teacher's mass
  on tokens it cannot express; chunks are weighted by that teacher mass (``mass_weight``, see
  :func:`weighted_chunk_mean`). ``expressible_rest=false``: renormalize both sides on ``K`` (the
  X-Token reference) or, with ``rest_column=true``, add a column with *all* mass outside ``K``.
  The latter was the old default and is harmful when the teacher has longer tokens (Gemma-3's 262k
  vocabulary on German against SmolLM2's 49k): about a third of the teacher's mass sits on tokens
  no student token maps to (``▁Konfiguration`` where the student writes ``ĠKon`` + ...), and the
  student had to put that third on whatever student tokens map outside ``K`` — rare, unrelated
  tokens — so its held-out bits/byte got *worse* than at the start (1.803 → 1.826).
- ``tkl`` — teacher-projected KL: the teacher's top-k distribution mapped into the student's
  vocabulary with the projection built the other way round (``W_ts``, teacher rows), then
  KL against the student's own full distribution. For a teacher with much longer tokens
  (Gemma-3's 262k vocabulary on German vs SmolLM2's 49k) ``pkl`` asks the student to reach
  long teacher tokens through its prefix tokens, which ``W`` cannot express; ``tkl`` maps
  each long teacher token onto the student token that would start it.
"""

from __future__ import annotations

import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss
from distill.losses.operator import ProjectionOperator
from distill.losses.primitives import EPS, chunk_mean, dense_times_sparse, divergence, kl_rows, normalize_rows, \
    weighted_chunk_mean, with_rest
from distill.teacher_dist import TeacherDist


@register_loss("pkl")
class PKLLoss(KDLoss):
    """Projected KL on the batch's top-k teacher columns (module docstring)."""

    needs = "projection"

    def select_columns(self, teacher: TeacherDist, mass: torch.Tensor | None = None) -> torch.Tensor:
        mass = teacher.column_mass() if mass is None else mass
        reach = self.ctx.projection.reachable
        mass = torch.where(reach, mass, torch.full_like(mass, -1.0))
        k = min(self.p.top_k, int(reach.sum()))
        return torch.topk(mass, k).indices

    def teacher_to_student(self, batch: ChunkedBatch) -> bool:
        if self.p.project == "teacher_to_student":
            return True
        return (self.p.project == "auto" and bool(batch.teacher_coarser)
                and self.ctx.down_projection is not None)

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        if self.teacher_to_student(batch):
            if self.ctx.down_projection is None:
                raise ValueError("pkl with project=teacher_to_student needs LossContext.down_projection")
            keep = batch.chunk_exact if self.p.exact_chunks_only else None
            return projected_teacher_kl(self, batch, self.ctx.down_projection, keep)
        if self.p.expressible_rest:
            col_mass, row_mass = batch.teacher.masses(self.ctx.projection.reachable)
            cols = self.select_columns(batch.teacher, col_mass)
        else:
            cols = self.select_columns(batch.teacher)
        p_s = self.student_probs(batch)
        q = self.ctx.projection.project(p_s, cols)  # (N_s, K)
        pt = batch.teacher.probs_at(cols)  # (N_t, K)
        qc = chunk_mean(q, batch.student_chunk, batch.n_chunks)
        pc = chunk_mean(pt, batch.teacher_chunk, batch.n_chunks)
        if self.p.expressible_rest:
            # The teacher conditioned on what the student can express (the columns some student token maps
            # to), so both sides are distributions over the same events: K plus "an expressible column
            # outside K". Every student token maps into those columns, so the student's rest column is the
            # mass it moves outside K, and the teacher (whose mass there is small) penalizes that leak.
            mc = chunk_mean(row_mass[:, None], batch.teacher_chunk, batch.n_chunks)[:, 0]  # (C,)
            has = mc > 0
            pc = pc / mc.clamp_min(EPS)[:, None]
            if self.p.exact_chunks_only and batch.chunk_exact is not None:
                has = has & batch.chunk_exact.to(has.device)
            d = divergence(with_rest(pc), with_rest(qc), self.p.direction)
            return weighted_chunk_mean(d, mc, has, self.p.mass_weight)
        if self.p.rest_column:
            d = divergence(with_rest(pc), with_rest(qc), self.p.direction)
            return d.mean()
        mass = pc.sum(-1)  # (C,) teacher mass on the compared columns
        qc, _ = normalize_rows(qc)
        pc, has = normalize_rows(pc)
        if self.p.exact_chunks_only and batch.chunk_exact is not None:
            has = has & batch.chunk_exact.to(has.device)
        d = divergence(pc, qc, self.p.direction)
        return weighted_chunk_mean(d, mass, has, self.p.mass_weight)


@register_loss("tkl")
class TKLLoss(KDLoss):
    """Teacher-projected KL: the teacher mapped into the *student's* space, ``p̃ = p_t[:, K] @ W_ts[K]``.

    ``W_ts (V_t, V_s)`` is the core's projection built the other way round (teacher rows): a
    teacher token maps to itself when the student has it, else to its student pieces with the
    first piece weighted most, so ``p̃`` is the teacher's belief about which *student* token
    comes next. Only the batch's ``top_k`` teacher columns (by mass) are mapped; ``p̃`` is
    renormalized and compared with the student's full distribution (forward or reverse KL).
    Unlike ``pkl`` it never needs the student to reach a long teacher token through a prefix.
    """

    needs = "reverse_projection"

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        return projected_teacher_kl(self, batch, self.ctx.projection)


@torch.no_grad()
def projected_teacher_target(teacher: TeacherDist, P: ProjectionOperator, top_k: int) -> torch.Tensor:
    """``(N_t, V_s)`` the teacher's probabilities on its ``top_k`` columns by mass (among rows ``P`` maps),
    mapped into the student's vocabulary: ``p_t[:, K] @ P[K]`` (not renormalized).

    ``P`` wraps a teacher → student projection (:meth:`ProjectionOperator.rows_of`, rows = teacher tokens).
    """
    mass = teacher.column_mass()
    mass = torch.where(P.row_mapped, mass, torch.full_like(mass, -1.0))
    k = min(top_k, int(P.row_mapped.sum()))
    cols = torch.topk(mass, k).indices
    return dense_times_sparse(teacher.probs_at(cols), P.row_block(cols))


def projected_teacher_kl(loss: KDLoss, batch: ChunkedBatch, P: ProjectionOperator,
                         keep: torch.Tensor | None = None) -> torch.Tensor:
    """KL between the teacher mapped into the student's vocabulary and the student (``tkl``; ``pkl`` teacher→student).

    The batch's ``top_k`` teacher columns are mapped (:func:`projected_teacher_target`), renormalized per
    chunk and compared with the student's full distribution; ``keep (C,)`` (optional) restricts the mean to
    those chunks.
    """
    target = projected_teacher_target(batch.teacher, P, loss.p.top_k)  # (N_t, V_s)
    pc, has = normalize_rows(chunk_mean(target, batch.teacher_chunk, batch.n_chunks))
    logq = loss.student_log_probs(batch)
    if loss.p.direction == "forward":
        qc_log = torch.log(chunk_mean(logq.exp(), batch.student_chunk, batch.n_chunks).clamp_min(EPS))
        d = torch.where(pc > 0, pc * (torch.log(pc.clamp_min(EPS)) - qc_log), torch.zeros_like(pc)).sum(-1)
    else:
        qc = chunk_mean(logq.exp(), batch.student_chunk, batch.n_chunks)
        d = kl_rows(qc, pc)
    if keep is not None:
        has = has & keep.to(has.device)
    return (d * has).sum() / has.sum().clamp_min(1)
