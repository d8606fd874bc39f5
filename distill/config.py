"""The distillation recipe: frozen, validated dataclasses loaded by :mod:`surgery.config`.

``surgery distill --help-config`` lists every key with its type, default and help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from distill.losses.base import LossConfig


def _h(text: str) -> dict:
    return {"help": text}


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = field(default=False, metadata=_h("train LoRA adapters (peft) instead of all weights"))
    r: int = field(default=16, metadata=_h("LoRA rank"))
    alpha: float = field(default=32.0, metadata=_h("LoRA alpha (scale = alpha / r)"))
    dropout: float = field(default=0.0, metadata=_h("dropout on the LoRA branch"))
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"),
                                            metadata=_h("module names that get adapters"))
    merge: bool = field(default=True, metadata=_h("merge the adapter into the weights at the end "
                                                   "(false: save the adapter alone, peft format)"))

    def validate(self) -> list[str]:
        p = []
        if self.r < 1:
            p.append(f"r must be >= 1, got {self.r}")
        if not 0 < self.alpha < math.inf:
            p.append(f"alpha must be a finite number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.enabled and not self.target_modules:
            p.append("target_modules must name at least one module when LoRA is enabled")
        return p


@dataclass(frozen=True)
class StudentConfig:
    model: str = field(metadata=_h("student: asset name (smollm2-135m), local HF folder or hub id"))
    tokenizer: str | None = field(default=None, metadata=_h("student tokenizer (default: the model's own)"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_h("LoRA settings"))
    trust_remote_code: bool = field(default=False, metadata=_h("allow custom model code from the hub"))


@dataclass(frozen=True)
class TeacherConfig:
    model: str = field(metadata=_h("teacher: asset name, local HF folder or hub id"))
    tokenizer: str | None = field(default=None, metadata=_h("teacher tokenizer (default: the model's own)"))
    weight: float = field(default=1.0, metadata=_h("fixed weight of this teacher's term (weighting.mode=fixed)"))
    alignment: str | None = field(default=None, metadata=_h(
        "saved projection student→teacher (`surgery align` output); built on the fly when unset"))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_h("teacher weights dtype"))
    trust_remote_code: bool = field(default=False, metadata=_h("allow custom model code from the hub"))

    def validate(self) -> list[str]:
        return [] if 0 <= self.weight < math.inf else [f"weight must be a finite number >= 0, got {self.weight}"]


@dataclass(frozen=True)
class WeightingConfig:
    mode: Literal["fixed", "dynamic"] = field(default="fixed", metadata=_h(
        "fixed: each teacher's `weight`; dynamic: softmax(alpha * score) per batch"))
    score: Literal["ce", "entropy", "max_prob"] = field(default="ce", metadata=_h(
        "dynamic score: -teacher bits/byte on the batch (ce), -mean entropy, or mean max probability"))
    alpha: float = field(default=1.0, metadata=_h("softmax sharpness of dynamic weights (0 = uniform)"))

    def validate(self) -> list[str]:
        return [] if math.isfinite(self.alpha) else [f"alpha must be a finite number, got {self.alpha}"]


@dataclass(frozen=True)
class CacheConfig:
    enabled: bool = field(default=False, metadata=_h(
        "compute each teacher's top-k logits once over the training blocks, write them to disk, stream them back"))
    dir: str | None = field(default=None, metadata=_h("cache folder (default: <output_dir>/teacher_cache)"))
    top_k: int = field(default=64, metadata=_h("logits kept per position"))
    batch_size: int = field(default=8, metadata=_h("blocks per teacher forward while building"))

    def validate(self) -> list[str]:
        return [] if self.top_k >= 1 and self.batch_size >= 1 else ["top_k and batch_size must be >= 1"]


@dataclass(frozen=True)
class DataConfig:
    train: str = field(metadata=_h("training text: .txt, .jsonl, dataset folder or hub id"))
    heldout: str | None = field(default=None, metadata=_h("held-out text for bits/byte (same kinds)"))
    format: Literal["auto", "text", "jsonl", "dataset"] = field(default="auto", metadata=_h("source kind"))
    text_field: str = field(default="text", metadata=_h("JSONL / dataset field holding the text"))
    dataset_config: str | None = field(default=None, metadata=_h("datasets configuration name"))
    split: str = field(default="train", metadata=_h("datasets split for training"))
    heldout_split: str = field(default="validation", metadata=_h("datasets split for held-out text"))
    block_chars: int = field(default=1024, metadata=_h("characters per training block"))
    pack: bool = field(default=True, metadata=_h(
        "join consecutive documents (blank line between) before cutting blocks, so short documents fill blocks"))
    max_tokens: int = field(default=512, metadata=_h("tokens per block and tokenizer (incl. the start token)"))
    shuffle: bool = field(default=True, metadata=_h("shuffle blocks each epoch (seeded)"))
    max_documents: int | None = field(default=None, metadata=_h("use only the first documents"))
    max_blocks: int | None = field(default=None, metadata=_h(
        "use only the first blocks (in file order): a small in-domain corpus, repeated over epochs"))

    def validate(self) -> list[str]:
        p = []
        if self.block_chars < 16:
            p.append(f"block_chars must be >= 16, got {self.block_chars}")
        if self.max_tokens < 4:
            p.append(f"max_tokens must be >= 4, got {self.max_tokens}")
        if self.max_blocks is not None and self.max_blocks < 1:
            p.append(f"max_blocks must be >= 1, got {self.max_blocks}")
        if self.max_documents is not None and self.max_documents < 1:
            p.append(f"max_documents must be >= 1, got {self.max_documents}")
        return p


@dataclass(frozen=True)
class TrainConfig:
    steps: int = field(default=100, metadata=_h("optimizer steps"))
    batch_size: int = field(default=8, metadata=_h("blocks per optimizer step, all ranks together"))
    micro_batch_size: int = field(default=2, metadata=_h("blocks per forward pass and rank (gradient accumulation)"))
    lr: float = field(default=5e-5, metadata=_h("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.0, metadata=_h("AdamW weight decay"))
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata=_h("AdamW betas"))
    warmup_steps: int = field(default=0, metadata=_h("linear warm-up steps"))
    scheduler: Literal["constant", "linear", "cosine"] = field(default="cosine", metadata=_h("decay after warm-up"))
    min_lr_ratio: float = field(default=0.1, metadata=_h("final lr / peak lr (linear, cosine)"))
    grad_clip: float = field(default=1.0, metadata=_h("max gradient norm (0 = off)"))
    seed: int = field(default=0, metadata=_h("seed of data order, LoRA init and RNGs"))
    deterministic: bool = field(default=False, metadata=_h("deterministic kernels (bitwise-reproducible resume)"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=_h("auto: cuda when present"))
    precision: Literal["auto", "fp32", "bf16"] = field(default="auto", metadata=_h(
        "auto: bf16 autocast on a GPU that supports it, fp32 on CPU (distill.trainer.loop.use_bf16)"))
    threads: int | None = field(default=None, metadata=_h("torch CPU threads (default: torch's choice)"))
    eval_every: int = field(default=0, metadata=_h("held-out bits/byte every N steps (0: at start and end only)"))
    eval_at_start: bool = field(default=True, metadata=_h("held-out bits/byte before the first step"))
    eval_max_bytes: int = field(default=20000, metadata=_h("held-out text is cut to this many bytes"))
    eval_max_length: int = field(default=512, metadata=_h("window length in tokens for bits/byte"))
    checkpoint_every: int = field(default=0, metadata=_h("save a resumable checkpoint every N steps (0 = off)"))
    keep_checkpoints: int = field(default=2, metadata=_h("resumable checkpoints kept (oldest removed)"))
    log_every: int = field(default=1, metadata=_h("metrics line every N steps"))
    progress: bool = field(default=True, metadata=_h("tqdm progress bar (rank 0)"))

    def validate(self) -> list[str]:
        p = []
        if self.steps < 1:
            p.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1 or self.micro_batch_size < 1:
            p.append("batch_size and micro_batch_size must be >= 1")
        elif self.batch_size % self.micro_batch_size:
            p.append(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})")
        if not 0 < self.lr < math.inf:
            p.append(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.weight_decay < math.inf:
            p.append(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            p.append(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.eval_max_length < 2:
            p.append(f"eval_max_length must be >= 2 tokens, got {self.eval_max_length}")
        if self.eval_max_bytes < 1:
            p.append(f"eval_max_bytes must be >= 1, got {self.eval_max_bytes}")
        if not 0 <= self.warmup_steps <= self.steps:
            p.append(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            p.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("eval_every", "checkpoint_every", "grad_clip"):
            if not 0 <= getattr(self, name) < math.inf:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            p.append("keep_checkpoints must be >= 1")
        if self.log_every < 1:
            p.append("log_every must be >= 1")
        if self.threads is not None and self.threads < 1:
            p.append("threads must be >= 1")
        if self.device == "cpu" and self.precision == "bf16":
            p.append("precision=bf16 is for GPUs; use fp32 (or auto) with device=cpu")
        return p


@dataclass(frozen=True)
class DistributedConfig:
    strategy: Literal["ddp", "fsdp"] = field(default="ddp", metadata=_h(
        "under torchrun: ddp (replicated student) or fsdp (sharded student, for students that do not fit one device)"))
    backend: Literal["auto", "gloo", "nccl"] = field(default="auto", metadata=_h("auto: nccl on GPU, gloo on CPU"))


@dataclass(frozen=True)
class DistillConfig:
    """A whole distillation run."""

    output_dir: str = field(metadata=_h("run folder: checkpoints, metrics.jsonl, plot, final/ model"))
    student: StudentConfig = field(metadata=_h("the model being trained"))
    data: DataConfig = field(metadata=_h("training and held-out text"))
    teachers: tuple[TeacherConfig, ...] = field(default=(), metadata=_h("one or more frozen teachers"))
    weighting: WeightingConfig = field(default_factory=WeightingConfig, metadata=_h("multi-teacher weights"))
    loss: LossConfig = field(default_factory=LossConfig, metadata=_h("objective"))
    cache: CacheConfig = field(default_factory=CacheConfig, metadata=_h("teacher top-k logit cache"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=_h("optimization"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata=_h("torchrun settings"))

    def validate(self) -> list[str]:
        p = []
        if self.loss.name != "ce" and not self.teachers:
            p.append(f"loss.name={self.loss.name!r} needs at least one entry in `teachers`")
        if self.teachers and self.weighting.mode == "fixed" and sum(t.weight for t in self.teachers) <= 0:
            p.append("teacher weights sum to 0 (weighting.mode=fixed)")
        if self.cache.enabled and self.loss.name == "ce":
            p.append("cache.enabled needs a teacher loss (loss.name is 'ce')")
        if self.cache.enabled and self.loss.name == "pkl" and self.cache.top_k < 2:
            p.append("cache.top_k must be >= 2 for pkl")
        return p
