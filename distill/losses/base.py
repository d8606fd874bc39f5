"""The loss registry and what every loss shares: parameters, the chunked batch, the per-pair context, combining.

Loss families register themselves with :func:`register_loss` when their module is imported
(:mod:`distill.losses` imports them all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal


import numpy as np
import torch

from distill.losses.operator import ProjectionOperator
from distill.teacher_dist import TeacherDist


def _h(text: str) -> dict:
    return {"help": text}


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
class LossConfig:
    """The objective of a run and the hyper-parameters every loss reads (``loss.*`` of a recipe)."""

    name: str = field(default="pkl", metadata=_h("distillation loss: pkl, hkl, tkl, alm, hidden, uld, gold, kl, ce"))
    temperature: float = field(default=1.0, metadata=_h("softmax temperature of both sides; terms scaled by T^2"))
    direction: Literal["forward", "reverse"] = field(default="forward", metadata=_h(
        "forward: KL(teacher || student); reverse: KL(student || teacher)"))
    ce_weight: float = field(default=1.0, metadata=_h(
        "weight of the student's own cross-entropy (name=ce trains on the plain cross-entropy); with rescale_kd "
        "the X-Token reference adds the full CE (its CE scale 0.1 applies only without rescaling)"))
    kd_weight: float = field(default=1.0, metadata=_h("weight of the distillation term"))
    rescale_kd: bool = field(default=True, metadata=_h(
        "multiply each distillation term by CE/KD (detached) so it has the magnitude of CE"))
    rescale_by: Literal["value", "gradient"] = field(default="value", metadata=_h(
        "with rescale_kd: value (KD × CE/KD, equal values) or gradient (KD × |∂CE/∂z|/|∂KD/∂z| on the student "
        "logits z, equal gradient norms: GradMag, as ALM balances its terms; a loss whose value carries a "
        "gradient-free constant, like alm's binarised cross-entropy, is otherwise under-weighted)"))
    top_k: int = field(default=8192, metadata=_h("pkl: teacher columns kept per batch (by teacher mass)"))
    uld_topk: int = field(default=8192, metadata=_h(
        "uld/hkl/gold: sorted entries compared (rest summarized by its mass); 0 = exact full sort"))
    uld_weight: float = field(default=1.0, metadata=_h("hkl/gold: weight of the ULD term on the rest"))
    hkl_threshold: float = field(default=0.6, metadata=_h("hkl: minimum projection weight for a token pair"))
    alm_temperature: float = field(default=100.0, metadata=_h(
        "alm: binarisation temperature of the chunk log-likelihoods (tokenkit's binarization_temp)"))
    rest_column: bool = field(default=False, metadata=_h(
        "pkl/hkl/gold: also match the mass outside the compared columns as one extra column (false: renormalize "
        "on them, as the X-Token reference; the extra column makes the student copy the teacher's mass on tokens "
        "it cannot express onto unrelated tokens of its own)"))
    mass_weight: bool = field(default=True, metadata=_h(
        "pkl/hkl/gold with rest_column=false: weight each chunk by the teacher's mass on the compared columns "
        "(the chain-rule term of KL for the part of the teacher's distribution the student can express)"))
    project: Literal["auto", "student_to_teacher", "teacher_to_student"] = field(default="auto", metadata=_h(
        "pkl: which distribution goes through a projection. student_to_teacher: q = Wᵀ p_s in the teacher's "
        "vocabulary (ALGORITHMS.md); teacher_to_student: the teacher mapped onto the first student token of each "
        "of its tokens (X-Token's project_teacher_to_student); auto: per batch, the side that used fewer tokens "
        "per byte of the text (longer tokens) is projected onto the other's vocabulary"))
    expressible_rest: bool = field(default=True, metadata=_h(
        "pkl: condition the teacher on the columns some student token maps to and compare on the top-k columns "
        "plus one column for the rest of those (so the student cannot leak mass outside the top-k, and is not asked "
        "to copy the teacher's mass on tokens it cannot express); false: rest_column / renormalize"))
    exact_chunks_only: bool = field(default=False, metadata=_h(
        "pkl: compare only chunks of one token with identical bytes on each side (X-Token's "
        "exact_token_match_only); elsewhere the two next-token distributions are over different events"))
    chunk_positions: Literal["first", "mean"] = field(default="first", metadata=_h(
        "first: compare each chunk's first position on both sides (same byte context, both predict what "
        "starts at the chunk); mean: average each side's distributions over the chunk's positions (X-Token)"))

    def validate(self) -> list[str]:
        p = []
        if self.name not in loss_names():
            p.append(f"name: {self.name!r} is not a registered loss (choose one of {', '.join(loss_names())})")
        if not 0 < self.temperature < math.inf:
            p.append(f"temperature must be a finite number > 0, got {self.temperature}")
        for name in ("ce_weight", "kd_weight", "uld_weight"):
            if not 0 <= getattr(self, name) < math.inf:
                p.append(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.top_k < 1:
            p.append(f"top_k must be >= 1, got {self.top_k}")
        if self.uld_topk < 0:
            p.append(f"uld_topk must be >= 0, got {self.uld_topk}")
        if not 0 < self.alm_temperature < math.inf:
            p.append(f"alm_temperature must be a finite number > 0, got {self.alm_temperature}")
        if not 0 < self.hkl_threshold <= 1:
            p.append(f"hkl_threshold must be in (0, 1], got {self.hkl_threshold}")
        if self.name != "ce" and self.ce_weight == 0 and self.kd_weight == 0:
            p.append("ce_weight and kd_weight are both 0: nothing would be trained")
        return p


@dataclass
class ChunkedBatch:
    """Positions of one teacher/student pair that belong to a chunk, flattened.

    Attributes:
        student_logits: ``(N_s, V_s)`` student logits at positions in a chunk (with grad); None for a loss with
            ``reads_student = "target_logp"`` given ``student_target_logp``.
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
    # alm (distill.losses.alm): every position of every chunk on both sides, plus
    student_targets: torch.Tensor | None = None  # (N_s,) long next-token id of each student row
    student_target_logp: torch.Tensor | None = None  # (N_s,) student log-prob of it (with grad), when the trainer
    # computed it already (distill.losses.token_logp); student_logits may then be None for a loss that reads
    # the student only through it (``reads_student = "target_logp"``)
    teacher_target_logp: torch.Tensor | None = None  # (N_t,) teacher log-prob (T=1) of its own next token
    chunk_complete: torch.Tensor | None = None  # (C,) bool: every token of the chunk predicted on both sides
    # hidden (distill.losses.hidden): the final hidden states (the head's input) at each chunk's last token
    student_hidden: torch.Tensor | None = None  # (C', d) with grad
    teacher_hidden: torch.Tensor | None = None  # (C', d)


@dataclass
class LossContext:
    """Per teacher/student pair, device-resident data the losses need (built once)."""

    student_size: int
    teacher_size: int
    projection: ProjectionOperator | None = None
    pairs_s: torch.Tensor | None = None  # (P,) long
    pairs_t: torch.Tensor | None = None
    mask_s: torch.Tensor | None = None  # (V_s,) bool, True on paired columns
    mask_t: torch.Tensor | None = None
    down_projection: ProjectionOperator | None = None  # pkl, teacher_to_student: teacher rows → first student piece

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
    :meth:`forward`, returning the unscaled term; :meth:`__call__` applies ``T²`` (unless ``t_squared`` is
    False: a loss on which the softmax temperature does not act).
    """

    name = ""
    needs = "projection"  # projection | reverse_projection | hkl_pairs | exact_pairs | same_vocab | none
    t_squared = True
    reads_student = "logits"  # logits | target_logp (only the student's log-probs of its own next tokens) | hidden

    def __init__(self, params: LossConfig, ctx: LossContext):
        self.p = params
        self.ctx = ctx

    def __call__(self, batch: ChunkedBatch) -> torch.Tensor:
        if batch.n_chunks == 0:
            s = next(x for x in (batch.student_logits, batch.student_target_logp, batch.student_hidden)
                     if x is not None)
            return s.sum() * 0.0
        return self.forward(batch) * (self.p.temperature ** 2 if self.t_squared else 1.0)

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def student_log_probs(self, batch: ChunkedBatch) -> torch.Tensor:
        """``log softmax(z_s / T)``: ``(N_s, V_s)``."""
        return torch.log_softmax(batch.student_logits.float() / self.p.temperature, dim=-1)

    def student_probs(self, batch: ChunkedBatch) -> torch.Tensor:
        """``softmax(z_s / T)``: ``(N_s, V_s)``."""
        return torch.softmax(batch.student_logits.float() / self.p.temperature, dim=-1)


def make_loss(name: str, params: LossConfig, ctx: LossContext) -> KDLoss:
    if name not in LOSSES:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"unknown loss {name!r}", f"choose one of {', '.join(loss_names())}")
    return LOSSES[name](params, ctx)


def balance_by_gradient(ce: torch.Tensor, kd_terms: list[torch.Tensor], logits: torch.Tensor) -> list[torch.Tensor]:
    """Each KD term times ``|∂CE/∂z| / |∂KD/∂z|`` (detached), ``z`` the student logits ``(B, L, V)`` both were
    computed from: every term then pulls the logits as hard as the cross-entropy (``loss.rescale_by=gradient``)."""
    g_ce = torch.autograd.grad(ce, logits, retain_graph=True)[0].norm()
    out = []
    for kd in kd_terms:
        if not kd.requires_grad:
            out.append(kd)
            continue
        g = torch.autograd.grad(kd, logits, retain_graph=True, allow_unused=True)[0]
        out.append(kd if g is None else kd * (g_ce / g.norm().clamp_min(1e-12)).detach())
    return out


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
