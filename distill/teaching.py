"""A teacher for healing: the base model teaches its transplanted copy through a cross-vocabulary loss.

After ``surgery transplant BASE NEW_TOKENIZER OUT`` the best teacher there is sits beside the student: ``BASE``
itself, with its own tokenizer (``transplant_report.json`` records it as ``base_model``). A heal with a teacher
trains on blocks of the training text as ``surgery distill`` does (both sides encode the same block, their chunks
are aligned, :func:`distill.trainer.distill_task.micro_loss` adds the student's CE and the teacher's term), under
whatever parameter policy the heal uses (new rows, head, LoRA, all).

- :func:`resolve_teacher` — ``auto`` | ``none`` | a model: which teacher a heal of ``model_path`` gets;
- :func:`load_heal_teacher` — the teacher model, its tokenizer and vocabulary, and its loss;
- :class:`TeacherTask` — the loop's view of a heal with a teacher: the plain heal's random token blocks
  (:class:`distill.trainer.heal_run.BlocksTask`, resumable through its generator) with the teacher's term added;
- :func:`teacher_weight` — the teacher's weight along the budget: on for its first ``teacher_fraction`` (constant
  or decaying linearly), then off: CE alone, and the teacher's forward pass is skipped;
- ``teacher_on="repeats"`` — the teacher teaches only steps whose blocks were all read before: a block's first
  reading is CE alone (fresh text teaches the student as much as the teacher does, at no extra cost), its later
  readings, where CE alone starts to overfit, get the teacher.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch

from distill.trainer.heal_run import BlocksTask

LOG = logging.getLogger(__name__)

REPORT = "transplant_report.json"
TEACHER_LOSSES = ("alm", "hidden", "pkl", "hkl", "tkl", "uld", "gold")
TEACHER_TOKENS = 4  # the teacher reads up to 4x the student's tokens of a block (TeacherTask)


def resolve_teacher(spec: str, model_path: str | Path) -> str | None:
    """The teacher of a heal: ``none`` → None; ``auto`` → ``base_model`` of ``model_path``'s transplant report;
    anything else is a model (asset name, folder or hub id).

    Raises:
        SurgeryError: ``auto`` on a folder without a transplant report naming its base model.
    """
    from surgery.errors import SurgeryError

    if spec == "none":
        return None
    if spec != "auto":
        return spec
    report = Path(model_path) / REPORT
    try:
        base = json.loads(report.read_text()).get("base_model") if report.exists() else None
    except (json.JSONDecodeError, AttributeError):
        base = None
    if not base:
        raise SurgeryError(f"--teacher auto: {str(report)!r} does not name the base model",
                           "pass --teacher MODEL (the model the transplant started from) or --teacher none")
    return str(base)


def load_heal_teacher(name: str, student_tokenizer, loss_name: str, device, dtype=None, **loss_params):
    """A frozen teacher with its own tokenizer and the loss ``loss_name`` through the core's projection.

    Returns:
        ``(teacher, student_vocab, loss_config)``: a :class:`distill.teachers.Teacher`, the student's canonical
        vocabulary and the :class:`distill.losses.LossConfig` used.

    Raises:
        SurgeryError: the teacher's weights do not fit in the device's memory.
    """
    from distill.losses import LossConfig, build_context, make_loss
    from distill.teachers import Teacher
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    lc = LossConfig(name=loss_name, **loss_params)
    s_vocab = canonical_vocabulary(student_tokenizer)
    tok = load_tokenizer(name)
    t_vocab = canonical_vocabulary(tok, name)
    ctx = build_context(loss_name, s_vocab, t_vocab, device, hkl_threshold=lc.hkl_threshold, project=lc.project)
    try:
        model = load_model(name, dtype=dtype or torch.float32, device=device)
    except torch.OutOfMemoryError as e:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"the teacher {name} does not fit in {device} memory beside the student ({e})",
                           "heal with --teacher none (CE alone, the memory of one model), or load the teacher in "
                           "bfloat16 (--teacher-dtype bfloat16)") from e
    model.eval()
    model.requires_grad_(False)
    LOG.info("heal teacher: %s (%d tokens, loss %s)", name, len(t_vocab), loss_name)
    return Teacher(0, name, tok, t_vocab, make_loss(loss_name, lc, ctx), 1.0, model), s_vocab, lc


def teacher_weight(spent: float, fraction: float = 1.0, decay: str = "none") -> float:
    """The teacher's weight at a step that starts with ``spent`` of the budget spent
    (:func:`distill.trainer.schedule.budget_fraction`): 0 from ``fraction`` on; before it 1 (``decay="none"``) or
    ``1 − spent / fraction`` (``"linear"``, 1 at the start, down to 0 at the end of the fraction)."""
    if spent >= fraction:
        return 0.0
    return 1.0 - spent / fraction if decay == "linear" else 1.0


class TeacherTask(BlocksTask):
    """The plain heal's random token blocks (:class:`distill.trainer.heal_run.BlocksTask`), the student's CE plus
    the teacher's term (rescaled to CE).

    Blocks are ``seq_len − 1`` consecutive student tokens (:func:`distill.data.token_blocks`; the start token
    makes ``seq_len``), so every language is drawn in proportion to its tokens. The teacher reads up to
    ``TEACHER_TOKENS · seq_len`` tokens of the same block: it needs more tokens than the student for the same
    bytes where its vocabulary is weaker (SmolLM2 on Chinese about 1.9x Llama-3's), and a teacher cut at
    ``seq_len`` tokens would teach only the first half of such a block.

    With ``alm`` (it reads of the teacher only its log-probs of its own next tokens) those are kept per block
    (:class:`distill.teachers.TargetMemo`): a block drawn again, or read again in a later epoch of a small corpus,
    costs no teacher pass.

    The teacher teaches for the first ``teacher_fraction`` of the budget (the loop reports the spent fraction
    through :meth:`set_budget_fraction`, weight :func:`teacher_weight`); after it a step is the plain heal's step
    (the student's CE on the same kind of blocks), the teacher's forward pass skipped. With ``teacher_on="repeats"``
    a step inside that fraction is a plain step too unless every block of its batch was drawn before
    (:attr:`seen`, rebuilt on resume by :meth:`replay`): on a corpus the budget reads about once the heal is CE
    alone, on one it reads several times the teacher teaches from the second reading on (and, with ``alm``, from
    the third reading on from its kept log-probs).

    Args:
        texts: training texts.
        tokenizer / s_vocab: the student's tokenizer and canonical vocabulary.
        teacher: from :func:`load_heal_teacher`.
        loss_config: its :class:`~distill.losses.LossConfig`.
        seq_len: student tokens per block (with the start token).
        batch_size: blocks per step.
        teacher_fraction: fraction of the budget, in (0, 1], with the teacher on.
        teacher_decay: ``none`` or ``linear`` (:func:`teacher_weight`).
        teacher_on: ``every`` step of the fraction or ``repeats`` (steps whose blocks were all drawn before).
    """

    def __init__(self, texts, tokenizer, s_vocab, teacher, loss_config, seq_len: int, batch_size: int, seed: int,
                 device, teacher_fraction: float = 1.0, teacher_decay: str = "none", teacher_on: str = "every"):
        super().__init__(texts, tokenizer, s_vocab, seq_len, batch_size, seed, device)
        from distill.teachers import TargetMemo
        from distill.trainer.distill_task import reads_student

        if getattr(teacher.loss, "needs_targets", False) and reads_student(teacher) == "target_logp":
            teacher = dataclasses.replace(teacher, memo=TargetMemo())  # alm: a block's teacher pass runs once
        self.teacher = teacher
        self.cfg.data.teacher_max_tokens = TEACHER_TOKENS * seq_len
        self.cfg.loss = loss_config
        self.teacher_fraction, self.teacher_decay = teacher_fraction, teacher_decay
        if teacher_on not in ("every", "repeats"):
            raise ValueError(f"teacher_on must be every or repeats, got {teacher_on!r}")
        self.teacher_on = teacher_on
        self.seen = np.zeros(len(self.blocks), dtype=bool)  # (n_blocks,) drawn at least once so far
        self.scheduled = 1.0  # the weight teacher_weight gives the current step
        self.repeat = True  # every block of the current step's batch was drawn at an earlier step

    @property
    def weight(self) -> float:
        """The teacher's weight in the current step (0: CE alone)."""
        return self.scheduled if self.teacher_on == "every" or self.repeat else 0.0

    def set_budget_fraction(self, spent: float) -> None:
        """Called by the loop before each step: ``spent`` of the budget is spent (sets the teacher's weight)."""
        self.scheduled = teacher_weight(spent, self.teacher_fraction, self.teacher_decay)

    def micro_batches(self, step: int) -> list:
        """The plain heal's batch; notes whether every block of it was drawn before (:attr:`repeat`)."""
        out = super().micro_batches(step)
        ids = np.asarray([i for _, idx in out for i in idx], dtype=np.int64)
        self.repeat = bool(self.seen[ids].all())
        self.seen[ids] = True
        return out

    def replay(self, steps: int) -> None:
        """Rebuild :attr:`seen` after a resume at ``steps``: redraw that many batches from the seed (the loop
        restores the generator itself)."""
        gen = torch.Generator().manual_seed(self.seed)
        self.seen[:] = False
        for _ in range(steps):
            self.seen[self.draw(gen)] = True

    def teachers(self) -> list:
        """The teacher at this step's weight, or none (outside its window, or a first reading with ``repeats``)."""
        return [] if self.weight == 0 else [dataclasses.replace(self.teacher, weight=self.weight)]

    def step_metrics(self) -> dict:
        out = {"tokens": self.tokens, "teacher_weight": round(self.weight, 6)}
        if self.teacher.memo is not None:
            out["teacher_memo_hits"] = self.teacher.memo.hits  # batches served without a teacher pass, so far
        return out


def teacher_dtype(name: str, autocast: str, device: torch.device) -> torch.dtype:
    """The dtype of a heal teacher's weights: ``name``, or for ``auto`` bfloat16 when the heal's forward passes
    run under bf16 autocast (``autocast`` as in :func:`distill.trainer.loop.use_bf16`), float32 otherwise."""
    from distill.trainer.loop import use_bf16

    if name == "auto":
        return torch.bfloat16 if use_bf16(autocast, device) else torch.float32
    return getattr(torch, name)


def heal_teacher_task(teacher_name: str, tokenizer, texts, config) -> TeacherTask:
    """The :class:`TeacherTask` of a heal (``config``: a :class:`surgery.transplant.config.HealConfig` with
    ``loss``, ``teacher_balance``, ``seq_len``, ``batch_size``, ``seed``, ``device``, ``teacher_fraction``,
    ``teacher_decay``, ``teacher_on``)."""
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher, s_vocab, lc = load_heal_teacher(teacher_name, tokenizer, config.loss, device,
                                             dtype=teacher_dtype(config.teacher_dtype, config.autocast, device),
                                             rescale_by=config.teacher_balance)
    return TeacherTask(texts, tokenizer, s_vocab, teacher, lc, config.seq_len, config.batch_size, config.seed, device,
                       config.teacher_fraction, config.teacher_decay, config.teacher_on)
