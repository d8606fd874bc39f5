"""Heal a transplanted model: short training of only the rows the transplant invented.

Rows copied bit for bit (shared and special tokens, listed in ``transplant_rows.json``
by :func:`~surgery.transplant.transplant.transplant_checkpoint`) stay frozen: they are
never selected for training. Training is row-sparse (see :func:`heal`): a step touches
only the new rows its batch uses, through hooks, with a lazy per-row Adam — no dense
``(V, d)`` gradient or optimizer state pass (the dense version spent most of a CPU step
there). Everything else in the model is frozen too, unless ``lora`` adds LoRA adapters
(peft) to the linear layers of the body, merged into the weights at the end.

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
class RowAdam:
    """Adam on the rows of one matrix that a step touched (lazy, per-row step counts).

    The rows of a step are gathered into a small leaf tensor, trained through hooks (see
    :class:`_RowHooks`) and written back; the state lives only for trainable rows
    (``slot[row]``), so neither a dense ``(V, d)`` gradient nor an optimizer pass over all
    ``V`` rows is ever made (SmolLM2 ← Llama-3: 89k of 128k rows are new; a dense step spent
    most of its time there).

    Args:
        weight: ``(V, d)`` the matrix (updated in place).
        trainable: ``(V,)`` bool, rows allowed to move.
    """

    def __init__(self, weight: torch.Tensor, trainable: np.ndarray, betas=(0.9, 0.98), eps: float = 1e-8):
        self.weight = weight
        self.trainable = torch.as_tensor(trainable, dtype=torch.bool)
        n = int(self.trainable.sum())
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.slot[self.trainable] = torch.arange(n)
        self.m = torch.zeros(n, weight.shape[1], dtype=torch.float32, device=weight.device)
        self.v = torch.zeros_like(self.m)
        self.t = torch.zeros(n, dtype=torch.float32, device=weight.device)
        self.betas, self.eps = betas, eps

    def select(self, ids: torch.Tensor) -> torch.Tensor:
        """Distinct trainable rows among ``ids`` (sorted)."""
        u = torch.unique(ids.reshape(-1).cpu())
        return u[self.trainable[u]]

    @torch.no_grad()
    def step(self, rows: torch.Tensor, leaf: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        b1, b2 = self.betas
        s = self.slot[rows].to(self.m.device)
        g = grad.float()
        self.t[s] += 1
        t = self.t[s][:, None]
        m = self.m[s].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[s].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[s], self.v[s] = m, v
        upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(self.eps))
        self.weight[rows.to(self.weight.device)] = (leaf.detach().float() - lr * upd).to(self.weight.dtype)

    def state_dict(self) -> dict:
        touched = torch.nonzero(self.t > 0).reshape(-1)
        rows = torch.nonzero(self.trainable).reshape(-1)[touched]
        return {"rows": rows, "weight": self.weight.detach()[rows].cpu().clone(), "m": self.m[touched].cpu(),
                "v": self.v[touched].cpu(), "t": self.t[touched].cpu()}

    @torch.no_grad()
    def load_state_dict(self, st: dict) -> None:
        rows = st["rows"]
        if len(rows) and not bool(self.trainable[rows].all()):
            raise SurgeryError("saved heal state trains rows this model keeps frozen",
                               "resume with the same model and --train-rows setting")
        s = self.slot[rows]
        self.weight[rows.to(self.weight.device)] = st["weight"].to(self.weight.device, self.weight.dtype)
        self.m[s], self.v[s], self.t[s] = st["m"].to(self.m.device), st["v"].to(self.m.device), st["t"].to(self.m.device)


class _RowHooks:
    """Hooks that make the rows of one step trainable without a gradient for the whole matrix.

    Input side: the embedding's output gets ``scale · (leaf − leaf.detach())[map]`` added (zero
    in value, gradient to the leaf; ``scale`` = Gemma's ``embed_scale`` or 1). Output side: the
    head's logits get ``h · (leaf − leaf.detach())ᵀ`` added at the leaf's columns. The frozen
    matrices themselves never require a gradient; without input rows nothing upstream of the
    head does either, so the body runs forward only.
    """

    def __init__(self, emb, head, negatives: int = 0, trainable: torch.Tensor | None = None):
        self.in_map = self.in_table = self.out_cols = self.out_delta = None
        self.negatives, self.trainable = negatives, trainable
        self.neg_rows = self.neg_leaf = None
        self.head_weight = head.weight if head is not None else None
        scale = getattr(emb, "embed_scale", None)
        self.scale = scale if scale is not None else 1.0
        self.handles = [emb.register_forward_hook(self._emb)]
        if head is not None:
            self.handles.append(head.register_forward_hook(self._head))

    def set(self, in_map=None, in_leaf=None, out_cols=None, out_leaf=None):
        self.in_map = in_map
        self.in_table = None if in_leaf is None else torch.cat([torch.zeros_like(in_leaf[:1]), in_leaf - in_leaf.detach()])
        self.out_cols = out_cols
        self.out_delta = None if out_leaf is None else out_leaf - out_leaf.detach()
        self.neg_rows = self.neg_leaf = None

    def _emb(self, mod, args, out):
        if self.in_table is None:
            return out
        s = self.scale.to(out.dtype) if isinstance(self.scale, torch.Tensor) else self.scale
        return out + (torch.nn.functional.embedding(self.in_map, self.in_table) * s).to(out.dtype)

    def _head(self, mod, args, out):
        if self.out_delta is None:
            return out
        h = args[0]
        out = out.index_add(-1, self.out_cols, (h @ self.out_delta.to(h.dtype).T).to(out.dtype))
        if self.negatives and self.trainable is not None:
            # the trainable rows the batch's softmax wrongly favours most (summed probability): they get
            # the push-down of the full softmax gradient too
            with torch.no_grad():
                mass = torch.softmax(out.detach().float().reshape(-1, out.shape[-1]), -1).sum(0)
                ok = self.trainable[: mass.shape[0]].to(mass.device).clone()
                ok[self.out_cols] = False
                mass = torch.where(ok, mass, torch.full_like(mass, -1.0))
                n = min(self.negatives, int(ok.sum()))
                neg = torch.topk(mass, n).indices if n else mass.new_zeros(0, dtype=torch.long)
            if len(neg):
                self.neg_rows = neg
                self.neg_leaf = self.head_weight.detach()[neg].clone().float().requires_grad_(True)
                d = self.neg_leaf - self.neg_leaf.detach()
                out = out.index_add(-1, neg, (h @ d.to(h.dtype).T).to(out.dtype))
        return out

    def remove(self):
        for h in self.handles:
            h.remove()


def _row_mask(n_rows: int, copied: np.ndarray | None, train_rows: str) -> np.ndarray:
    m = np.ones(n_rows, dtype=bool)
    if train_rows == "new" and copied is not None and len(copied):
        m[copied[copied < n_rows]] = False
    return m


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


def _lr_factor(step: int, cfg: HealConfig, total: int | None, time_frac: float | None = None) -> float:
    """Linear warm-up, then cosine to 10% over the step budget (or the time budget's fraction)."""
    if step < cfg.warmup:
        return (step + 1) / max(1, cfg.warmup)
    if total:
        frac = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    elif time_frac is not None:
        frac = min(1.0, max(0.0, time_frac))
    else:
        return 1.0
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def heal(model, tokenizer, texts: list[str], config: HealConfig, state_dir: str | Path | None = None,
         copied_rows: np.ndarray | None = None, resume: bool = False, eval_text: str | None = None,
         progress: bool = True) -> tuple[object, dict, list[dict]]:
    """Train the new rows of ``model`` (in place) on ``texts``.

    Row-sparse: each step gathers the trainable rows its batch uses — input rows of its tokens,
    head rows of its tokens (a tied matrix: their union, one leaf) — trains them through hooks
    with the full softmax, and applies :class:`RowAdam` to those rows only. Rows of tokens a
    batch does not contain keep their value (their softmax gradient is a small push-down,
    skipped). Copied rows never move (bit-exact).

    Args:
        model: a transplanted causal LM.
        tokenizer: its tokenizer.
        texts: training texts (mixed into one stream; windows are drawn at random).
        config: :class:`HealConfig` (``steps`` or ``minutes``).
        state_dir: where resumable checkpoints go (``None``: no checkpoints).
        copied_rows: ``(n,)`` ids of rows to keep frozen (with ``train_rows='new'``).
        resume: continue from ``state_dir/state.pt``.
        eval_text: optional text scored in bits/byte before and after.

    Returns:
        ``(model, summary, metrics)``; with LoRA the adapters are merged into the returned model.
    """
    from surgery.transplant.surgery_ops import embedding_modules

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
    for p in model.parameters():
        p.requires_grad_(False)
    emb, head, tied = embedding_modules(model)
    untied = head is not None and not tied
    trainable = _row_mask(emb.weight.shape[0], copied_rows, cfg.train_rows)
    opt_in = RowAdam(emb.weight.data, trainable)
    opt_out = RowAdam(head.weight.data, trainable) if untied else None
    lora_params = []
    opt_lora = None
    if cfg.lora:
        lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in lora_params:
            p.requires_grad_(True)
        opt_lora = torch.optim.AdamW(lora_params, lr=cfg.lora_lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    train_in = cfg.input_rows or cfg.lora
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
        if (st["rows_out"] is not None) != (opt_out is not None):
            raise SurgeryError("saved heal state has a different head (tied/untied) than this model",
                               "resume with the same model")
        opt_in.load_state_dict(st["rows_in"])
        if opt_out is not None:
            opt_out.load_state_dict(st["rows_out"])
        if opt_lora is not None:
            named = dict(model.named_parameters())
            with torch.no_grad():
                for n, t in st["lora"].items():
                    if n not in named:
                        raise SurgeryError(f"saved heal state has tensor {n!r} this model lacks",
                                           "resume with the same model and --lora setting")
                    named[n].copy_(t.to(named[n].device))
            opt_lora.load_state_dict(st["optim_lora"])
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
    hooks = _RowHooks(emb, head, cfg.negatives, torch.as_tensor(trainable))

    def save():
        if state_path is None:
            return
        _save_state(state_path, {
            "step": step, "elapsed": time.time() - t_run, "config": cfg.to_dict(), "metrics": metrics,
            "rows_in": opt_in.state_dict(), "rows_out": opt_out.state_dict() if opt_out is not None else None,
            "lora": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
            "optim_lora": opt_lora.state_dict() if opt_lora is not None else None,
            "data_rng": gen.get_state(), "torch_rng": torch.get_rng_state()})

    try:
        while True:
            if total is not None and step >= total:
                break
            if budget is not None and time.time() - t_run >= budget:
                break
            f = _lr_factor(step, cfg, total, (time.time() - t_run) / budget if budget else None)
            lr = cfg.lr * f
            if opt_lora is not None:
                for g in opt_lora.param_groups:
                    g["lr"] = cfg.lora_lr * f
            batch = sample_batch(stream, cfg.seq_len, cfg.batch_size, gen).to(device)
            t0 = time.time()
            # rows of this step: input rows of the inputs, head rows of the targets (tied: their union)
            rows_out = opt_in.select(batch[:, 1:]) if tied else (opt_out.select(batch[:, 1:]) if untied else None)
            rows_in = opt_in.select(batch) if train_in else torch.zeros(0, dtype=torch.long)
            if tied and head is not None:
                rows_in = torch.unique(torch.cat([rows_in, rows_out]))
                rows_out = rows_in
            leaf_in = emb.weight.detach()[rows_in.to(device)].clone().float().requires_grad_(True) \
                if len(rows_in) else None
            if tied:
                leaf_out = leaf_in
            elif untied and len(rows_out):
                leaf_out = head.weight.detach()[rows_out.to(device)].clone().float().requires_grad_(True)
            else:
                leaf_out = None
            in_map = None
            if leaf_in is not None and train_in:
                lut = torch.zeros(emb.weight.shape[0], dtype=torch.long)
                lut[rows_in] = torch.arange(1, len(rows_in) + 1)
                in_map = lut[batch.cpu()].to(device)
            hooks.set(in_map, leaf_in if in_map is not None else None,
                      rows_out.to(device) if leaf_out is not None else None, leaf_out)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(input_ids=batch, labels=batch)
            loss = out.loss.float()
            if not torch.isfinite(loss):
                raise SurgeryError(f"loss became {loss.item()} at step {step}", "lower --lr")
            if opt_lora is not None:
                opt_lora.zero_grad(set_to_none=True)
            neg_rows, neg_leaf = hooks.neg_rows, hooks.neg_leaf
            leaves = [x for x in {id(x): x for x in (leaf_in, leaf_out, neg_leaf) if x is not None}.values()]
            if leaves or lora_params:
                loss.backward()
            grads = [x.grad for x in leaves if x.grad is not None] + [p.grad for p in lora_params if p.grad is not None]
            if cfg.grad_clip and grads:
                norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if norm > cfg.grad_clip:
                    for g in grads:
                        g.mul_(cfg.grad_clip / (norm + 1e-6))
            if tied:
                if leaf_in is not None and leaf_in.grad is not None:
                    opt_in.step(rows_in, leaf_in, leaf_in.grad, lr)
            else:
                if leaf_in is not None and leaf_in.grad is not None:
                    opt_in.step(rows_in, leaf_in, leaf_in.grad, lr)
                if leaf_out is not None and leaf_out.grad is not None:
                    opt_out.step(rows_out, leaf_out, leaf_out.grad, lr)
            if neg_leaf is not None and neg_leaf.grad is not None:
                (opt_in if tied else opt_out).step(neg_rows.cpu(), neg_leaf, neg_leaf.grad, lr)
            if opt_lora is not None:
                opt_lora.step()
            hooks.set()
            step += 1
            rec = {"step": step, "loss": round(loss.item(), 5), "lr": lr, "tokens": int(batch.numel()),
                   "rows": int(len(rows_in) + (len(rows_out) if untied and rows_out is not None else 0)
                               + (len(neg_rows) if neg_rows is not None else 0)),
                   "step_s": round(time.time() - t0, 3), "elapsed_s": round(time.time() - t_run, 1)}
            metrics.append(rec)
            LOG.debug("%s", rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if step % cfg.checkpoint_every == 0:
                save()
    finally:
        hooks.remove()
    bar.close()
    model.eval()
    if cfg.lora:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to("cpu")
    summary = {"steps": step, "seconds": round(time.time() - t_run, 1), "tokens_seen": int(step * cfg.seq_len *
               cfg.batch_size), "train_tokens_available": int(len(stream)),
               "step_s_median": round(float(np.median([m["step_s"] for m in metrics])), 3) if metrics else None,
               "loss_first": metrics[0]["loss"] if metrics else None,
               "loss_last10": round(float(np.mean([m["loss"] for m in metrics[-10:]])), 5) if metrics else None,
               "rows_trained": int((opt_in.t > 0).sum() + (opt_out.t > 0).sum() if opt_out is not None
                                   else (opt_in.t > 0).sum()),
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
