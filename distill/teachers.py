"""Teachers: frozen models with their tokenizer, loss context, weighting, and the top-k logit cache.

Multi-teacher weighting (ALGORITHMS.md §5): the distillation terms of several
teachers are summed with fixed weights, or with ``softmax(α · score)`` computed
per batch from each teacher's own next-token predictions on that batch:

- ``ce``: minus the teacher's bits per byte of the batch text (tokenizer-neutral,
  so teachers with different vocabularies compare fairly);
- ``entropy``: minus the mean entropy of its predictive distributions;
- ``max_prob``: the mean probability of its top token.

Target memo. A loss that reads of the teacher only its log-probabilities of its own next tokens (``alm``) needs
one float per teacher token: :class:`TargetMemo` keeps them per training block the first time a block is seen, so
a block drawn again (a heal draws with replacement; a small corpus is read for several epochs) costs no teacher
forward pass.

Loading. :func:`load_frozen` loads a teacher's model for any trainer (heal or distill): frozen, in its dtype, its own
tokenizer checked against its embedding, an out-of-memory error turned into one line with the caller's way out.

Top-k cache. A large teacher need run only once: :class:`TopKCache` runs it
over every training block, keeps the ``k`` largest logits per position with
their ids, the exact log-partition and the per-position statistics above, and
writes them to ``.npy`` files that are memory-mapped and streamed back per
batch. The cache records what it was built from (teacher, tokenizer hash, blocks hash,
``max_tokens``, k); a stale or truncated cache is rebuilt with a log line, never reused. Under torchrun
every rank computes its share of the blocks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.teacher_dist import ROW_BLOCK, TeacherDist
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

CACHE_FORMAT = "distill-topk-cache/1"
STAT_NAMES = ("target_logprob", "entropy", "max_prob")


@torch.no_grad()
def position_stats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position statistics of a dense teacher at T = 1.

    Args:
        logits: ``(N, V)``.
        targets: ``(N,)`` next-token ids (``-100``: none; its log-prob is reported as 0).

    Returns:
        ``(N, 3)`` float32: target log-prob, entropy (nats), max probability.
    """
    out = []
    for a in range(0, logits.shape[0], ROW_BLOCK):
        z = logits[a:a + ROW_BLOCK].float()
        logp = torch.log_softmax(z, dim=-1)
        t = targets[a:a + ROW_BLOCK]
        tl = logp.gather(1, t.clamp_min(0)[:, None])[:, 0] * (t >= 0)
        ent = -(logp.exp() * logp).sum(-1)
        out.append(torch.stack([tl, ent, logp.max(-1).values.exp()], dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 3, device=logits.device)


def teacher_score(stats: torch.Tensor, mask: torch.Tensor, n_bytes: int, kind: str) -> float:
    """Score of one teacher on a batch (higher = more trusted).

    Args:
        stats: ``(N, 3)`` from :func:`position_stats` over all positions.
        mask: ``(N,)`` bool positions that predict a text token.
        n_bytes: UTF-8 bytes of the batch text.
        kind: ``ce`` | ``entropy`` | ``max_prob``.
    """
    s = stats[mask]
    if len(s) == 0:
        return 0.0
    if kind == "ce":
        return float(s[:, 0].sum()) / math.log(2) / max(n_bytes, 1)  # = −bits/byte
    if kind == "entropy":
        return -float(s[:, 1].mean())
    if kind == "max_prob":
        return float(s[:, 2].mean())
    raise ValueError(f"unknown score {kind!r}")


def teacher_weights(mode: str, fixed: Sequence[float], scores: Sequence[float] | None, alpha: float) -> list[float]:
    """Fixed weights as given, or ``softmax(alpha · scores)``."""
    if mode == "fixed":
        return [float(w) for w in fixed]
    s = torch.tensor(list(scores), dtype=torch.float64) * alpha
    return torch.softmax(s, dim=0).tolist()


@dataclass
class Teacher:
    """One frozen teacher and what the trainer needs about it."""

    index: int
    name: str
    tokenizer: object
    vocab: object
    loss: object  # distill.losses.KDLoss
    weight: float
    model: torch.nn.Module | None = None  # None when every block is served from the cache
    cache: "TopKCache | None" = None
    memo: "TargetMemo | None" = None  # the teacher's next-token log-probs of blocks seen before (loss alm)


def load_frozen(name: str, tokenizer, device, dtype="float32", trust_remote_code: bool = False,
                too_big_hint: str | None = None) -> torch.nn.Module:
    """A teacher's model, frozen (eval mode, no gradients), in ``dtype`` on ``device``; ``tokenizer`` is its own.

    Raises:
        SurgeryError: the weights do not fit in the device's memory (with ``too_big_hint``) or cannot be loaded,
            or the tokenizer has more ids than they have embedding rows.
    """
    from surgery.loading import load_model

    try:
        model = load_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                           tokenizer=tokenizer)
    except torch.OutOfMemoryError as e:
        raise SurgeryError(f"the teacher {name} does not fit in {device} memory beside the student ({e})",
                           too_big_hint) from e
    model.eval()
    model.requires_grad_(False)
    return model


class TargetMemo:
    """The teacher's log-probability of each of its own next tokens, per training block, in memory.

    Filled by the trainer from the live teacher's forward passes (:meth:`write`); a batch whose every block is
    here is served without one (:meth:`read`). Only for a loss that reads nothing else of the teacher
    (``needs_targets`` and no distribution: ``alm``). Holds at most ``max_tokens`` floats (4 bytes each); blocks
    seen after that run the teacher as before.

    Args:
        max_tokens: capacity in teacher tokens (default 2^26: 256 MiB).
    """

    def __init__(self, max_tokens: int = 1 << 26):
        self.rows: dict[int, torch.Tensor] = {}
        self.max_tokens, self.tokens = int(max_tokens), 0
        self.hits = self.misses = 0  # batches served / batches that ran the teacher

    def read(self, block_ids: Sequence[int], lengths: Sequence[int], L: int, device) -> torch.Tensor | None:
        """``(B·L,)`` float32 log-probs laid out like the live teacher's rows (0 past each block's ``lengths``),
        or None when a block is missing or was encoded to another length (the caller runs the teacher)."""
        rows = [self.rows.get(int(i)) for i in block_ids]
        if any(r is None or r.shape[0] != n for r, n in zip(rows, lengths)):
            self.misses += 1
            return None
        out = torch.zeros(len(rows), L)
        for b, r in enumerate(rows):
            out[b, :r.shape[0]] = r
        self.hits += 1
        return out.reshape(-1).to(device)

    def write(self, block_ids: Sequence[int], logp: torch.Tensor, lengths: Sequence[int]) -> None:
        """Keep ``logp`` (``(B, L)``, the live teacher's) for each block not held yet, its first ``lengths[b]``
        entries, while the capacity lasts."""
        for b, (i, n) in enumerate(zip(block_ids, lengths)):
            if int(i) in self.rows or self.tokens + n > self.max_tokens:
                continue
            self.rows[int(i)] = logp[b, :n].detach().float().cpu().clone()
            self.tokens += int(n)


class TopKCache:
    """Top-k teacher logits of every training block, on disk (``.npy``, memory-mapped).

    Files: ``ids.npy`` ``(n, L, k)`` int32, ``logits.npy`` ``(n, L, k)`` float32 (sorted
    descending), ``lse.npy`` ``(n, L)`` float32, ``stats.npy`` ``(n, L, 3)`` float32,
    ``lengths.npy`` ``(n,)`` int32, ``meta.json``. ``L`` = ``max_tokens``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = json.loads((self.path / "meta.json").read_text())
        self.ids = np.load(self.path / "ids.npy", mmap_mode="r")
        self.logits = np.load(self.path / "logits.npy", mmap_mode="r")
        self.lse = np.load(self.path / "lse.npy", mmap_mode="r")
        self.stats = np.load(self.path / "stats.npy", mmap_mode="r")
        self.lengths = np.load(self.path / "lengths.npy")

    @staticmethod
    def key(teacher_name: str, tokenizer_hash: str, blocks_hash: str, n_blocks: int, max_tokens: int, k: int,
            dtype: str) -> dict:
        return {"format": CACHE_FORMAT, "teacher": teacher_name, "tokenizer_hash": tokenizer_hash,
                "blocks_hash": blocks_hash, "n_blocks": n_blocks, "max_tokens": max_tokens, "top_k": k, "dtype": dtype}

    @classmethod
    def open_matching(cls, path: str | Path, key: dict) -> "TopKCache | None":
        """Open the cache at ``path`` if it was built from exactly ``key``; None if absent.

        A cache built from something else (another teacher, tokenizer, data, ``max_tokens`` or k: its
        ``meta.json`` records their hashes) or with missing/truncated files is removed with a log line
        and None is returned, so the caller rebuilds it; a stale cache is never used.

        Raises:
            SurgeryError: ``path`` is a non-empty folder that is not a teacher cache (nothing is deleted).
        """
        p = Path(path)
        if not (p / "meta.json").exists():
            if p.exists() and any(p.iterdir()):
                raise SurgeryError(f"teacher cache folder {str(p)!r} exists but holds no meta.json",
                                   "delete it or set cache.dir to an empty/new folder")
            return None
        problem = None
        try:
            cache = cls(p)
            diff = [k for k in key if cache.meta.get(k) != key[k]]
            if diff:
                problem = f"was built for other settings (differs in: {', '.join(diff)})"
            elif not cache.complete(key):
                problem = "is truncated"
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            problem = f"is unreadable ({type(e).__name__})"
        if problem is None:
            return cache
        LOG.warning("teacher cache %s %s: rebuilding it", p, problem)
        shutil.rmtree(p, ignore_errors=True)
        return None

    def complete(self, key: dict) -> bool:
        """Every file has the shape the key implies (a cut file fails to map or maps fewer rows)."""
        n, L, k = key["n_blocks"], key["max_tokens"], key["top_k"]
        return (self.ids.shape == (n, L, k) and self.logits.shape == (n, L, k) and self.lse.shape == (n, L)
                and self.stats.shape == (n, L, len(STAT_NAMES)) and self.lengths.shape == (n,))

    def read(self, block_ids: Sequence[int], lengths: Sequence[int], L: int, device) -> tuple[TeacherDist, torch.Tensor]:
        """The cached teacher for a batch of blocks, laid out like the live teacher's ``(B·L, ·)`` rows.

        Args:
            block_ids: B block indices.
            lengths: the teacher's token count per block in this batch (checked against the cache).
            L: padded length of the batch.

        Returns:
            ``(TeacherDist with B·L rows (padding rows are zero), stats (B·L, 3))``.
        """
        bid = np.asarray(block_ids, dtype=np.int64)
        cached_len = self.lengths[bid]
        if not np.array_equal(cached_len, np.asarray(lengths)):
            raise SurgeryError("the teacher cache does not match the teacher's tokenization of these blocks",
                               "delete the cache folder so that it is rebuilt")
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[bid, :L])).long()
        lg = torch.from_numpy(np.ascontiguousarray(self.logits[bid, :L]))
        lse = torch.from_numpy(np.ascontiguousarray(self.lse[bid, :L]))
        st = torch.from_numpy(np.ascontiguousarray(self.stats[bid, :L]))
        B = len(bid)
        k = ids.shape[-1]
        dist = TeacherDist(int(self.meta["vocab_size"]), topk_ids=ids.reshape(B * L, k).to(device),
                           topk_logits=lg.reshape(B * L, k).to(device), lse=lse.reshape(B * L).to(device))
        return dist, st.reshape(B * L, 3).to(device)


@torch.no_grad()
def build_cache(path: str | Path, key: dict, model, tokenizer, vocab, blocks: Sequence[str], max_tokens: int, k: int,
                batch_size: int, device, rank: int = 0, world_size: int = 1, barrier=lambda: None,
                progress: bool = True) -> TopKCache:
    """Run the teacher over every block once and write the top-k cache (see :class:`TopKCache`).

    All ranks call this; rank ``r`` computes the batches ``r, r + world, ...``. The files are
    written into ``<path>.building`` and renamed to ``path`` by rank 0 at the end.
    """
    from distill.data import encode_blocks

    path = Path(path)
    tmp = path.with_name(path.name + ".building")
    n, L = len(blocks), max_tokens
    V = len(vocab)
    k = min(k, V)
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, shape, dt in (("ids", (n, L, k), np.int32), ("logits", (n, L, k), np.float32),
                                ("lse", (n, L), np.float32), ("stats", (n, L, 3), np.float32), ("lengths", (n,), np.int32)):
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dt, shape=shape).flush()
    barrier()
    mm = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in ("ids", "logits", "lse", "stats", "lengths")}
    starts = list(range(0, n, batch_size))[rank::world_size]
    t0 = time.time()
    for s in tqdm(starts, desc=f"teacher cache {key['teacher']}", disable=not progress or rank != 0):
        texts = blocks[s:s + batch_size]
        enc = encode_blocks(texts, tokenizer, vocab, max_tokens).to(device)
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
        B, Lb, _ = logits.shape
        flat = logits.reshape(B * Lb, -1)[:, :V]
        vals, ids = torch.topk(flat.float(), k, dim=-1)
        lse = torch.logsumexp(flat.float(), dim=-1)
        st = position_stats(flat, enc.labels.reshape(-1))
        lens = enc.attention_mask.sum(1).cpu().numpy()
        mm["ids"][s:s + B, :Lb] = ids.reshape(B, Lb, k).cpu().numpy()
        mm["logits"][s:s + B, :Lb] = vals.reshape(B, Lb, k).cpu().numpy()
        mm["lse"][s:s + B, :Lb] = lse.reshape(B, Lb).cpu().numpy()
        mm["stats"][s:s + B, :Lb] = st.reshape(B, Lb, 3).cpu().numpy()
        mm["lengths"][s:s + B] = lens
    for a in mm.values():
        a.flush()
    del mm
    barrier()
    if rank == 0:
        meta = dict(key, vocab_size=V, seconds=round(time.time() - t0, 2))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        LOG.info("teacher cache for %s written to %s (%d blocks, k=%d)", key["teacher"], path, n, k)
    barrier()
    return TopKCache(path)
