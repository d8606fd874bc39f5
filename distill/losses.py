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
- ``hkl`` — hybrid. Student tokens whose best ``W`` entry is ≥ ``hkl_threshold`` pair
  one-to-one with that teacher token (:func:`surgery.vocab.projection.hkl_pairs`). KL on
  the paired columns (renormalized and mass-weighted like ``pkl``; ``rest_column=true``: plus
  one "everything else" column, with the same defect), plus ``uld_weight`` × ULD on the
  unpaired rest of both vocabularies.
- ``uld`` — Universal Logit Distillation (Boizard et al.): L1 distance between the
  descending-sorted probability vectors.
- ``gold`` — TRL GOLD's hybrid: exact matches get Jensen–Shannon divergence, the rest
  ULD; exact means identical canonical bytes (:func:`~surgery.vocab.projection.exact_pairs`),
  so ``▁Haus`` and ``ĠHaus`` match (raw vocabulary strings would not).
- ``tkl`` — teacher-projected KL: the teacher's top-k distribution mapped into the student's
  vocabulary with the projection built the other way round (``W_ts``, teacher rows), then
  KL against the student's own full distribution. For a teacher with much longer tokens
  (Gemma-3's 262k vocabulary on German vs SmolLM2's 49k) ``pkl`` asks the student to reach
  long teacher tokens through its prefix tokens, which ``W`` cannot express; ``tkl`` maps
  each long teacher token onto the student token that would start it.
- ``kl`` — plain KL for a teacher with the student's own tokenizer.
- ``ce`` — no distillation term (the student's cross-entropy only).

Sorted ULD, top-k approximation. Sorting 262k probabilities per position is the
dominant cost of ULD, so the sorted vectors are truncated to ``uld_topk`` entries
(``torch.topk``) and the rest is summarized by its total mass t: the L1 distance
of the tails, ``Σ_{i>k} |a_i − b_i|``, is replaced by ``|t_a − t_b|``. That is a lower
bound of the exact tail term and the error is at most ``2·min(t_a, t_b)``, i.e. no
more than twice the smaller mass beyond rank k (``uld_topk = 0`` sorts everything,
the exact variant). Chunk-level ULD averages each side's sorted vectors over the
chunk's positions (for the usual one-to-one chunks this is exactly ULD).

Combining with the student's cross-entropy is the trainer's job
(:func:`combine`): ``ce_weight · CE + kd_weight · Σ_teachers w_t · KD_t``.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from distill.teacher_dist import TeacherDist

LOG = logging.getLogger(__name__)

EPS = 1e-12
LOG_EPS = float(np.log(EPS))


# -- registry -------------------------------------------------------------------------------------

LOSSES: dict[str, type["KDLoss"]] = {}


def register_loss(name: str) -> Callable[[type], type]:
    """Class decorator registering a distillation loss under ``name``."""

    def deco(cls):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} registered twice")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return deco


def loss_names() -> list[str]:
    return sorted(LOSSES)


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the losses (see :class:`distill.config.LossConfig`)."""

    temperature: float = 1.0
    direction: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    top_k: int = 8192
    uld_topk: int = 8192
    uld_weight: float = 1.0
    hkl_threshold: float = 0.6
    rest_column: bool = False  # pkl/hkl/gold: match the mass outside the compared columns as one extra column
    mass_weight: bool = True  # pkl/hkl/gold without rest column: weight chunks by the teacher's compared mass
    exact_chunks_only: bool = False  # pkl: compare only chunks of one identical token on each side
    expressible_rest: bool = True  # pkl: teacher conditioned on the columns the student reaches, + one rest column
    project: str = "auto"  # pkl: student_to_teacher | teacher_to_student | auto (the coarser side onto the finer)


@dataclass
class ChunkedBatch:
    """Positions of one teacher/student pair that belong to a chunk, flattened.

    Attributes:
        student_logits: ``(N_s, V_s)`` student logits at positions in a chunk (with grad).
        student_chunk: ``(N_s,)`` long chunk id of each of those positions.
        teacher: :class:`TeacherDist` with ``N_t`` rows.
        teacher_chunk: ``(N_t,)`` long chunk id of each teacher row.
        n_chunks: number of chunks C (ids ``0..C-1``; every chunk has ≥ 1 position per side).
        chunk_exact: ``(C,)`` bool, chunks of one identical token on each side (optional; ``pkl`` with
            ``exact_chunks_only`` compares only those).
    """

    student_logits: torch.Tensor
    student_chunk: torch.Tensor
    teacher: TeacherDist
    teacher_chunk: torch.Tensor
    n_chunks: int
    chunk_exact: torch.Tensor | None = None  # (C,) bool: one identical token on each side (distill.chunks.exact_chunks)
    teacher_coarser: bool | None = None  # the teacher used fewer tokens per byte than the student (trainer)


# -- shared pieces --------------------------------------------------------------------------------

def chunk_mean(x: torch.Tensor, chunk: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """``(C, D)`` mean of the rows of ``x (N, D)`` per chunk id."""
    out = torch.zeros(n_chunks, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, chunk, x)
    cnt = torch.bincount(chunk, minlength=n_chunks).clamp_min(1).to(x.dtype)
    return out / cnt[:, None]


def kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(C,)`` KL(p ‖ q) per row for (sub-)probability rows; 0·log 0 = 0."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(EPS)) - torch.log(q.clamp_min(EPS))), torch.zeros_like(p)).sum(-1)


def divergence(p_teacher: torch.Tensor, q_student: torch.Tensor, direction: str) -> torch.Tensor:
    return kl_rows(p_teacher, q_student) if direction == "forward" else kl_rows(q_student, p_teacher)


def jsd_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    m = 0.5 * (p + q)
    return 0.5 * kl_rows(p, m) + 0.5 * kl_rows(q, m)


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows divided by their sums; also returns which rows had any mass."""
    s = x.sum(-1, keepdim=True)
    return x / s.clamp_min(EPS), (s[:, 0] > 0)


def with_rest(x: torch.Tensor) -> torch.Tensor:
    """Append one column with the mass outside ``x``'s columns (rows of x sum to ≤ 1)."""
    return torch.cat([x, (1.0 - x.sum(-1, keepdim=True)).clamp_min(0)], dim=-1)


def weighted_chunk_mean(d: torch.Tensor, mass: torch.Tensor, has: torch.Tensor, mass_weight: bool) -> torch.Tensor:
    """Mean of per-chunk divergences ``d (C,)`` over chunks with teacher mass (``has``).

    With ``mass_weight`` each chunk counts with the teacher's mass ``m_c`` on the compared
    columns: ``Σ m_c d_c / Σ m_c``. By the chain rule of KL,
    ``KL(p ‖ q) = KL([m, 1−m] ‖ [q_K, 1−q_K]) + m·KL(p̃_K ‖ q̃_K) + (1−m)·KL(p̃_rest ‖ q̃_rest)``:
    this keeps the conditional term of the part of the teacher's distribution the student can
    express (``m·KL(p̃_K ‖ q̃_K)``) and drops the split term, which would make the student copy the
    teacher's mass on tokens it cannot express (a long teacher word) onto arbitrary tokens of its own.
    """
    w = mass.detach() * has if mass_weight else has.to(d.dtype)
    return (d * w).sum() / w.sum().clamp_min(EPS)


def uld_distance(s_vals: torch.Tensor, s_tail: torch.Tensor, t_vals: torch.Tensor, t_tail: torch.Tensor) -> torch.Tensor:
    """``(C,)`` L1 between sorted vectors (zero-padded to equal length) + ``|tail_s − tail_t|``."""
    k = max(s_vals.shape[1], t_vals.shape[1])
    if s_vals.shape[1] < k:
        s_vals = torch.nn.functional.pad(s_vals, (0, k - s_vals.shape[1]))
    if t_vals.shape[1] < k:
        t_vals = torch.nn.functional.pad(t_vals, (0, k - t_vals.shape[1]))
    return (s_vals - t_vals).abs().sum(-1) + (s_tail - t_tail).abs()


def student_sorted_topk(p: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable descending top-k of student probabilities ``(N, V)`` and the remaining mass."""
    if exclude is not None:
        p = p.masked_fill(exclude[None, :], 0.0)
    V = p.shape[1]
    if k <= 0 or k >= V:
        v = torch.sort(p, dim=-1, descending=True).values
    else:
        v = torch.topk(p, k, dim=-1).values
    return v, (p.sum(-1) - v.sum(-1)).clamp_min(0)


def dense_times_sparse(dense: torch.Tensor, csr: torch.Tensor) -> torch.Tensor:
    """``dense (N, K) @ csr (K, V)`` without autograd, on CPU or CUDA."""
    if dense.is_cuda:
        return torch.sparse.mm(csr.to_sparse_coo().t().coalesce(), dense.t().contiguous()).t()
    return dense @ csr


class _SparseColumnsMM(torch.autograd.Function):
    """``(N, V_s) @ W_K`` for a sparse column block ``W_K (V_s, K)`` held as CSR of its transpose.

    CPU: ``dense @ W_Kᵀᵀ`` and ``grad @ W_Kᵀ`` (dense-times-sparse kernels, no transposed copies of the
    ``(N, V_s)`` operand). CUDA: the cuSPARSE-friendly ``CSR @ dense`` form on both passes.
    """

    @staticmethod
    def forward(ctx, dense, wk_t):  # wk_t: sparse CSR (K, V_s)
        ctx.wk_t = wk_t
        if dense.is_cuda:
            return torch.sparse.mm(wk_t, dense.t().contiguous()).t()
        return dense @ wk_t.t()

    @staticmethod
    def backward(ctx, grad):
        wk_t = ctx.wk_t
        if grad.is_cuda:
            wk = wk_t.to_sparse_coo().t().coalesce().to_sparse_csr()  # (V_s, K)
            return torch.sparse.mm(wk, grad.t().contiguous()).t(), None
        return grad @ wk_t, None


class Projection:
    """The projection ``W (V_s, V_t)`` on a device, organized for fast column blocks.

    Stores ``Wᵀ`` as CSR ``(V_t, V_s)`` so that the columns ``K`` of ``W`` are the rows ``K``
    of ``Wᵀ``: gathering them is index arithmetic on ``crow_indices``.
    """

    def __init__(self, matrix, device: torch.device | str = "cpu"):
        import scipy.sparse as sp

        wt = sp.csr_matrix(matrix).T.tocsr()
        wt.sort_indices()
        self.shape = tuple(matrix.shape)  # (V_s, V_t)
        self.crow = torch.from_numpy(wt.indptr.astype(np.int64)).to(device)
        self.col = torch.from_numpy(wt.indices.astype(np.int64)).to(device)
        self.val = torch.from_numpy(wt.data.astype(np.float32)).to(device)
        self.reachable = (self.crow[1:] > self.crow[:-1])  # (V_t,) teacher columns some student token maps to

    @staticmethod
    def rows_of(matrix, device="cpu") -> "Projection":
        """Wrap a matrix whose *rows* are gathered (``row_block``), e.g. ``W_ts (V_t, V_s)``."""
        return Projection(matrix.T, device)

    @property
    def row_mapped(self) -> torch.Tensor:
        """For :meth:`rows_of`: ``(rows,)`` bool, rows with at least one entry."""
        return self.reachable

    def row_block(self, rows: torch.Tensor) -> torch.Tensor:
        """For :meth:`rows_of`: sparse CSR ``(len(rows), cols)`` of the wrapped matrix."""
        return self.column_block(rows)

    def column_block(self, cols: torch.Tensor) -> torch.Tensor:
        """Sparse CSR ``(K, V_s)`` = ``W[:, cols]ᵀ``."""
        starts = self.crow[cols]
        lens = self.crow[cols + 1] - starts
        crow = torch.zeros(len(cols) + 1, dtype=torch.long, device=cols.device)
        crow[1:] = torch.cumsum(lens, 0)
        total = int(crow[-1])
        offs = torch.arange(total, device=cols.device) - torch.repeat_interleave(crow[:-1], lens) \
            + torch.repeat_interleave(starts, lens)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": we rely on mm only
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, self.col[offs], self.val[offs], size=(len(cols), self.shape[0]),
                                           check_invariants=False)

    def project(self, p_student: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` = ``p_student (N, V_s) @ W[:, cols]`` (differentiable in ``p_student``)."""
        return _SparseColumnsMM.apply(p_student, self.column_block(cols))


@dataclass
class LossContext:
    """Per teacher/student pair, device-resident data the losses need (built once)."""

    student_size: int
    teacher_size: int
    projection: Projection | None = None
    pairs_s: torch.Tensor | None = None  # (P,) long
    pairs_t: torch.Tensor | None = None
    mask_s: torch.Tensor | None = None  # (V_s,) bool, True on paired columns
    mask_t: torch.Tensor | None = None
    down_projection: Projection | None = None  # pkl, teacher_to_student: teacher rows → first student piece

    @staticmethod
    def with_pairs(student_size, teacher_size, ids_s, ids_t, device, projection=None) -> "LossContext":
        ps = torch.as_tensor(np.asarray(ids_s), dtype=torch.long, device=device)
        pt = torch.as_tensor(np.asarray(ids_t), dtype=torch.long, device=device)
        ms = torch.zeros(student_size, dtype=torch.bool, device=device)
        mt = torch.zeros(teacher_size, dtype=torch.bool, device=device)
        ms[ps] = True
        mt[pt] = True
        return LossContext(student_size, teacher_size, projection, ps, pt, ms, mt)


# -- losses ---------------------------------------------------------------------------------------

class KDLoss:
    """A distillation term between one teacher and the student.

    Subclasses set ``needs`` (what :func:`build_context` must prepare) and implement
    :meth:`forward`, returning the unscaled term; :meth:`__call__` applies ``T²``.
    """

    name = ""
    needs = "projection"  # projection | reverse_projection | hkl_pairs | exact_pairs | same_vocab | none

    def __init__(self, params: LossParams, ctx: LossContext):
        self.p = params
        self.ctx = ctx

    def __call__(self, batch: ChunkedBatch) -> torch.Tensor:
        if batch.n_chunks == 0:
            return batch.student_logits.sum() * 0.0
        return self.forward(batch) * (self.p.temperature ** 2)

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def student_log_probs(self, batch: ChunkedBatch) -> torch.Tensor:
        return torch.log_softmax(batch.student_logits.float() / self.p.temperature, dim=-1)


@register_loss("ce")
class CELoss(KDLoss):
    """No distillation term."""

    needs = "none"

    def __call__(self, batch: ChunkedBatch) -> torch.Tensor:
        return batch.student_logits.sum() * 0.0


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
        p_s = torch.softmax(batch.student_logits.float() / self.p.temperature, dim=-1)
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
def projected_teacher_target(teacher: TeacherDist, P: Projection, top_k: int) -> torch.Tensor:
    """``(N_t, V_s)`` the teacher's probabilities on its ``top_k`` columns by mass (among rows ``P`` maps),
    mapped into the student's vocabulary: ``p_t[:, K] @ P[K]`` (not renormalized).

    ``P`` wraps a teacher → student projection (:meth:`Projection.rows_of`, rows = teacher tokens).
    """
    mass = teacher.column_mass()
    mass = torch.where(P.row_mapped, mass, torch.full_like(mass, -1.0))
    k = min(top_k, int(P.row_mapped.sum()))
    cols = torch.topk(mass, k).indices
    return dense_times_sparse(teacher.probs_at(cols), P.row_block(cols))


def projected_teacher_kl(loss: KDLoss, batch: ChunkedBatch, P: Projection,
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


class _PairedLoss(KDLoss):
    """Shared by ``hkl`` and ``gold``: a divergence on paired columns + ULD on the rest."""

    def paired_term(self, pc: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        c = self.ctx
        p_s = torch.softmax(batch.student_logits.float() / self.p.temperature, dim=-1)
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
        sv, st = student_sorted_topk(p_s, self.p.uld_topk, c.mask_s)
        tv, tt = batch.teacher.sorted_topk(self.p.uld_topk, c.mask_t)
        rest = uld_distance(chunk_mean(sv, batch.student_chunk, batch.n_chunks),
                            chunk_mean(st[:, None], batch.student_chunk, batch.n_chunks)[:, 0],
                            chunk_mean(tv, batch.teacher_chunk, batch.n_chunks),
                            chunk_mean(tt[:, None], batch.teacher_chunk, batch.n_chunks)[:, 0])
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


# -- building and combining -----------------------------------------------------------------------

def emitted_ids(vocab) -> np.ndarray:
    """``(V,)`` for each id, the id the tokenizer itself emits for that surface.

    Several ids can share one canonical surface: a SentencePiece byte-fallback piece
    ``<0x2E>`` and the regular piece ``.`` both decode to ``b"."``, but the tokenizer only
    ever emits the regular one (byte fallback is for bytes no piece covers), so a model puts
    (almost) no probability on the other. Those ids are redirected to the emitted one;
    every other id maps to itself.
    """
    groups: dict[bytes, list[int]] = {}
    for i, s in enumerate(vocab.surfaces):
        if s is not None:
            groups.setdefault(s, []).append(i)
    out = np.arange(len(vocab), dtype=np.int64)
    dups = [(s, ids) for s, ids in groups.items() if len(ids) > 1]
    if not dups:
        return out
    for (s, ids), enc in zip(dups, vocab.encode_bytes_many([s for s, _ in dups])):
        target = enc[0] if len(enc) == 1 and enc[0] in ids else ids[0]
        out[ids] = target
    return out


def fold_columns(matrix, mapping: np.ndarray):
    """``W`` with each column ``j`` added into column ``mapping[j]`` (rows keep their sums)."""
    import scipy.sparse as sp

    coo = sp.coo_matrix(matrix)
    out = sp.csr_matrix((coo.data, (coo.row, mapping[coo.col])), shape=matrix.shape, dtype=np.float32)
    out.sum_duplicates()
    out.sort_indices()
    return out


def first_piece_projection(teacher_vocab, student_vocab):
    """Teacher → student projection for ``pkl`` teacher→student: each teacher token onto the *first* student
    token of its re-encoding (weight 1), its own id when the student has it (the core's projection with one
    piece and no reverse pass). At a chunk's first position both models predict what starts there, so the
    teacher's probability of ``▁Konfiguration`` is the probability that the student's next token is ``ĠKon``;
    spreading 10% of it onto ``fig`` (X-Token's 0.9·0.1^i piece weights, which ``tkl`` keeps) would ask the
    student to start a word with a word-internal piece."""
    from surgery.vocab.projection import ProjectionConfig, build_projection

    return build_projection(teacher_vocab, student_vocab, ProjectionConfig(max_pieces=1, reverse=False))


def build_context(name: str, student_vocab, teacher_vocab, device, projection=None, hkl_threshold: float = 0.6,
                  reverse_projection=None, project: str = "auto", down_projection=None) -> LossContext:
    """Prepare what loss ``name`` needs for one teacher/student pair.

    Args:
        name: registered loss name.
        student_vocab, teacher_vocab: canonical vocabularies (rows = student).
        device: where the tensors live.
        projection: a prebuilt :class:`surgery.vocab.projection.Projection` (student → teacher);
            built from the vocabularies when None and needed.
        reverse_projection: for ``tkl``, a prebuilt teacher → student projection.
        project: ``pkl``'s projection direction; unless ``student_to_teacher``, the first-piece teacher → student
            projection (:func:`first_piece_projection`, or ``down_projection`` when given) is prepared too.
        hkl_threshold: H-KL pairing threshold.

    Raises:
        SurgeryError: ``kl`` with two different vocabularies.
    """
    from surgery.errors import SurgeryError
    from surgery.vocab.projection import build_projection, exact_pairs, hkl_pairs

    cls = LOSSES[name]
    Vs, Vt = len(student_vocab), len(teacher_vocab)
    if cls.needs in ("projection", "hkl_pairs") and projection is None:
        projection = build_projection(student_vocab, teacher_vocab)
    if cls.needs in ("projection", "hkl_pairs", "exact_pairs"):
        emitted = emitted_ids(teacher_vocab)
        if projection is not None:  # mass on never-emitted duplicate columns goes to the emitted id
            projection = dataclasses.replace(projection, matrix=fold_columns(projection.matrix, emitted))
    if cls.needs == "projection":
        ctx = LossContext(Vs, Vt, projection=Projection(projection.matrix, device))
        if name == "pkl" and project != "student_to_teacher":
            down = down_projection if down_projection is not None else first_piece_projection(teacher_vocab,
                                                                                               student_vocab)
            ctx.down_projection = Projection.rows_of(down.matrix, device)
        return ctx
    if cls.needs == "reverse_projection":
        if reverse_projection is None:
            reverse_projection = build_projection(teacher_vocab, student_vocab)
        return LossContext(Vs, Vt, projection=Projection.rows_of(reverse_projection.matrix, device))
    if cls.needs == "hkl_pairs":
        ids_s, ids_t = hkl_pairs(projection, hkl_threshold)
        return LossContext.with_pairs(Vs, Vt, ids_s, ids_t, device)
    if cls.needs == "exact_pairs":
        ids_s, ids_t = exact_pairs(student_vocab, teacher_vocab)
        ids_t = emitted[ids_t]
        _, first = np.unique(ids_t, return_index=True)  # keep the pairing one-to-one
        first = np.sort(first)
        return LossContext.with_pairs(Vs, Vt, ids_s[first], ids_t[first], device)
    if cls.needs == "same_vocab" and student_vocab.hash != teacher_vocab.hash and \
            student_vocab.surfaces != teacher_vocab.surfaces:
        raise SurgeryError(f"loss 'kl' needs the teacher to share the student's tokenizer "
                           f"({student_vocab.name or 'student'} ≠ {teacher_vocab.name or 'teacher'})",
                           "use loss.name=pkl (or hkl, uld, gold) for teachers with another vocabulary")
    return LossContext(Vs, Vt)


def make_loss(name: str, params: LossParams, ctx: LossContext) -> KDLoss:
    if name not in LOSSES:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"unknown loss {name!r}", f"choose one of {', '.join(loss_names())}")
    return LOSSES[name](params, ctx)


def combine(ce: torch.Tensor, kd_terms: list[torch.Tensor], weights: torch.Tensor | list[float],
            ce_weight: float, kd_weight: float, rescale: bool = False) -> torch.Tensor:
    """``ce_weight · CE + kd_weight · Σ_t w_t · KD_t``.

    With ``rescale`` each KD term is multiplied by ``CE / KD`` (both detached), so it has
    the magnitude of the cross-entropy (the X-Token reference: CE scale 0.1, KD rescaled).
    """
    total = ce_weight * ce
    for w, kd in zip(weights, kd_terms):
        if rescale:
            kd = kd * (ce.detach() / kd.detach().clamp_min(1e-8))
        total = total + kd_weight * w * kd
    return total
