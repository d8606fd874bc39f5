"""A teacher for healing: the base model teaches its transplanted copy through a cross-vocabulary loss.

After ``surgery transplant BASE NEW_TOKENIZER OUT`` the best teacher there is sits beside the student: ``BASE``
itself, with its own tokenizer (``transplant_report.json`` records it as ``base_model``). A heal with a teacher
trains on blocks of the training text as ``surgery distill`` does (both sides encode the same block, their chunks
are aligned, :func:`distill.trainer.distill_task.micro_loss` adds the student's CE and the teacher's term), under
whatever parameter policy the heal uses (new rows, head, LoRA, all).

- :func:`resolve_teacher` — ``auto`` | ``none`` | a model: which teacher a heal of ``model_path`` gets;
- :func:`heal_teacher` — the teacher's tokenizer, vocabulary and loss (no weights); :func:`load_teacher_weights`
  its model; :func:`load_heal_teacher` both;
- :class:`TeacherTask` — the loop's view of a heal with a teacher: the plain heal's random token blocks
  (:class:`distill.trainer.heal_run.BlocksTask`, resumable through its generator) with the teacher's term added;
- :func:`teacher_weight` — the teacher's weight along the budget: on for its first ``teacher_fraction`` (constant
  or decaying linearly), then off: CE alone, and the teacher's forward pass is skipped;
- ``teacher_on="repeats"`` — the teacher teaches only steps whose blocks were all read before: a block's first
  reading is CE alone (fresh text teaches the student as much as the teacher does, at no extra cost), its later
  readings, where CE alone starts to overfit, get the teacher; ``"repeated-blocks"`` — the same block by block:
  in every step the teacher reads and teaches the blocks read before, whatever the others are (its term weighs
  their share of the step's blocks).
- the teacher's weights load at the first step it teaches (:meth:`TeacherTask.micro_batches`): a heal that
  reads its corpus once never loads them (neither their memory nor their load time); :func:`heal_teacher_task`
  checks before the first step that they fit in the memory free beside the student, and a load that still fails
  stops the heal with its state saved at the step before (:class:`distill.trainer.heal_run.StopBeforeStep`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from distill.trainer.heal_run import BlocksTask, StopBeforeStep
from surgery.errors import SurgeryError
from surgery.transplant.config import TEACHER_DECAY, TEACHER_ON

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


def heal_teacher(name: str, student_tokenizer, loss_name: str, device, **loss_params):
    """A teacher without its weights: its own tokenizer and vocabulary, and the loss ``loss_name`` through the
    core's projection (:func:`load_teacher_weights` loads the model).

    Returns:
        ``(teacher, student_vocab, loss_config)``: a :class:`distill.teachers.Teacher` with ``model=None``, the
        student's canonical vocabulary and the :class:`distill.losses.LossConfig` used.

    Raises:
        SurgeryError: the teacher's tokenizer cannot be loaded, or its checkpoint is broken, lacks weights or has
            fewer embedding rows than the tokenizer has ids (:func:`surgery.loading.check_checkpoint`).
    """
    from distill.losses import LossConfig, build_context, make_loss
    from distill.teachers import Teacher
    from surgery.loading import check_checkpoint, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    lc = LossConfig(name=loss_name, **loss_params)
    s_vocab = canonical_vocabulary(student_tokenizer)
    try:
        tok = load_tokenizer(name)
    except SurgeryError as e:  # say which of the heal's models is wrong
        raise SurgeryError(f"teacher {name}: {e.message}", e.hint) from e
    check_checkpoint(name, tok)  # before the first step, from headers; load_teacher_weights checks the weights
    t_vocab = canonical_vocabulary(tok, name)
    ctx = build_context(loss_name, s_vocab, t_vocab, device, hkl_threshold=lc.hkl_threshold, project=lc.project)
    return Teacher(0, name, tok, t_vocab, make_loss(loss_name, lc, ctx), 1.0, None), s_vocab, lc


TOO_BIG_HINT = ("heal with --teacher none (CE alone, the memory of one model), load the teacher in bfloat16 "
                "(--teacher-dtype bfloat16), or pass a smaller --teacher")


def load_teacher_weights(name: str, tokenizer, device, dtype=None) -> torch.nn.Module:
    """The heal teacher's model (:func:`distill.teachers.load_frozen`, float32 unless ``dtype``), with the heal's way
    out (:data:`TOO_BIG_HINT`) should it not fit."""
    from distill.teachers import load_frozen

    return load_frozen(name, tokenizer, device, dtype or torch.float32, too_big_hint=TOO_BIG_HINT)


def load_heal_teacher(name: str, student_tokenizer, loss_name: str, device, dtype=None, **loss_params):
    """:func:`heal_teacher` with its model loaded (:func:`load_teacher_weights`); same return value."""
    teacher, s_vocab, lc = heal_teacher(name, student_tokenizer, loss_name, device, **loss_params)
    teacher.model = load_teacher_weights(name, teacher.tokenizer, device, dtype)
    LOG.info("heal teacher: %s (%d tokens, loss %s)", name, len(teacher.vocab), loss_name)
    return teacher, s_vocab, lc


def check_teacher_fits(name: str, dtype: torch.dtype, device, beside: int = 0) -> None:
    """Refuse a teacher whose weights (at ``dtype``) exceed the memory free on ``device`` now, less ``beside``
    bytes still to come there (the student, when it is not on the device yet). A necessary condition only (the
    student's optimizer states and activations come on top); skipped where either size is unknown
    (:mod:`surgery.memory`).

    Raises:
        SurgeryError: the weights do not fit.
    """
    from surgery.memory import free_memory, size_text, weights_nbytes

    need, free = weights_nbytes(name, dtype), free_memory(device)
    if need is None or free is None:
        return
    free = max(free - beside, 0)
    if need > free:
        kind, dt = torch.device(device).type, str(dtype).replace("torch.", "")
        raise SurgeryError(f"the teacher {name} needs {size_text(need)} of {kind} memory for its weights ({dt}), "
                           f"more than the {size_text(free)} free beside the student",
                           TOO_BIG_HINT)


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
    the third reading on from its kept log-probs). With ``teacher_on="repeated-blocks"`` the choice is made per
    block (:attr:`taught`): the teacher reads only the step's blocks drawn before and teaches on them (the student's
    CE covers every block), its term weighted by their share of the step's blocks.

    The teacher's model is loaded by ``load`` at the first step it teaches (:attr:`loaded_at`), unless ``teacher``
    comes with one: a heal that never re-reads a block never loads it. If that load fails the step has not begun
    (its blocks are put back: the data generator and :attr:`seen` are as before it) and the heal stops with its
    state saved (:class:`distill.trainer.heal_run.StopBeforeStep`).

    Args:
        texts: training texts.
        tokenizer / s_vocab: the student's tokenizer and canonical vocabulary.
        teacher: from :func:`heal_teacher` (no model yet: ``load`` gives it) or :func:`load_heal_teacher`.
        loss_config: its :class:`~distill.losses.LossConfig`.
        seq_len: student tokens per block (with the start token).
        batch_size: blocks per step.
        teacher_fraction: fraction of the budget, in (0, 1], with the teacher on.
        teacher_decay: ``none`` or ``linear`` (:func:`teacher_weight`).
        teacher_on: ``every`` step of the fraction, ``repeats`` (steps whose blocks were all drawn before) or
            ``repeated-blocks`` (in each step, the blocks drawn before).
        load: returns the teacher's model (e.g. :func:`load_teacher_weights`); needed when ``teacher.model`` is None.
    """

    def __init__(self, texts, tokenizer, s_vocab, teacher, loss_config, seq_len: int, batch_size: int, seed: int,
                 device, teacher_fraction: float = 1.0, teacher_decay: str = "none", teacher_on: str = "every",
                 load=None):
        super().__init__(texts, tokenizer, s_vocab, seq_len, batch_size, seed, device)
        if teacher.model is None and load is None:
            raise ValueError("a teacher without its model needs load=")
        self.load = load
        self.loaded_at: int | None = None  # the step at which load ran (None: not run)
        from distill.teachers import TargetMemo
        from distill.trainer.distill_task import reads_student

        if getattr(teacher.loss, "needs_targets", False) and reads_student(teacher) == "target_logp":
            teacher = dataclasses.replace(teacher, memo=TargetMemo())  # alm: a block's teacher pass runs once
        self.teacher = teacher
        self.cfg.data.teacher_max_tokens = TEACHER_TOKENS * seq_len
        self.cfg.loss = loss_config
        self.teacher_fraction, self.teacher_decay = teacher_fraction, teacher_decay
        if teacher_decay not in TEACHER_DECAY:
            raise ValueError(f"teacher_decay must be one of {', '.join(TEACHER_DECAY)}, got {teacher_decay!r}")
        if teacher_on not in TEACHER_ON:
            raise ValueError(f"teacher_on must be one of {', '.join(TEACHER_ON)}, got {teacher_on!r}")
        self.teacher_on = teacher_on
        self.seen = np.zeros(len(self.blocks), dtype=bool)  # (n_blocks,) drawn at least once so far
        self.scheduled = 1.0  # the weight teacher_weight gives the current step
        self.taught = np.ones(batch_size, dtype=bool)  # (batch_size,) the blocks of the current step it teaches

    @property
    def weight(self) -> float:
        """The teacher's weight in the current step (0: CE alone; the term weighs this times :attr:`share`)."""
        return self.scheduled if self.taught.any() else 0.0

    @property
    def share(self) -> float:
        """The taught blocks' share of the current step's blocks (1 unless ``teacher_on="repeated-blocks"``)."""
        return float(self.taught.mean())

    def taught_blocks(self, before: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: which blocks of a step the teacher teaches, given which were drawn at an earlier step."""
        if self.teacher_on == "every":
            return np.ones_like(before)
        if self.teacher_on == "repeats":
            return np.full_like(before, before.all())
        return before.copy()

    def set_budget_fraction(self, spent: float) -> None:
        """Called by the loop before each step: ``spent`` of the budget is spent (sets the teacher's weight)."""
        self.scheduled = teacher_weight(spent, self.teacher_fraction, self.teacher_decay)

    def micro_batches(self, step: int) -> list:
        """The plain heal's batch; notes which of its blocks the teacher teaches (:attr:`taught`) and loads the
        teacher's model if this is the first step it teaches.

        Raises:
            StopBeforeStep: the load failed (nothing of this step was drawn).
        """
        rng = self.gen.get_state()
        out = super().micro_batches(step)
        ids = np.asarray([i for _, idx in out for i in idx], dtype=np.int64)
        before = self.seen[ids].copy()
        self.taught = self.taught_blocks(before)
        self.seen[ids] = True
        if self.weight > 0 and self.teacher.model is None:
            try:
                self.teacher_model(step)
            except SurgeryError as e:
                self.gen.set_state(rng)
                self.seen[ids] = before
                raise StopBeforeStep(f"{e.message} (loading it for step {step + 1}, the first it teaches)", e.hint,
                                     step) from e
        return out

    def teacher_model(self, step: int = 0) -> torch.nn.Module:
        """The teacher's model, loaded now if it was not yet (at ``step``, recorded in :attr:`loaded_at`)."""
        if self.teacher.model is None:
            t0 = time.time()
            self.teacher.model = self.load()
            self.loaded_at = step
            LOG.info("heal teacher %s loaded at step %d (%.1f s)", self.teacher.name, step + 1, time.time() - t0)
        return self.teacher.model

    def first_taught_step(self, steps: int) -> int | None:
        """The first of ``steps`` steps from the start that the teacher teaches, from a redraw of the block order
        (the weight schedule of a step budget: :func:`teacher_weight` at ``step / steps``); None if it teaches
        none of them."""
        seen = np.zeros(len(self.blocks), dtype=bool)
        for step, ids in enumerate(self.redraw(steps)):
            if self.taught_blocks(seen[ids]).any() and \
                    teacher_weight(step / steps, self.teacher_fraction, self.teacher_decay) > 0:
                return step
            seen[ids] = True
        return None

    def replay(self, steps: int) -> None:
        """Rebuild :attr:`seen` after a resume at ``steps``: redraw that many batches from the seed (the loop
        restores the generator itself)."""
        self.seen[:] = False
        for ids in self.redraw(steps):
            self.seen[ids] = True

    def redraw(self, steps: int):
        """The block ids of the first ``steps`` steps, step by step, drawn again from the seed (the loop's order)."""
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(steps):
            yield self.draw(gen)

    def teachers(self) -> list:
        """The teacher at this step's weight times the taught blocks' share, or none (outside its window, or no
        block read before with ``repeats`` / ``repeated-blocks``)."""
        return [] if self.weight == 0 else [dataclasses.replace(self.teacher, weight=self.weight * self.share)]

    def teacher_rows(self) -> np.ndarray | None:
        """The rows of this step's batch the teacher reads and teaches (None: all of them)."""
        return None if self.taught.all() else np.flatnonzero(self.taught)

    def step_metrics(self) -> dict:
        out = {"tokens": self.tokens, "teacher_weight": round(self.weight, 6),
               "teacher_blocks": int(self.taught.sum()) if self.weight > 0 else 0,
               "teacher_loaded": self.teacher.model is not None}
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


def heal_teacher_task(teacher_name: str, tokenizer, texts, config,
                      student: torch.nn.Module | None = None) -> TeacherTask:
    """The :class:`TeacherTask` of a heal (``config``: a :class:`surgery.transplant.config.HealConfig` with
    ``loss``, ``teacher_balance``, ``seq_len``, ``batch_size``, ``seed``, ``device``, ``teacher_fraction``,
    ``teacher_decay``, ``teacher_on``, ``teacher_dtype``).

    The teacher's tokenizer and loss are built now, its weights at the first step it teaches. Unless a step budget
    is known to teach no step (:meth:`TeacherTask.first_taught_step`), its weights are checked to fit in the memory
    free on the device beside ``student`` (:func:`check_teacher_fits`), so that a teacher too large for the machine
    is refused before the first step.

    Raises:
        SurgeryError: the teacher's tokenizer cannot be loaded, or its weights do not fit.
    """
    from surgery.memory import module_nbytes

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = teacher_dtype(config.teacher_dtype, config.autocast, device)
    teacher, s_vocab, lc = heal_teacher(teacher_name, tokenizer, config.loss, device,
                                        rescale_by=config.teacher_balance)
    task = TeacherTask(texts, tokenizer, s_vocab, teacher, lc, config.seq_len, config.batch_size, config.seed, device,
                       config.teacher_fraction, config.teacher_decay, config.teacher_on,
                       load=lambda: load_teacher_weights(teacher_name, teacher.tokenizer, device, dtype))
    if config.steps is not None and task.first_taught_step(config.steps) is None:
        LOG.info("heal teacher %s: none of the %d steps re-reads its blocks; its weights will not be loaded",
                 teacher_name, config.steps)
    else:
        check_teacher_fits(teacher_name, dtype, device, module_nbytes(student, device) if student is not None else 0)
        LOG.info("heal teacher: %s (%d tokens, loss %s, %s; loaded at the first step it teaches)", teacher_name,
                 len(teacher.vocab), config.loss, str(dtype).replace("torch.", ""))
    return task
