"""The context builder: what a registered loss needs for one teacher/student pair (projections, pairs).

Projections come from the core (:mod:`surgery.vocab.projection`), which keeps them on the ids the
teacher's tokenizer emits (a prebuilt one is folded onto them, :func:`~surgery.vocab.projection.fold_to_emitted`),
and are wrapped as device-resident :class:`~distill.losses.operator.ProjectionOperator`\ s.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from distill.losses.base import LOSSES, LossContext
from distill.losses.operator import ProjectionOperator


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
    from surgery.vocab.projection import build_projection, exact_pairs, fold_to_emitted, hkl_pairs

    cls = LOSSES[name]
    Vs, Vt = len(student_vocab), len(teacher_vocab)
    if cls.needs in ("projection", "hkl_pairs") and projection is None:
        projection = build_projection(student_vocab, teacher_vocab)
    if cls.needs in ("projection", "hkl_pairs") and projection is not None:
        # mass on never-emitted twins (byte fallback beside an ordinary piece) goes to the emitted id
        projection = dataclasses.replace(projection, matrix=fold_to_emitted(projection.matrix, teacher_vocab))
    if cls.needs == "projection":
        ctx = LossContext(Vs, Vt, projection=ProjectionOperator(projection.matrix, device))
        if name == "pkl" and project != "student_to_teacher":
            down = down_projection if down_projection is not None else first_piece_projection(teacher_vocab,
                                                                                               student_vocab)
            ctx.down_projection = ProjectionOperator.rows_of(down.matrix, device)
        return ctx
    if cls.needs == "reverse_projection":
        if reverse_projection is None:
            reverse_projection = build_projection(teacher_vocab, student_vocab)
        return LossContext(Vs, Vt, projection=ProjectionOperator.rows_of(reverse_projection.matrix, device))
    if cls.needs == "hkl_pairs":
        ids_s, ids_t = hkl_pairs(projection, hkl_threshold)
        return LossContext.with_pairs(Vs, Vt, ids_s, ids_t, device)
    if cls.needs == "exact_pairs":
        ids_s, ids_t = exact_pairs(student_vocab, teacher_vocab)  # teacher side: the emitted ids
        _, first = np.unique(ids_t, return_index=True)  # keep the pairing one-to-one
        first = np.sort(first)
        return LossContext.with_pairs(Vs, Vt, ids_s[first], ids_t[first], device)
    if cls.needs == "same_vocab" and student_vocab.hash != teacher_vocab.hash and \
            student_vocab.surfaces != teacher_vocab.surfaces:
        raise SurgeryError(f"loss 'kl' needs the teacher to share the student's tokenizer "
                           f"({student_vocab.name or 'student'} ≠ {teacher_vocab.name or 'teacher'})",
                           "use loss.name=pkl (or hkl, uld, gold) for teachers with another vocabulary")
    return LossContext(Vs, Vt)
