"""Healing as a configuration of the training loop: random token blocks of the training text
(:class:`BlocksTask`, shared with the teacher heal of :mod:`distill.teaching`), next-token loss, and a
parameter policy (new rows row-sparse, their head rows, + LoRA, or every parameter).

Resumable: every ``checkpoint_every`` steps the trained tensors, optimizer states, RNG states, data
generator and elapsed time go to ``state_dir`` (:mod:`distill.trainer.checkpoint`); ``resume=True``
continues from the newest. The caller writes the healed model (``surgery heal``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from distill.distributed import DistEnv
from distill.trainer.checkpoint import checkpoint_dirs, load_state, read_state, save_state
from distill.trainer.loop import LoopSpec, autocast_factory, fit, use_bf16
from distill.trainer.metrics import heldout_bpb
from distill.trainer.policy import LoraSpec, ParamSpec, Policy
from distill.trainer.rows import row_mask
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)


class StopBeforeStep(SurgeryError):
    """A task cannot begin step ``step`` (``step`` steps are done, nothing of the next one ran or was drawn):
    :func:`heal` saves its state at ``step`` and stops with this message, telling how to resume."""

    def __init__(self, message: str, hint: str | None, step: int):
        super().__init__(message, hint)
        self.step = step


class BlocksTask:
    """The loop's view of a heal: random token blocks of the training text, the student's next-token CE.

    Blocks are ``seq_len − 1`` consecutive student tokens of one document, each cut as the text those tokens
    span (:func:`distill.data.token_blocks`) and encoded on its own behind a document-start token
    (:func:`distill.data.encode_blocks`: ``seq_len`` tokens, the last block of a document shorter and padded), so
    every language is drawn in proportion to its tokens and every sequence starts where the evaluation's do. The
    loss is :func:`distill.trainer.distill_task.micro_loss` with no teacher: the mean CE of the non-padding next
    tokens over the tokenizer's vocabulary (padding rows of the embedding matrix are outside the softmax,
    :func:`distill.trainer.distill_task.fit_vocab`). :class:`distill.teaching.TeacherTask` adds a teacher on the
    same blocks.

    Args:
        texts: training texts, one document each.
        tokenizer / s_vocab: the student's tokenizer and canonical vocabulary.
        seq_len: student tokens per block (with the start token).
        batch_size: blocks per step.
        seed: seeds :attr:`gen`, the block order (saved and restored on resume).
        device: where batches go.

    Raises:
        SurgeryError: the texts hold fewer than ``seq_len`` tokens.
    """

    def __init__(self, texts, tokenizer, s_vocab, seq_len: int, batch_size: int, seed: int, device):
        from distill.data import token_blocks_counted

        self.blocks, self.n_tokens = token_blocks_counted(list(texts), tokenizer, seq_len - 1)
        if self.n_tokens < seq_len or not self.blocks:
            raise SurgeryError(f"training text has only {self.n_tokens} tokens, fewer than seq_len={seq_len}",
                               "pass more text or a smaller --seq-len")
        self.tokenizer, self.s_vocab = tokenizer, s_vocab
        self.cfg = SimpleNamespace(data=SimpleNamespace(max_tokens=seq_len), loss=SimpleNamespace(name="ce"),
                                   weighting=SimpleNamespace(mode="fixed", alpha=1.0, score="ce"))
        self.batch_size, self.device = batch_size, device
        self.seed = seed
        self.gen = torch.Generator().manual_seed(seed)
        self.tokens = 0

    def draw(self, gen: torch.Generator) -> list[int]:
        """The block ids of one step: ``batch_size`` uniform draws (with replacement) from ``gen``."""
        return torch.randint(0, len(self.blocks), (self.batch_size,), generator=gen).tolist()

    def micro_batches(self, step: int) -> list:
        """One micro-batch: ``(texts, block ids)`` of ``batch_size`` blocks drawn with :attr:`gen`."""
        idx = self.draw(self.gen)
        return [([self.blocks[i] for i in idx], idx)]

    def token_ids(self, batch) -> torch.Tensor:
        """``(B, seq_len)`` at most: the student's ids of a batch (row-sparse parameter policies make those rows
        leaves)."""
        from distill.data import encode_blocks

        return encode_blocks(batch[0], self.tokenizer, self.s_vocab, self.cfg.data.max_tokens).input_ids.to(self.device)

    def teachers(self) -> list:
        """The teachers of the current step (none: plain CE)."""
        return []

    def teacher_rows(self):
        """The rows of the current step's batch the teachers read (None: all)."""
        return None

    def loss(self, model, batch, autocast):
        from distill.trainer.distill_task import micro_loss

        texts, ids = batch
        total, metrics = micro_loss(self.cfg, model, self.tokenizer, self.s_vocab, self.teachers(), texts, ids,
                                    self.device, autocast, teacher_rows=self.teacher_rows())
        self.tokens = len(texts) * self.cfg.data.max_tokens
        return total, metrics

    def step_metrics(self) -> dict:
        return {"tokens": self.tokens}


def param_spec(cfg, n_rows: int, frozen_rows: np.ndarray | None) -> ParamSpec:
    """The parameter policy of a heal config (``params``: new-rows | head | lora | all)."""
    if cfg.params == "all":
        return ParamSpec(dense="all", lr=cfg.all_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    mask = row_mask(n_rows, frozen_rows if cfg.train_rows == "new" else None)
    lora = LoraSpec(r=cfg.lora_rank, alpha=2 * cfg.lora_rank, seed=cfg.seed)
    return ParamSpec(dense="lora" if cfg.params == "lora" else "none", rows=mask, input_rows=cfg.params != "head",
                     negatives=cfg.negatives, row_lr=cfg.lr, lr=cfg.lora_lr, betas=(0.9, 0.98),
                     weight_decay=cfg.weight_decay, lora=lora)


# what a resumed heal may change: its budget, how often it checkpoints and evaluates, where it runs, and its teacher
# (a teacher that failed to load can be replaced, or dropped); the rest defines the saved state and the data order
HEAL_RESUMABLE = ("steps", "minutes", "checkpoint_every", "eval_every", "device", "teacher", "teacher_dtype")


def _resume(state_dir: Path | None, model, policy, env, task, cfg) -> tuple[int, float, list]:
    ckpts = checkpoint_dirs(state_dir) if state_dir else []
    if not ckpts:
        raise SurgeryError(f"nothing to resume: no heal state under {str(state_dir)!r}", "run without --resume first")
    st = read_state(ckpts[-1])
    saved, now = st["config"], cfg.to_dict()
    changed = {k: (saved.get(k), v) for k, v in now.items() if k not in HEAL_RESUMABLE and saved.get(k) != v}
    if changed:
        desc = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in list(changed.items())[:6])
        raise SurgeryError(f"--resume with a different heal config ({desc})",
                           f"resume with the settings the heal started with (only {', '.join(HEAL_RESUMABLE)} may "
                           "change), or start afresh without --resume")
    load_state(ckpts[-1], model, policy, env, st)
    task.gen.set_state(st["data_rng"])
    if hasattr(task, "replay"):  # a task that remembers which blocks it drew (TeacherTask) rebuilds that
        task.replay(int(st["step"]))
    LOG.info("resumed at step %d (%.0f s trained)", st["step"], st["elapsed"])
    return int(st["step"]), float(st["elapsed"]), list(st["metrics"])


def heal(model, tokenizer, texts: list[str], config, state_dir: str | Path | None = None,
         copied_rows: np.ndarray | None = None, resume: bool = False, eval_text: str | None = None,
         progress: bool = True, task=None) -> tuple[object, dict, list[dict]]:
    """Train ``model`` on ``texts`` with the parameter policy of ``config`` (in place for row-sparse policies).

    Args:
        model: a transplanted causal LM.
        tokenizer: its tokenizer.
        texts: training texts, one document each (cut into token blocks, drawn at random: :class:`BlocksTask`).
        config: a :class:`surgery.transplant.config.HealConfig` (``steps`` or ``minutes``).
        state_dir: where resumable checkpoints go (``None``: no checkpoints).
        copied_rows: ``(n,)`` ids of rows to keep frozen (with ``train_rows='new'``).
        resume: continue from the newest checkpoint in ``state_dir``.
        eval_text: optional text scored in bits/byte before and after.
        task: the loop's task (default: :class:`BlocksTask` of ``texts``, next-token CE), e.g. a
            :class:`distill.teaching.TeacherTask` on the same blocks. It needs a ``gen`` generator (saved for
            resume), ``n_tokens`` (the training tokens, for the summary) and, if its batches are not token tensors,
            ``token_ids(batch)``; a ``replay(step)`` method is called after a resume.

    Returns:
        ``(model, summary, metrics)``; with LoRA the adapters are merged into the returned model.

    Raises:
        SurgeryError: no list of copied rows where one is needed, too little text, nothing to resume,
            a non-finite loss (the last checkpoint is kept), a task that cannot begin a step
            (:class:`StopBeforeStep`: the state at that step is saved).
    """
    from surgery.evaluate import bits_per_byte

    cfg = config
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.params != "all" and cfg.train_rows == "new" and copied_rows is None:
        raise SurgeryError("no list of copied rows: cannot tell which rows are new",
                           "heal a folder written by `surgery transplant` (it holds transplant_rows.json), or train "
                           "all rows with --train-rows all")
    if task is None:
        from surgery.vocab.surfaces import canonical_vocabulary

        task = BlocksTask(texts, tokenizer, canonical_vocabulary(tokenizer), cfg.seq_len, cfg.batch_size, cfg.seed,
                          device)
    bpb_before = bits_per_byte(model, tokenizer, eval_text, progress=False).bits_per_byte if eval_text else None
    model.to(device)
    policy = Policy(model, param_spec(cfg, model.get_input_embeddings().weight.shape[0], copied_rows))
    policy.attach(policy.model)
    env = DistEnv(device=device)
    step, elapsed, metrics = 0, 0.0, []
    sdir = Path(state_dir) if state_dir else None
    if resume:
        step, elapsed, metrics = _resume(sdir, policy.model, policy, env, task, cfg)
    policy.model.train()
    bf16 = use_bf16(cfg.autocast, device)
    autocast = autocast_factory(device, bf16)

    def checkpoint(at: int, secs: float) -> None:
        save_state(sdir, at, policy.model, policy, env, "ddp", {"data_rng": task.gen.get_state(), "elapsed": secs,
                   "metrics": metrics, "config": cfg.to_dict()}, keep=1)

    def evaluate(at: int) -> None:
        metrics.append({"event": "eval", "step": at, "heldout_bpb": heldout_bpb(policy.model, tokenizer, eval_text)})

    spec = LoopSpec(steps=cfg.steps, seconds=cfg.minutes * 60 if cfg.minutes else None, warmup=cfg.warmup,
                    scheduler="cosine", min_lr_ratio=0.1, grad_clip=cfg.grad_clip,
                    eval_every=cfg.eval_every if eval_text else 0,
                    checkpoint_every=cfg.checkpoint_every if sdir else 0, progress=progress, desc="heal",
                    nonfinite_hint="lower --lr (or check the model and texts for NaN)")
    t0 = time.time() - elapsed
    try:
        step, secs = fit(policy.model, task, policy, spec, env, step, elapsed, log=metrics.append,
                         evaluate=evaluate, checkpoint=checkpoint, autocast=autocast)
    except StopBeforeStep as e:
        if sdir is None:
            raise
        if e.step == 0:  # no step done: nothing to resume, nothing saved
            raise SurgeryError(e.message, e.hint) from e
        checkpoint(e.step, time.time() - t0)
        raise SurgeryError(f"{e.message}; the heal stopped after {e.step} steps and saved its state in {sdir}",
                           f"{e.hint}; continue it with the same command plus --resume") from e
    finally:
        model = policy.finish(policy.model, merge=True)
    model.eval()
    model.to("cpu")
    summary = _summary(cfg, step, time.time() - t0, task.n_tokens, metrics, policy, device, bf16, bpb_before)
    if eval_text:
        summary["bits_per_byte_after"] = bits_per_byte(model, tokenizer, eval_text, progress=False).bits_per_byte
    return model, summary, metrics


def _summary(cfg, step: int, seconds: float, n_tokens: int, metrics: list[dict], policy, device, bf16: bool,
             bpb_before: float | None) -> dict:
    train = [m for m in metrics if m.get("event") == "train"]
    return {"steps": step, "seconds": round(seconds, 1), "tokens_seen": int(step * cfg.seq_len * cfg.batch_size),
            "train_tokens_available": int(n_tokens),
            "step_s_median": round(float(np.median([m["step_s"] for m in train])), 3) if train else None,
            "loss_first": round(train[0]["loss"], 5) if train else None,
            "loss_last10": round(float(np.mean([m["loss"] for m in train[-10:]])), 5) if train else None,
            # the student's next-token CE alone (a teacher's balanced term makes ``loss`` a different scale)
            "ce_first": round(train[0]["ce"], 5) if train and "ce" in train[0] else None,
            "ce_last10": round(float(np.mean([m["ce"] for m in train[-10:]])), 5)
            if train and all("ce" in m for m in train[-10:]) else None,
            "rows_trained": policy.rows.rows_trained if policy.rows is not None else 0,
            "teacher_steps": sum(1 for m in train if m.get("teacher_weight", 0) > 0)
            if any("teacher_weight" in m for m in train) else None,
            "teacher_memo_hits": train[-1].get("teacher_memo_hits") if train else None,
            # the blocks the teacher taught, over all steps (of steps × batch_size)
            "teacher_blocks": sum(m.get("teacher_blocks", 0) for m in train)
            if any("teacher_blocks" in m for m in train) else None,
            "params": cfg.params, "device": str(device), "bf16_autocast": bf16, "config": cfg.to_dict(),
            "bits_per_byte_before": bpb_before}
