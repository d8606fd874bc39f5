"""``surgery distill``: the training loop configured for distillation (run folder, student, teachers, final model).

Run folder (``output_dir``)::

    config.yaml              the resolved config (resume refuses a different one)
    metrics.jsonl            one JSON line per logged step and per evaluation
    metrics.png              loss and held-out bits/byte
    checkpoints/step-NNNNNN  trainable weights, optimizer, RNG states, data position
    teacher_cache/           top-k teacher logits (cache.enabled, default location)
    final/                   HF safetensors checkpoint (LoRA merged, or the adapter alone)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill import distributed as dd
from distill.config import DistillConfig
from distill.data import BlockOrder, blocks_fingerprint, load_documents, make_blocks
from distill.trainer.checkpoint import checkpoint_dirs, load_state, save_state
from distill.trainer.distill_task import DistillTask, load_teachers, teacher_sides
from distill.trainer.loop import LoopSpec, autocast_factory, fit, use_bf16
from distill.trainer.metrics import append_jsonl, heldout_bpb, plot_metrics, truncate_metrics
from distill.trainer.policy import LoraSpec, ParamSpec, Policy
from distill.trainer.state import seed_all
from surgery.checkpoint import check_not_an_input
from surgery.config import diff as config_diff
from surgery.config import from_dict, to_yaml
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

# Keys that may change between a run and its --resume (they do not change the trajectory).
RESUMABLE_KEYS = ("train.steps", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.log_every", "train.progress", "train.eval_max_bytes", "train.eval_max_length")


@dataclass
class RunResult:
    """Summary of a finished run."""

    output_dir: Path
    final_dir: Path | None
    steps: int
    resumed_from: int | None
    heldout_bpb_start: float | None
    heldout_bpb_end: float | None
    last_metrics: dict = field(default_factory=dict)
    seconds: float = 0.0


def _prepare_run_dir(cfg: DistillConfig, resume: bool, overwrite: bool) -> tuple[Path, Path | None, Path | None]:
    """Check the run folder before any expensive work.

    Returns:
        ``(out, checkpoint to resume from or None, replaced old folder to delete at the end or None)``.
    """
    out = Path(cfg.output_dir).expanduser().resolve()
    check_not_an_input(cfg.output_dir, run_inputs(cfg), "set output_dir to a new path; inputs are never replaced")
    if resume:
        ckpts = checkpoint_dirs(out)
        if not ckpts:
            raise SurgeryError(f"--resume: no checkpoint under {str(out / 'checkpoints')!r}",
                               "set train.checkpoint_every > 0 for runs you want to resume, or drop --resume")
        saved = out / "config.yaml"
        if saved.exists():
            import yaml

            old = from_dict(DistillConfig, yaml.safe_load(saved.read_text()) or {})
            changed = {k: v for k, v in config_diff(old, cfg).items() if k not in RESUMABLE_KEYS}
            if changed:
                desc = ", ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in list(changed.items())[:6])
                raise SurgeryError(f"--resume with a different config ({desc})",
                                   f"resume with the run's own config ({saved}); only {', '.join(RESUMABLE_KEYS)} may change")
        return out, ckpts[-1], None
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SurgeryError(f"output {str(out)!r} already exists",
                               "pass --overwrite to replace it, --resume to continue it, or choose another output_dir")
        return out, None, out  # moved aside by rank 0, deleted when the new run succeeds
    return out, None, None


def run_inputs(cfg: DistillConfig) -> list[str | None]:
    """What a run reads that its ``output_dir`` must not overlap: the student's and every teacher's model and
    tokenizer, saved alignments, the train and held-out data."""
    teachers = [p for t in cfg.teachers for p in (t.model, t.tokenizer, t.alignment)]
    return [cfg.student.model, cfg.student.tokenizer, *teachers, cfg.data.train, cfg.data.heldout]


def heldout_text(cfg: DistillConfig) -> str | None:
    d = cfg.data
    if not d.heldout:
        return None
    docs = load_documents(d.heldout, d.format, d.text_field, d.dataset_config, d.heldout_split)
    text = "\n\n".join(docs)
    data = text.encode("utf-8")[: cfg.train.eval_max_bytes]
    return data.decode("utf-8", "ignore")


def param_spec(cfg: DistillConfig) -> ParamSpec:
    """The parameter policy of a distillation: LoRA adapters (``student.lora.enabled``) or every parameter."""
    lo, tr = cfg.student.lora, cfg.train
    lora = LoraSpec(r=lo.r, alpha=lo.alpha, dropout=lo.dropout, target_modules=tuple(lo.target_modules), seed=tr.seed)
    return ParamSpec(dense="lora" if lo.enabled else "all", lr=tr.lr, betas=tuple(tr.betas),
                     weight_decay=tr.weight_decay, lora=lora)


def load_student(cfg: DistillConfig, device, tokenizer=None) -> Policy:
    """The student with its policy applied (adapters added, trainable parameters selected); ``tokenizer``, when
    given, must fit its embedding."""
    from surgery.loading import load_model

    s = cfg.student
    model = load_model(s.model, dtype=torch.float32, device=device, trust_remote_code=s.trust_remote_code,
                       tokenizer=tokenizer)
    policy = Policy(model, param_spec(cfg))
    policy.model.train()
    return policy


def save_final(model, tok, final: Path, cfg: DistillConfig, env, summary: dict) -> Path | None:
    """HF safetensors checkpoint (LoRA merged), or the peft adapter alone (lora.merge=false)."""
    from surgery.checkpoint import atomic_output_dir, save_checkpoint

    m = dd.unwrap(model)
    if cfg.distributed.strategy == "fsdp" and env.distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(m, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not env.is_main:
            return None
        from surgery.loading import load_model

        m = load_model(cfg.student.model, dtype=torch.float32, device="cpu")
        if cfg.student.lora.enabled:  # pragma: no cover - FSDP + LoRA: rebuild the peft wrapper
            m = load_student(cfg, "cpu").model
        m.load_state_dict(full, strict=False)
    if not env.is_main:
        return None
    extra = {"distill_summary.json": json.dumps(summary, indent=2, sort_keys=True) + "\n",
             "distill_config.yaml": to_yaml(cfg)}
    if cfg.student.lora.enabled and not cfg.student.lora.merge:
        with atomic_output_dir(final, overwrite=True) as tmp:
            m.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for name, content in extra.items():
                (tmp / name).write_text(content)
        return final
    if cfg.student.lora.enabled:
        m = m.merge_and_unload()
    return save_checkpoint(m, tok, final, overwrite=True, extra_files=extra)


def train(cfg: DistillConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run a distillation described by ``cfg`` (see module docstring).

    Args:
        cfg: the validated config.
        resume: continue from the latest checkpoint in ``cfg.output_dir``.
        overwrite: replace an existing ``output_dir`` (the old one is deleted only when this run succeeds).

    Raises:
        SurgeryError: bad inputs (checked before models are loaded where possible); a non-finite loss
            (:class:`~distill.trainer.state.NonFiniteError`, the last checkpoint is kept).
    """
    t_start = time.time()
    env = dd.setup(cfg.train.device, cfg.distributed.backend)
    try:
        return _run(cfg, env, resume, overwrite, t_start)
    finally:
        dd.cleanup()


def _inputs(cfg: DistillConfig, env):
    """Blocks, their order and the held-out text (data problems surface before models load)."""
    tr = cfg.train
    per_step = tr.micro_batch_size * env.world_size
    if tr.batch_size % per_step:
        raise SurgeryError(f"train.batch_size={tr.batch_size} is not a multiple of micro_batch_size × processes "
                           f"= {tr.micro_batch_size} × {env.world_size}", "adjust train.batch_size or micro_batch_size")
    d = cfg.data
    docs = load_documents(d.train, d.format, d.text_field, d.dataset_config, d.split, d.max_documents)
    blocks = make_blocks(docs, d.block_chars, d.pack)
    if d.max_blocks:
        blocks = blocks[: d.max_blocks]
    return blocks, BlockOrder(len(blocks), tr.seed, d.shuffle), heldout_text(cfg)


def _claim_dir(cfg, out: Path, replaced: Path | None, env) -> Path | None:
    trash = None
    if env.is_main:
        if replaced is not None:
            trash = replaced.parent / f".{replaced.name}.replaced-{os.getpid()}"
            os.replace(replaced, trash)
            LOG.info("moved the existing %s aside; it is deleted when this run succeeds", replaced)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    dd.barrier(env)
    return trash


def _set_runtime(tr) -> None:
    """Threads, deterministic kernels and seeds of ``train`` (before any model is loaded)."""
    if tr.threads:
        torch.set_num_threads(tr.threads)
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_all(tr.seed)


def _resume(ckpt: Path, model, policy, env, metrics_path: Path) -> tuple[int, int]:
    """Load checkpoint ``ckpt`` and drop the metric lines written after it; returns ``(step, position)``."""
    st = load_state(ckpt, model, policy, env)
    step, position = int(st["step"]), int(st["position"])
    if env.is_main:
        truncate_metrics(metrics_path, step)
    LOG.info("resumed from %s (step %d, position %d)", ckpt, step, position)
    return step, position


def _unclaim_dir(out: Path, trash: Path | None) -> None:
    """Undo :func:`_claim_dir` for a fresh run whose models failed to load: its folder goes, and the folder it
    replaced (``--overwrite``) comes back."""
    shutil.rmtree(out, ignore_errors=True)
    if trash is not None and trash.exists():
        os.replace(trash, out)
        LOG.info("the run's models did not load: %s is back as it was", out)


def _run(cfg: DistillConfig, env, resume: bool, overwrite: bool, t_start: float) -> RunResult:
    out, ckpt, replaced = _prepare_run_dir(cfg, resume, overwrite)
    dd.barrier(env)  # every rank has looked at the folder before rank 0 changes it
    blocks, order, heldout = _inputs(cfg, env)
    from surgery.loading import check_checkpoint, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    s_tok = load_tokenizer(cfg.student.tokenizer or cfg.student.model, trust_remote_code=cfg.student.trust_remote_code)
    check_checkpoint(cfg.student.model, s_tok, cfg.student.trust_remote_code)
    s_vocab = canonical_vocabulary(s_tok, cfg.student.tokenizer or cfg.student.model)
    sides = [] if cfg.loss.name == "ce" else teacher_sides(cfg, s_vocab)  # bad alignments or checkpoints: no write
    trash = _claim_dir(cfg, out, replaced, env)
    tr = cfg.train
    _set_runtime(tr)
    device = env.device
    autocast = autocast_factory(device, use_bf16(tr.precision, device))
    try:  # a model that fails to load (NaN, truncated, out of memory) leaves no run folder behind
        policy = load_student(cfg, device, s_tok)
        teachers = [] if cfg.loss.name == "ce" else load_teachers(cfg, s_vocab, sides, device, blocks,
                                                                   blocks_fingerprint(blocks), out, env)
    except BaseException:
        if env.is_main and ckpt is None:
            _unclaim_dir(out, trash)
        raise
    model = dd.wrap(policy.model, env, cfg.distributed.strategy)
    policy.attach(model)
    metrics_path = out / "metrics.jsonl"
    step, position = _resume(ckpt, model, policy, env, metrics_path) if ckpt is not None else (0, 0)
    resumed_from = step if ckpt is not None else None
    dd.barrier(env)
    task = DistillTask(cfg, s_tok, s_vocab, teachers, blocks, order, env, position)

    def evaluate(at: int) -> float:
        bpb = heldout_bpb(model, s_tok, heldout, tr.eval_max_length)
        if env.is_main:
            append_jsonl(metrics_path, {"event": "eval", "step": at, "heldout_bpb": bpb})
        return bpb

    last: dict = {}

    def log(rec: dict) -> None:
        last.clear()
        last.update(rec)
        if env.is_main and (rec["step"] % tr.log_every == 0 or rec["step"] == tr.steps):
            append_jsonl(metrics_path, rec)

    def checkpoint(at: int, elapsed: float) -> None:
        save_state(out, at, model, policy, env, cfg.distributed.strategy, {"position": task.position},
                   tr.keep_checkpoints, to_yaml(cfg))

    bpb_start = evaluate(0) if heldout and step == 0 and tr.eval_at_start else None
    spec = LoopSpec(steps=tr.steps, warmup=tr.warmup_steps, scheduler=tr.scheduler, min_lr_ratio=tr.min_lr_ratio,
                    grad_clip=tr.grad_clip, accum=task.accum, eval_every=tr.eval_every if heldout else 0,
                    checkpoint_every=tr.checkpoint_every, strategy=cfg.distributed.strategy, progress=tr.progress,
                    desc=f"distill {cfg.loss.name}", nonfinite_hint="lower train.lr (or check the inputs for NaN)")
    step, _ = fit(model, task, policy, spec, env, step, log=log, evaluate=evaluate, checkpoint=checkpoint,
                  autocast=autocast)
    bpb_end = evaluate(step) if heldout else None
    summary = {"loss": cfg.loss.name, "steps": step, "heldout_bpb_start": bpb_start, "heldout_bpb_end": bpb_end,
               "resumed_from": resumed_from, "world_size": env.world_size, "blocks": len(blocks),
               "teachers": [t.name for t in teachers], "seconds": round(time.time() - t_start, 1)}
    final = save_final(model, s_tok, out / "final", cfg, env, summary)
    if env.is_main:
        plot_metrics(metrics_path, out / "metrics.png", f"{cfg.student.model} ← {cfg.loss.name}")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    dd.barrier(env)
    return RunResult(out, final, step, resumed_from, bpb_start, bpb_end, last, time.time() - t_start)
