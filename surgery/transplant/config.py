"""Frozen, validated configuration of a transplant and of a heal run, on the project's config system.

Both are :class:`surgery.config.Config` dataclasses: ``validate()`` holds the rules, every violated
rule is reported at once (:class:`surgery.errors.ConfigError`) when one is built, ``from_dict`` /
YAML with ``key=value`` overrides rejects unknown keys, and the commands' flags are generated from the
fields (:mod:`surgery.config_flags`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

from surgery.config import Config

SPLITS = ("none", "pieces")
# the choices of a heal's fields, one list each: the config validates them, the CLI and the benchmarks offer them
Params = Literal["new-rows", "head", "lora", "all"]
Autocast = Literal["auto", "bf16", "off"]
TeacherDecay = Literal["none", "linear"]
TeacherOn = Literal["repeats", "repeated-blocks", "every"]
PARAMS, AUTOCAST, TEACHER_DECAY, TEACHER_ON = (get_args(t) for t in (Params, Autocast, TeacherDecay, TeacherOn))


@dataclass(frozen=True)
class TransplantConfig(Config):
    """Parameters of :func:`surgery.transplant.transplant`.

    The defaults are the TokenAdapt reference values (k=3, τ=0.3, w=0.3, θ=0, pad to 128)
    plus the measured improvements of ``io_split="pieces"`` (see :mod:`surgery.transplant.methods`).
    """

    method: str = field(default="tokenadapt", metadata={"help": "init method (registry name)"})
    aux_model: str = field(default="minilm", metadata={"help": "sentence-transformers model: asset name, folder or hub id"})
    top_k: int = field(default=3, metadata={"help": "global heuristic: neighbours per new token"})
    temperature: float = field(default=0.3, metadata={"help": "softmax temperature τ of local and global weights"})
    global_weight: float = field(default=0.3, metadata={"help": "hybrid weight w of the global estimate"})
    threshold: float = field(default=0.0, metadata={"help": "global heuristic: drop neighbours with cosine < θ"})
    io_split: Literal["pieces", "none"] = field(default="pieces", metadata={
        "help": "'pieces': merged tokens get a logit offset per extra piece and, on an untied head, input rows "
                "lean on the last piece and output rows on the first (see methods); 'none': as published"})
    input_focus: float = field(default=0.5, metadata={"help": "io_split=pieces: weight of the last piece in input rows"})
    output_focus: float = field(default=0.5, metadata={"help": "io_split=pieces: weight of the first piece in output rows"})
    output_bias: float | None = field(default=None, metadata={
        "help": "io_split=pieces: logit offset per extra character-starting piece of a merged token (0 = off; default: -1.0 on a "
                "tied head, -1.5 on an untied one, the measured best); see calibration"})
    calibration_texts: tuple[str, ...] = field(default=(), metadata={
        "help": "text files for fitting the logit-bias direction (default: the shipped train texts)"})
    donor: str | None = field(default=None, metadata={"help": "omp: donor model that already speaks the new tokenizer"})
    omp_k: int = field(default=8, metadata={"help": "omp: non-zero coefficients per new token (8: best of 4/8/16/64 measured)"})
    omp_ridge: float = field(default=1e-2, metadata={
        "help": "omp: Tikhonov term of the coefficient fits, relative to the mean squared atom norm; keeps near-"
                "collinear atoms from getting huge cancelling coefficients (0 = plain least squares)"})
    untie: bool = field(default=False, metadata={"help": "give a tied model a separate output head"})
    pad_to_multiple: int = field(default=128, metadata={"help": "pad the embedding rows to a multiple of this (1 = off)"})
    fill_special_roles: bool = field(default=True, metadata={
        "help": "set a missing bos/eos on the new tokenizer from its <|begin_of_text|>/<eos>-style tokens"})
    add_chat_markers: bool = field(default=False, metadata={
        "help": "add the old chat template's markers to a new tokenizer without a template (rows copied)"})
    seed: int = field(default=0, metadata={"help": "seed of random rows"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda for the numeric work (default: cuda if present)"})
    aux_batch_size: int = field(default=512, metadata={"help": "aux model batch size"})
    aux_max_seq_length: int = field(default=16, metadata={"help": "aux model max tokens per token string"})
    aux_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "aux model dtype: auto (bf16 where the hardware has it), float32, bfloat16, float16"})
    cache_dir: str = field(default="artifacts/cache/aux", metadata={"help": "aux embedding cache folder"})

    HINT = "see `surgery transplant --help`"

    def validate(self) -> list[str]:
        problems = []
        if self.top_k < 1:
            problems.append(f"top_k must be >= 1, got {self.top_k}")
        if not 0 < self.temperature < math.inf:  # also catches NaN
            problems.append(f"temperature must be a finite number > 0, got {self.temperature}")
        if not 0.0 <= self.global_weight <= 1.0:
            problems.append(f"global_weight must be in [0, 1], got {self.global_weight}")
        if not -1.0 <= self.threshold <= 1.0:
            problems.append(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.io_split not in SPLITS:
            problems.append(f"io_split must be one of {SPLITS}, got {self.io_split!r}")
        for name in ("input_focus", "output_focus"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {v}")
        if self.output_bias is not None and not -20.0 <= self.output_bias <= 0.0:
            problems.append(f"output_bias is a logit offset per extra piece in [-20, 0], got {self.output_bias}")
        if self.omp_k < 1:
            problems.append(f"omp_k must be >= 1, got {self.omp_k}")
        if not 0.0 <= self.omp_ridge <= 10.0:
            problems.append(f"omp_ridge must be in [0, 10], got {self.omp_ridge}")
        if self.pad_to_multiple < 1:
            problems.append(f"pad_to_multiple must be >= 1, got {self.pad_to_multiple}")
        if self.aux_batch_size < 1 or self.aux_max_seq_length < 2:
            problems.append("aux_batch_size must be >= 1 and aux_max_seq_length >= 2")
        if self.aux_dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"aux_dtype must be auto, float32, bfloat16 or float16, got {self.aux_dtype!r}")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device must be cpu or cuda, got {self.device!r}")
        from surgery.transplant.methods import METHODS

        if self.method not in METHODS:
            problems.append(f"unknown method {self.method!r} (known: {', '.join(sorted(METHODS))})")
        elif self.method == "omp" and not self.donor:
            problems.append("method 'omp' needs a donor model (--donor MODEL)")
        return problems


@dataclass(frozen=True)
class HealConfig(Config):
    """Parameters of a heal run (``surgery heal``): a transplanted model trained on text, resumable.

    Exactly one of ``steps`` and ``minutes`` bounds the run. ``params`` says what is trained:
    ``new-rows`` (default) the embedding and head rows the transplant initialized, row-sparse with a lazy
    per-row Adam; ``head`` only their head rows (the body runs forward only); ``lora`` the new rows plus LoRA
    adapters on the body (merged at the end); ``all`` every parameter (dense AdamW at ``all_lr``). The
    ``teacher`` (by default the transplant's base model) teaches only steps whose blocks were all read before
    (``teacher_on="repeats"``; ``every`` for all steps); ``teacher_fraction`` < 1 keeps it for that first part of
    the budget only (CE alone afterwards).
    """

    HINT = "see `surgery heal --help` and `surgery heal --help-config`"

    steps: int | None = field(default=None, metadata={"help": "optimizer steps"})
    minutes: float | None = field(default=None, metadata={"help": "wall-clock budget instead of steps"})
    params: Params = field(default="new-rows", metadata={
        "help": "what is trained: new-rows (input and head rows the transplant initialized, row-sparse), head (their "
                "head rows only: forward-only body, about 2x faster steps), lora (new rows + LoRA on the body), all "
                "(every parameter, dense)"})
    lr: float = field(default=2e-3, metadata={"help": "learning rate of the trained rows (row-sparse Adam)"})
    negatives: int = field(default=1024, metadata={
        "help": "also train the head rows of the N trainable tokens the batch's softmax favours most (their "
                "push-down); measured: 0 → 1024 helped every language (SmolLM2 <- Llama-3, 60 CPU steps)"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank (params=lora)"})
    lora_lr: float = field(default=2e-4, metadata={"help": "learning rate of the LoRA adapters (params=lora)"})
    all_lr: float = field(default=1e-4, metadata={"help": "learning rate of every parameter (params=all, AdamW)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per step"})
    warmup: int = field(default=5, metadata={
        "help": "linear warm-up steps (then cosine to 10% over the step or time budget)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (LoRA adapters, params=all)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip (0 = off)"})
    train_rows: Literal["new", "all"] = field(default="new", metadata={
        "help": "rows that may move: new (only rows the transplant did not copy) or all (every row)"})
    autocast: Autocast = field(default="auto", metadata={
        "help": "mixed precision: auto (bf16 on CUDA, float32 on CPU), bf16, off. On CPU the faster one depends on "
                "the chip: bf16 steps were 1.3x faster on an AVX512-BF16 AMD EPYC, slower on an AMX Xeon"})
    checkpoint_every: int = field(default=50, metadata={"help": "write a resumable state every N steps"})
    eval_every: int = field(default=0, metadata={
        "help": "bits/byte of the eval text every N steps, into the metrics (0: before and after only)"})
    seed: int = field(default=0, metadata={"help": "data order and init seed"})
    teacher: str = field(default="auto", metadata={
        "help": "auto (the base model named in the input's transplant_report.json, with its own tokenizer), a model, "
                "or none (next-token CE only): teaches through --loss on blocks of the text, by default only blocks "
                "the heal reads again (--teacher-on repeats), where CE alone starts to overfit (README, healing with "
                "the base model as teacher)"})
    loss: str = field(default="alm", metadata={
        "help": "the teacher's cross-vocabulary loss (alm, hidden, pkl, hkl, tkl, uld, gold; with --teacher)"})
    teacher_balance: Literal["gradient", "value"] = field(default="gradient", metadata={
        "help": "how the teacher's term is scaled against CE (with --teacher): gradient (|dCE/dz| / |dKD/dz| on "
                "the student logits, so it pulls as hard as CE) or value (KD x CE/KD)"})
    teacher_fraction: float = field(default=1.0, metadata={
        "help": "the teacher teaches during this first fraction of the budget (of the minutes for --minutes, of "
                "the steps for --steps), then CE alone without the teacher's forward pass (with --teacher; 1 = "
                "the whole run)"})
    teacher_decay: TeacherDecay = field(default="none", metadata={
        "help": "the teacher's weight over its fraction of the budget (with --teacher): none (1 throughout) or "
                "linear (from 1 down to 0 at the end of the fraction)"})
    teacher_on: TeacherOn = field(default="repeats", metadata={
        "help": "which steps of its fraction the teacher teaches (with a teacher): repeats, only a step whose blocks "
                "were all drawn before (a block's first reading is CE alone: on a corpus the budget reads about once "
                "the heal is CE and the teacher costs nearly nothing; on one it reads several times the teacher "
                "teaches from the second reading on); repeated-blocks, the same block by block (in every step the "
                "blocks drawn before, whatever the others are); or every step"})
    teacher_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={
        "help": "the teacher's weights (with --teacher): auto is bfloat16 when the heal runs under bf16 autocast "
                "(its forward is bf16 then anyway; float32 weights would only be cast every step), else float32"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda if present)"})

    @property
    def input_rows(self) -> bool:
        """Whether input rows are trained (everything but ``params=head``)."""
        return self.params != "head"

    @property
    def lora(self) -> bool:
        return self.params == "lora"

    def validate(self) -> list[str]:
        problems = []
        if (self.steps is None) == (self.minutes is None):
            problems.append("give exactly one of steps and minutes")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if self.minutes is not None and not 0 < self.minutes < math.inf:
            problems.append(f"minutes must be a finite number > 0, got {self.minutes}")
        for name in ("lr", "lora_lr", "all_lr"):
            if not 0 < getattr(self, name) < math.inf:  # also catches NaN
                problems.append(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.lora_rank < 1:
            problems.append(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.seq_len < 8:
            problems.append(f"seq_len must be >= 8, got {self.seq_len}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.negatives < 0:
            problems.append(f"negatives must be >= 0, got {self.negatives}")
        if self.warmup < 0:
            problems.append(f"warmup must be >= 0, got {self.warmup}")
        from distill.teaching import TEACHER_LOSSES

        if self.loss not in TEACHER_LOSSES:
            problems.append(f"loss must be a cross-vocabulary loss ({', '.join(TEACHER_LOSSES)}), got {self.loss!r}")
        if not 0 < self.teacher_fraction <= 1:  # also catches NaN
            problems.append(f"teacher_fraction must be in (0, 1], got {self.teacher_fraction}")
        if self.teacher == "none" and (self.teacher_fraction != 1 or self.teacher_decay != "none"):
            problems.append("teacher_fraction and teacher_decay need a teacher (teacher is none)")
        if self.eval_every < 0:
            problems.append(f"eval_every must be >= 0, got {self.eval_every}")
        if self.checkpoint_every < 1:
            problems.append(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not self.grad_clip >= 0 or not self.weight_decay >= 0:
            problems.append("grad_clip and weight_decay must be >= 0")
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            problems.append(f"device must be cpu or cuda, got {self.device!r}")
        return problems
