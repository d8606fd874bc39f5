"""The distillation loop: student + frozen teachers, chunked cross-vocabulary losses, exact resume.

Run folder (``output_dir``)::

    config.yaml              the resolved config (resume refuses a different one)
    metrics.jsonl            one JSON line per logged step and per evaluation
    metrics.png              loss and held-out bits/byte
    checkpoints/step-NNNNNN  trainable weights, optimizer, scheduler, RNG states, data position
    teacher_cache/           top-k teacher logits (cache.enabled, default location)
    final/                   HF safetensors checkpoint (LoRA merged, or the adapter alone)

One optimizer step consumes ``train.batch_size`` blocks (all ranks together) in
micro-batches of ``train.micro_batch_size`` per rank; the blocks are taken at
global positions ``position .. position + batch_size`` of a seeded order
(:class:`distill.data.BlockOrder`), so the position alone tells where to resume.
A checkpoint is written atomically (temporary folder renamed), so a process
killed at any moment leaves either the previous or the new checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill import distributed as dd
from distill.chunks import align_chunks, exact_chunks, position_chunks
from distill.config import DistillConfig
from distill.data import BlockOrder, EncodedBatch, blocks_fingerprint, encode_blocks, load_documents, make_blocks
from distill.losses import ChunkedBatch, LossParams, build_context, combine, make_loss
from distill.teacher_dist import TeacherDist
from distill.teachers import Teacher, TopKCache, build_cache, position_stats, teacher_score, teacher_weights
from surgery.config import diff as config_diff
from surgery.config import from_dict, to_dict, to_yaml
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


# -- run folder --------------------------------------------------------------------------------------

def checkpoint_dirs(out: Path) -> list[Path]:
    d = out / "checkpoints"
    return sorted(p for p in d.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").exists()) if d.exists() else []


def _prepare_run_dir(cfg: DistillConfig, resume: bool, overwrite: bool) -> tuple[Path, Path | None, Path | None]:
    """Check the run folder before any expensive work.

    Returns:
        ``(out, checkpoint to resume from or None, replaced old folder to delete at the end or None)``.
    """
    out = Path(cfg.output_dir).expanduser().resolve()
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


def _lr_lambda(cfg):
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.scheduler == "constant":
            return 1.0
        span = max(t.steps - t.warmup_steps, 1)
        frac = min(max(step - t.warmup_steps, 0) / span, 1.0)
        if t.scheduler == "linear":
            return 1.0 - (1.0 - t.min_lr_ratio) * frac
        return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- models ------------------------------------------------------------------------------------------

def _load_student(cfg: DistillConfig, device):
    from surgery.loading import load_model, load_tokenizer

    s = cfg.student
    tok = load_tokenizer(s.tokenizer or s.model, trust_remote_code=s.trust_remote_code)
    model = load_model(s.model, dtype=torch.float32, device=device, trust_remote_code=s.trust_remote_code)
    if s.lora.enabled:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.train.seed)  # adapter init
        present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [m for m in s.lora.target_modules if m not in present]
        if missing:
            raise SurgeryError(f"student.lora.target_modules {missing} are not modules of {s.model!r}",
                               f"choose among e.g. {', '.join(sorted(x for x in present if 'proj' in x)[:8])}")
        model = get_peft_model(model, LoraConfig(r=s.lora.r, lora_alpha=s.lora.alpha, lora_dropout=s.lora.dropout,
                                                 target_modules=list(s.lora.target_modules), task_type="CAUSAL_LM"))
    model.train()
    return model, tok


def _load_teachers(cfg: DistillConfig, s_vocab, device, blocks, blocks_hash, out: Path, env) -> list[Teacher]:
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    params = LossParams(temperature=cfg.loss.temperature, direction=cfg.loss.direction, top_k=cfg.loss.top_k,
                        uld_topk=cfg.loss.uld_topk, uld_weight=cfg.loss.uld_weight, hkl_threshold=cfg.loss.hkl_threshold,
                        rest_column=cfg.loss.rest_column, mass_weight=cfg.loss.mass_weight,
                        exact_chunks_only=cfg.loss.exact_chunks_only, expressible_rest=cfg.loss.expressible_rest,
                        project=cfg.loss.project)
    teachers = []
    for i, tc in enumerate(cfg.teachers):
        tok = load_tokenizer(tc.tokenizer or tc.model, trust_remote_code=tc.trust_remote_code)
        vocab = canonical_vocabulary(tok, tc.tokenizer or tc.model)
        projection = None
        if tc.alignment:
            from surgery.vocab.store import load_alignment

            projection = load_alignment(tc.alignment, s_vocab, vocab)
        ctx = build_context(cfg.loss.name, s_vocab, vocab, device, projection=projection,
                            hkl_threshold=cfg.loss.hkl_threshold, project=cfg.loss.project)
        loss = make_loss(cfg.loss.name, params, ctx)
        cache = None
        model = None
        if cfg.cache.enabled:
            cdir = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else out / "teacher_cache"
            cdir = cdir / f"teacher{i}"
            key = TopKCache.key(tc.model, vocab.hash, blocks_hash, len(blocks), cfg.data.max_tokens, cfg.cache.top_k,
                                tc.dtype)
            cache = TopKCache.open_matching(cdir, key)
            if cache is None:
                model = _load_teacher_model(tc, device)
                cache = build_cache(cdir, key, model, tok, vocab, blocks, cfg.data.max_tokens, cfg.cache.top_k,
                                    cfg.cache.batch_size, device, env.rank, env.world_size, lambda: dd.barrier(env),
                                    progress=cfg.train.progress)
            model = None  # the cache serves every block from now on
        else:
            model = _load_teacher_model(tc, device)
        teachers.append(Teacher(i, tc.model, tok, vocab, loss, tc.weight, model, cache))
        LOG.info("teacher %d: %s (%d tokens, %s)%s", i, tc.model, len(vocab), vocab.family,
                 " from cache" if cache is not None else "")
    return teachers


def _load_teacher_model(tc, device):
    from surgery.loading import load_model

    model = load_model(tc.model, dtype=tc.dtype, device=device, trust_remote_code=tc.trust_remote_code)
    model.eval()
    model.requires_grad_(False)
    return model


def _fit_vocab(logits: torch.Tensor, V: int) -> torch.Tensor:
    """Logits ``(..., V_model)`` → ``(..., V)``: drop padding columns, or pad missing ids with −inf."""
    if logits.shape[-1] == V:
        return logits
    if logits.shape[-1] > V:
        return logits[..., :V]
    pad = torch.full((*logits.shape[:-1], V - logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits, pad], dim=-1)


# -- one micro-batch -----------------------------------------------------------------------------------

def _keep_positions(pos_chunks: np.ndarray, mode: str) -> np.ndarray:
    """Flattened ``(B·L,)`` chunk id per position; with ``first`` only each chunk's first position keeps it.

    A chunk's first position on either side sees exactly the bytes before the chunk and predicts
    what starts there; later positions of a multi-token chunk sit at different byte offsets on the
    two sides, so ``first`` compares like with like and ``mean`` averages them (X-Token).
    """
    if mode == "first":
        prev = np.full_like(pos_chunks, -1)
        prev[:, 1:] = pos_chunks[:, :-1]
        pos_chunks = np.where(pos_chunks != prev, pos_chunks, -1)
    return pos_chunks.reshape(-1)


def teacher_is_coarser(s_enc: EncodedBatch, t_enc: EncodedBatch) -> bool:
    """Did the teacher spell the batch's text in fewer tokens *per byte* than the student?

    Per byte, not per block: both sides are truncated to ``max_tokens``, so two encodings that both
    hit the limit have equal token counts although they cover different amounts of text.
    """
    s_tokens, t_tokens = int(s_enc.valid.sum()), int(t_enc.valid.sum())
    s_bytes, t_bytes = int(s_enc.ends.max(1).sum()), int(t_enc.ends.max(1).sum())
    return t_tokens * s_bytes < s_tokens * t_bytes


def _micro_loss(cfg, model, s_tok, s_vocab, teachers: list[Teacher], texts, block_ids, device, autocast):
    """Loss of one micro-batch; returns ``(total, metrics dict)``."""
    s_enc = encode_blocks(texts, s_tok, s_vocab, cfg.data.max_tokens).to(device)
    with autocast():
        logits = model(input_ids=s_enc.input_ids, attention_mask=s_enc.attention_mask).logits
    logits = _fit_vocab(logits.float(), len(s_vocab))
    B, Ls, Vs = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, Vs), s_enc.labels.reshape(-1), ignore_index=-100)
    metrics = {"ce": float(ce.detach())}
    if cfg.loss.name == "ce" or not teachers:
        return ce, metrics  # the plain cross-entropy baseline
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    kd_terms, scores = [], []
    flat_s = logits.reshape(B * Ls, Vs)
    for t in teachers:
        t_enc = encode_blocks(texts, t.tokenizer, t.vocab, cfg.data.max_tokens).to(device)
        al = align_chunks(s_enc.ends, s_enc.valid, t_enc.ends, t_enc.valid)
        ps = torch.from_numpy(_keep_positions(position_chunks(al.chunk_a), cfg.loss.chunk_positions)).to(device)
        pt = torch.from_numpy(_keep_positions(position_chunks(al.chunk_b), cfg.loss.chunk_positions)).to(device)
        sel_s = torch.nonzero(ps >= 0)[:, 0]
        sel_t = torch.nonzero(pt >= 0)[:, 0]
        Lt = t_enc.input_ids.shape[1]
        targets = t_enc.labels.reshape(-1)
        if t.cache is not None:
            full, stats = t.cache.read(block_ids, t_enc.attention_mask.sum(1).tolist(), Lt, device)
        else:
            with torch.no_grad(), autocast():
                tl = t.model(input_ids=t_enc.input_ids, attention_mask=t_enc.attention_mask).logits
            tl = _fit_vocab(tl, len(t.vocab)).reshape(B * Lt, -1)
            full = TeacherDist(len(t.vocab), logits=tl)
            stats = position_stats(tl, targets) if cfg.weighting.mode == "dynamic" else None
        dist = full.select(sel_t)
        dist.temperature = cfg.loss.temperature
        exact = None
        if cfg.loss.exact_chunks_only:
            exact = torch.from_numpy(exact_chunks(al, s_enc.input_ids.cpu().numpy(), t_enc.input_ids.cpu().numpy(),
                                                  s_vocab.surfaces, t.vocab.surfaces)).to(device)
        coarser = teacher_is_coarser(s_enc, t_enc)
        batch = ChunkedBatch(flat_s[sel_s], ps[sel_s], dist, pt[sel_t], al.n_chunks, exact, coarser)
        kd = t.loss(batch)
        kd_terms.append(kd)
        metrics[f"kd{t.index}"] = float(kd.detach())
        metrics[f"chunks{t.index}"] = al.n_chunks
        if cfg.weighting.mode == "dynamic":
            scores.append(teacher_score(stats, targets >= 0, n_bytes, cfg.weighting.score))
    weights = teacher_weights(cfg.weighting.mode, [t.weight for t in teachers], scores, cfg.weighting.alpha)
    for t, w in zip(teachers, weights):
        metrics[f"w{t.index}"] = round(float(w), 4)
    total = combine(ce, kd_terms, weights, cfg.loss.ce_weight, cfg.loss.kd_weight, cfg.loss.rescale_kd)
    return total, metrics


# -- evaluation, logging, plotting -----------------------------------------------------------------------

def _heldout_text(cfg: DistillConfig) -> str | None:
    d = cfg.data
    if not d.heldout:
        return None
    docs = load_documents(d.heldout, d.format, d.text_field, d.dataset_config, d.heldout_split)
    text = "\n\n".join(docs)
    data = text.encode("utf-8")[: cfg.train.eval_max_bytes]
    return data.decode("utf-8", "ignore")


@torch.no_grad()
def _evaluate(model, tok, text, cfg) -> float:
    from surgery.evaluate import bits_per_byte

    m = dd.unwrap(model)
    was = m.training
    m.eval()
    try:
        r = bits_per_byte(m, tok, text, max_length=cfg.train.eval_max_length, progress=False)
    finally:
        m.train(was)
    return float(r.bits_per_byte)


def _append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """PNG with training loss (left) and held-out bits/byte (right) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
    tr = [r for r in rows if r.get("event") == "train"]
    ev = [r for r in rows if r.get("event") == "eval"]
    if not tr and not ev:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="total")
        axes[0].plot([r["step"] for r in tr], [r["ce"] for r in tr], label="student CE", alpha=0.7)
        axes[0].set_xlabel("step"); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].set_title("training loss")
    if ev:
        axes[1].plot([r["step"] for r in ev], [r["heldout_bpb"] for r in ev], marker="o")
        axes[1].set_xlabel("step"); axes[1].set_ylabel("bits/byte"); axes[1].set_title("held-out bits/byte (student)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# -- checkpoints -----------------------------------------------------------------------------------

def _save_checkpoint(out: Path, step: int, position: int, model, optimizer, scheduler, env, cfg) -> None:
    from safetensors.torch import save_file

    from surgery.checkpoint import atomic_output_dir

    msd, osd = dd.full_state(model, optimizer, env, cfg.distributed.strategy)
    rngs = dd.all_gather_object(env, _rng_state())
    if env.is_main:
        target = out / "checkpoints" / f"step-{step:06d}"
        with atomic_output_dir(target, overwrite=True) as tmp:
            save_file({k: v.contiguous() for k, v in msd.items()}, str(tmp / "trainable.safetensors"),
                      metadata={"format": "pt"})
            torch.save({"step": step, "position": position, "optimizer": osd, "scheduler": scheduler.state_dict(),
                        "rng": rngs, "world_size": env.world_size}, tmp / "trainer_state.pt")
            (tmp / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        for old in checkpoint_dirs(out)[: -cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        LOG.info("checkpoint step %d written", step)
    dd.barrier(env)


def _load_checkpoint(path: Path, model, optimizer, scheduler, env) -> tuple[int, int]:
    from safetensors.torch import load_file

    msd = load_file(str(path / "trainable.safetensors"))
    st = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if st.get("world_size", 1) != env.world_size:
        raise SurgeryError(f"checkpoint {str(path)!r} was written with {st['world_size']} processes, now {env.world_size}",
                           "resume with the same --nproc_per_node")
    dd.load_full_state(model, optimizer, msd, st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    _set_rng_state(st["rng"][env.rank])
    return int(st["step"]), int(st["position"])


def _save_final(model, tok, final: Path, cfg: DistillConfig, env, summary: dict) -> Path | None:
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
            m = _load_student(cfg, "cpu")[0]
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


# -- the loop ---------------------------------------------------------------------------------------

def train(cfg: DistillConfig, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run a distillation described by ``cfg`` (see module docstring).

    Args:
        cfg: the validated config.
        resume: continue from the latest checkpoint in ``cfg.output_dir``.
        overwrite: replace an existing ``output_dir`` (the old one is deleted only when this run succeeds).

    Returns:
        A :class:`RunResult`.

    Raises:
        SurgeryError: bad inputs (checked before models are loaded where possible).
    """
    t_start = time.time()
    env = dd.setup(cfg.train.device, cfg.distributed.backend)
    try:
        return _train(cfg, env, resume, overwrite, t_start)
    finally:
        dd.cleanup()


def _train(cfg: DistillConfig, env, resume: bool, overwrite: bool, t_start: float) -> RunResult:
    tr = cfg.train
    out, ckpt, replaced = _prepare_run_dir(cfg, resume, overwrite)
    dd.barrier(env)  # every rank has looked at the folder before rank 0 changes it
    per_step = tr.micro_batch_size * env.world_size
    if tr.batch_size % per_step:
        raise SurgeryError(f"train.batch_size={tr.batch_size} is not a multiple of micro_batch_size × processes "
                           f"= {tr.micro_batch_size} × {env.world_size}", "adjust train.batch_size or micro_batch_size")
    accum = tr.batch_size // per_step
    # inputs first: data problems must surface before models load
    docs = load_documents(cfg.data.train, cfg.data.format, cfg.data.text_field, cfg.data.dataset_config,
                          cfg.data.split, cfg.data.max_documents)
    blocks = make_blocks(docs, cfg.data.block_chars, cfg.data.pack)
    if cfg.data.max_blocks:
        blocks = blocks[: cfg.data.max_blocks]
    heldout = _heldout_text(cfg)
    order = BlockOrder(len(blocks), tr.seed, cfg.data.shuffle)
    trash = None
    if env.is_main:
        if replaced is not None:
            trash = replaced.parent / f".{replaced.name}.replaced-{os.getpid()}"
            os.replace(replaced, trash)
            LOG.info("moved the existing %s aside; it is deleted when this run succeeds", replaced)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    dd.barrier(env)

    if tr.threads:
        torch.set_num_threads(tr.threads)
    if tr.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    _seed_all(tr.seed)
    device = env.device
    use_bf16 = tr.precision == "bf16" or (tr.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    from surgery.vocab.surfaces import canonical_vocabulary

    model, s_tok = _load_student(cfg, device)
    s_vocab = canonical_vocabulary(s_tok, cfg.student.tokenizer or cfg.student.model)
    teachers = [] if cfg.loss.name == "ce" else _load_teachers(cfg, s_vocab, device, blocks,
                                                                blocks_fingerprint(blocks), out, env)
    model = dd.wrap(model, env, cfg.distributed.strategy)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.lr, betas=tr.betas, weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    step, position, resumed_from = 0, 0, None
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None:
        step, position = _load_checkpoint(ckpt, model, optimizer, scheduler, env)
        resumed_from = step
        if env.is_main:
            _truncate_metrics(metrics_path, step)
        LOG.info("resumed from %s (step %d, position %d)", ckpt, step, position)
    dd.barrier(env)

    bpb_start = bpb_end = None
    if heldout and step == 0 and tr.eval_at_start:
        bpb_start = _evaluate(model, s_tok, heldout, cfg)
        if env.is_main:
            _append_jsonl(metrics_path, {"event": "eval", "step": 0, "heldout_bpb": bpb_start})
    bar = tqdm(total=tr.steps, initial=step, desc=f"distill {cfg.loss.name}", disable=not (tr.progress and env.is_main))
    last: dict = {}
    t_log = time.time()
    while step < tr.steps:
        model.train()
        agg: dict[str, float] = {}
        loss_sum = 0.0
        for m in range(accum):
            first = position + (m * env.world_size + env.rank) * tr.micro_batch_size
            ids = order.take(first, tr.micro_batch_size)
            texts = [blocks[i] for i in ids]
            with dd.no_grad_sync(model, env, cfg.distributed.strategy, skip=m < accum - 1):
                total, mets = _micro_loss(cfg, model, s_tok, s_vocab, teachers, texts, ids, device, autocast)
                (total / accum).backward()
            loss_sum += float(total.detach()) / accum
            for k, v in mets.items():
                agg[k] = agg.get(k, 0.0) + float(v) / accum
        gnorm = torch.nn.utils.clip_grad_norm_(params, tr.grad_clip) if tr.grad_clip > 0 else \
            torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in params if p.grad is not None))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        position += tr.batch_size
        step += 1
        keys = sorted(agg)
        reduced = dd.all_reduce_mean(env, torch.tensor([loss_sum] + [agg[k] for k in keys], dtype=torch.float64,
                                                       device=device)).tolist()
        loss_mean, agg = reduced[0], dict(zip(keys, reduced[1:]))
        last = {"event": "train", "step": step, "loss": loss_mean, **{k: round(v, 6) for k, v in agg.items()},
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(gnorm), "position": position,
                "seconds": round(time.time() - t_log, 3)}
        t_log = time.time()
        if env.is_main and (step % tr.log_every == 0 or step == tr.steps):
            _append_jsonl(metrics_path, last)
        bar.set_postfix(loss=f"{loss_mean:.4f}", ce=f"{agg.get('ce', 0):.3f}")
        bar.update(1)
        if heldout and tr.eval_every and step % tr.eval_every == 0 and step < tr.steps:
            bpb = _evaluate(model, s_tok, heldout, cfg)
            if env.is_main:
                _append_jsonl(metrics_path, {"event": "eval", "step": step, "heldout_bpb": bpb})
        if tr.checkpoint_every and step % tr.checkpoint_every == 0 and step < tr.steps:
            _save_checkpoint(out, step, position, model, optimizer, scheduler, env, cfg)
    bar.close()
    if heldout:
        bpb_end = _evaluate(model, s_tok, heldout, cfg)
        if env.is_main:
            _append_jsonl(metrics_path, {"event": "eval", "step": step, "heldout_bpb": bpb_end})
    summary = {"loss": cfg.loss.name, "steps": step, "heldout_bpb_start": bpb_start, "heldout_bpb_end": bpb_end,
               "resumed_from": resumed_from, "world_size": env.world_size, "blocks": len(blocks),
               "teachers": [t.name for t in teachers], "seconds": round(time.time() - t_start, 1)}
    final = _save_final(model, s_tok, out / "final", cfg, env, summary)
    if env.is_main:
        plot_metrics(metrics_path, out / "metrics.png", f"{cfg.student.model} ← {cfg.loss.name}")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    dd.barrier(env)
    return RunResult(out, final, step, resumed_from, bpb_start, bpb_end, last, time.time() - t_start)
