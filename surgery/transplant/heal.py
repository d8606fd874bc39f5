"""Heal a transplanted model: short training of only the rows the transplant invented.

Rows copied bit for bit (shared and special tokens, listed in ``transplant_rows.json``
by :func:`~surgery.transplant.transplant.transplant_checkpoint`) stay frozen: their
gradients are masked to zero and they get no weight decay, so Adam never moves them.
Everything else in the model is frozen too, unless ``lora`` adds LoRA adapters (peft)
to the linear layers of the body, merged into the weights at the end.

Resumable: every ``checkpoint_every`` steps the trainable tensors, optimizer, RNG
states, data position and elapsed time go to a hidden sibling of the output
(``.<out>.heal-state/state.pt``, written atomically); ``resume=True`` continues from it.
The output HF folder is written atomically at the end, with ``heal_metrics.jsonl``
(one line per step) and ``heal_summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from surgery.errors import SurgeryError
from surgery.transplant.config import HealConfig

LOG = logging.getLogger(__name__)

ROWS_FILE = "transplant_rows.json"


# --------------------------------------------------------------------------- copied-row lists
def encode_ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted ids → ``[[start, end), ...]`` runs (compact JSON)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if ids.size == 0:
        return []
    br = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[ids[0]], ids[br + 1]])
    ends = np.concatenate([ids[br] + 1, [ids[-1] + 1]])
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def decode_ranges(ranges: list[list[int]]) -> np.ndarray:
    if not ranges:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def rows_file_content(copied: np.ndarray, n_rows: int) -> str:
    return json.dumps({"n_rows": int(n_rows), "copied": encode_ranges(copied)}) + "\n"


def read_copied_rows(folder: str | Path) -> np.ndarray | None:
    p = Path(folder) / ROWS_FILE
    if not p.exists():
        return None
    try:
        return decode_ranges(json.loads(p.read_text())["copied"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SurgeryError(f"{str(p)!r} is not a valid row list ({e})", "re-create it with `surgery transplant`") from e


# --------------------------------------------------------------------------- data
def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts encoded (no special tokens), each after a document-start token: ``(N,)`` int64."""
    from surgery.evaluate import document_start_id

    start = document_start_id(tokenizer)
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        if start is not None:
            ids.append(start)
        ids.extend(enc)
    return torch.tensor(ids, dtype=torch.long)


def sample_batch(stream: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """``(B, seq_len)`` random windows of the stream."""
    hi = max(1, len(stream) - seq_len)
    starts = torch.randint(0, hi, (batch_size,), generator=gen)
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------- training
def _row_mask(n_rows: int, copied: np.ndarray | None, train_rows: str) -> torch.Tensor:
    m = torch.ones(n_rows, 1)
    if train_rows == "new" and copied is not None and len(copied):
        m[torch.as_tensor(copied[copied < n_rows])] = 0.0
    return m


def _trainables(model, cfg: HealConfig, copied: np.ndarray | None):
    """Set requires_grad, add gradient masks; returns (param groups, named trainable tensors)."""
    from surgery.transplant.surgery_ops import embedding_modules

    for p in model.parameters():
        p.requires_grad_(False)
    emb, head, tied = embedding_modules(model)
    rows = []
    mask = _row_mask(emb.weight.shape[0], copied, cfg.train_rows)
    for mod in ([emb] if (tied or head is None) else [emb, head]):
        w = mod.weight
        w.requires_grad_(True)
        m = mask.to(w.device, w.dtype)
        w.register_hook(lambda g, m=m: g * m)
        rows.append(w)
    groups = [{"params": rows, "lr": cfg.lr, "weight_decay": 0.0}]
    if cfg.lora:
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora:
            p.requires_grad_(True)
        groups.append({"params": lora, "lr": cfg.lora_lr, "weight_decay": cfg.weight_decay})
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return groups, named


def _add_lora(model, cfg: HealConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise SurgeryError("--lora needs the peft package", "pip install peft") from e
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names -= {"lm_head", "embed_out", "output"}
    lcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, lora_dropout=0.0, target_modules=sorted(names),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lcfg)


def _use_bf16(mode: str, device: torch.device) -> bool:
    """bf16 autocast: on request, or (auto) on CUDA with bf16 support.

    Not on CPU by default: measured on this project's 2-core AMX Xeon (SmolLM2-135M with a
    128k vocabulary, 512 tokens per step), bf16 autocast steps took 32-65 s against 20-40 s
    in float32 (the casts of the large embedding/head matrices cost more than they save).
    """
    if mode == "off":
        return False
    if mode == "bf16":
        return True
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def _lr_factor(step: int, cfg: HealConfig, total: int | None) -> float:
    if step < cfg.warmup:
        return (step + 1) / max(1, cfg.warmup)
    if total:  # cosine to 10% over a step budget
        frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def heal(model, tokenizer, texts: list[str], config: HealConfig, state_dir: str | Path | None = None,
         copied_rows: np.ndarray | None = None, resume: bool = False, eval_text: str | None = None,
         progress: bool = True) -> tuple[object, dict, list[dict]]:
    """Train the new rows of ``model`` (in place) on ``texts``.

    Args:
        model: a transplanted causal LM.
        tokenizer: its tokenizer.
        texts: training texts.
        config: :class:`HealConfig` (``steps`` or ``minutes``).
        state_dir: where resumable checkpoints go (``None``: no checkpoints).
        copied_rows: ``(n,)`` ids of rows to keep frozen (with ``train_rows='new'``).
        resume: continue from ``state_dir/state.pt``.
        eval_text: optional text scored in bits/byte before and after.

    Returns:
        ``(model, summary, metrics)``; with LoRA the adapters are merged into the returned model.
    """
    cfg = config
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cfg.train_rows == "new" and copied_rows is None:
        raise SurgeryError("no list of copied rows: cannot tell which rows are new",
                           f"heal a folder written by `surgery transplant` (it holds {ROWS_FILE}), or train all "
                           "rows with --train-rows all")
    stream = token_stream(tokenizer, texts)
    if len(stream) < cfg.seq_len + 1:
        raise SurgeryError(f"training text has only {len(stream)} tokens, fewer than seq_len={cfg.seq_len}",
                           "pass more text or a smaller --seq-len")
    from surgery.evaluate import bits_per_byte

    bpb_before = None
    if eval_text:
        bpb_before = bits_per_byte(model, tokenizer, eval_text, progress=False).bits_per_byte
    model.to(device)
    if cfg.lora:
        model = _add_lora(model, cfg)
    groups, named = _trainables(model, cfg, copied_rows)
    # eps 1e-5, not 1e-8: with the full softmax every row gets a tiny gradient, and a tiny eps turns
    # those into full-size (sign-like) Adam steps that move rows of tokens the batch never saw. (A
    # 10-step heal with eps 1e-8 on en/de/zh/ja text improved en and hurt de/zh/ja; this is the
    # likely cause.) With 1e-5, rows with real gradients (~1e-3) still get Adam-sized steps.
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-5)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed, metrics = 0, 0.0, []
    state_path = Path(state_dir) / "state.pt" if state_dir else None
    if resume:
        if state_path is None or not state_path.exists():
            raise SurgeryError(f"nothing to resume: no heal state at {str(state_path)!r}", "run without --resume first")
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        budget_keys = ("steps", "minutes")
        if {k: v for k, v in st["config"].items() if k not in budget_keys} != \
                {k: v for k, v in cfg.to_dict().items() if k not in budget_keys}:
            LOG.warning("resuming with a different heal config than the saved state")
        with torch.no_grad():
            for n, t in st["trainable"].items():
                if n not in named:
                    raise SurgeryError(f"saved heal state has tensor {n!r} this model lacks",
                                       "resume with the same model and --lora setting")
                named[n].copy_(t.to(named[n].device))
        opt.load_state_dict(st["optim"])
        gen.set_state(st["data_rng"])
        torch.set_rng_state(st["torch_rng"])
        step, elapsed, metrics = st["step"], st["elapsed"], st["metrics"]
        LOG.info("resumed at step %d (%.0f s trained)", step, elapsed)
    model.train()
    use_bf16 = _use_bf16(cfg.autocast, device)
    total = cfg.steps
    budget = cfg.minutes * 60 if cfg.minutes else None
    bar = tqdm(total=total, initial=step, desc="heal", disable=not progress, leave=False)
    t_run = time.time() - elapsed

    def save():
        if state_path is None:
            return
        _save_state(state_path, {
            "step": step, "elapsed": time.time() - t_run, "config": cfg.to_dict(), "metrics": metrics,
            "trainable": {n: p.detach().cpu() for n, p in named.items()}, "optim": opt.state_dict(),
            "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()})

    while True:
        if total is not None and step >= total:
            break
        if budget is not None and time.time() - t_run >= budget:
            break
        f = _lr_factor(step, cfg, total)
        for g, base in zip(opt.param_groups, [cfg.lr, cfg.lora_lr]):
            g["lr"] = base * f
        batch = sample_batch(stream, cfg.seq_len, cfg.batch_size, gen).to(device)
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=batch, labels=batch)
        loss = out.loss.float()
        if not torch.isfinite(loss):
            raise SurgeryError(f"loss became {loss.item()} at step {step}", "lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
        opt.step()
        step += 1
        rec = {"step": step, "loss": round(loss.item(), 5), "lr": opt.param_groups[0]["lr"],
               "tokens": int(batch.numel()), "step_s": round(time.time() - t0, 3),
               "elapsed_s": round(time.time() - t_run, 1)}
        metrics.append(rec)
        LOG.debug("%s", rec)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if step % cfg.checkpoint_every == 0:
            save()
    bar.close()
    save()
    model.eval()
    if cfg.lora:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to("cpu")
    summary = {"steps": step, "seconds": round(time.time() - t_run, 1), "tokens_seen": int(step * cfg.seq_len *
               cfg.batch_size), "train_tokens_available": int(len(stream)),
               "loss_first": metrics[0]["loss"] if metrics else None,
               "loss_last10": round(float(np.mean([m["loss"] for m in metrics[-10:]])), 5) if metrics else None,
               "device": str(device), "bf16_autocast": use_bf16, "config": cfg.to_dict(),
               "bits_per_byte_before": bpb_before}
    if eval_text:
        summary["bits_per_byte_after"] = bits_per_byte(model, tokenizer, eval_text, progress=False).bits_per_byte
    return model, summary, metrics


def state_dir_for(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.heal-state"


def heal_checkpoint(model_path: str, text_paths: list[str], out: str, config: HealConfig, overwrite: bool = False,
                    resume: bool = False, eval_path: str | None = None, progress: bool = True) -> dict:
    """Load a transplanted folder, heal it and write a new HF folder to ``out`` (atomically).

    Returns:
        The summary (also written as ``heal_summary.json``).
    """
    from surgery.checkpoint import check_output_free, save_checkpoint
    from surgery.loading import load_model, load_tokenizer
    from surgery.textio import read_text, read_texts

    check_output_free(out, overwrite)
    texts = read_texts(text_paths)
    eval_text = read_text(eval_path) if eval_path else None
    src = Path(model_path)
    copied = read_copied_rows(src) if src.is_dir() else None
    tok = load_tokenizer(model_path)
    model = load_model(model_path, dtype="float32")
    sdir = state_dir_for(out)
    if not resume and (sdir / "state.pt").exists():
        LOG.warning("a heal state exists at %s; starting over (pass --resume to continue it)", sdir)
    model, summary, metrics = heal(model, tok, texts, config, sdir, copied, resume, eval_text, progress)
    summary["base_model"] = str(model_path)
    summary["texts"] = [str(p) for p in text_paths]
    extra = {"heal_metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics),
             "heal_summary.json": json.dumps(summary, indent=2) + "\n"}
    for name in (ROWS_FILE, "transplant_report.json"):
        if (src / name).exists():
            extra[name] = (src / name).read_text()
    save_checkpoint(model, tok, out, overwrite=overwrite, extra_files=extra)
    import shutil

    shutil.rmtree(sdir, ignore_errors=True)  # the run is complete; its resumable state is no longer needed
    return summary
