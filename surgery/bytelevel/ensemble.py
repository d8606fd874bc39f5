"""Ensembles of language models with different vocabularies.

Byte level (exact up to each member's :class:`~surgery.bytelevel.bytelm.ByteLM` mode):
every member gives a next-byte distribution over the 257 outcomes (256 = end of
text) and the ensemble combines them with normalized weights ``w``:

- ``mix``: ``P(b) = Σ_k w_k P_k(b)`` (a per-byte mixture);
- ``product``: ``P(b) ∝ Π_k P_k(b)^{w_k}`` (weighted geometric mean, renormalized).

Modes live in :data:`ENSEMBLE_MODES` (add one with :func:`register_mode`).

Token level (approximate, for comparison): :class:`TokenEnsemble` predicts in the
first member's vocabulary. Another member's next-token distribution, taken after the
last of its own tokens that ends at or before the current byte offset, is projected
into that vocabulary through the alignment core's projection
(:func:`surgery.vocab.projection.build_projection`, which keeps to the ids each tokenizer
emits: a member's probability of ``,`` lands on the id the head's tokenizer emits for ``,``,
never on a byte-fallback twin such as ``<0x2C>``) and renormalized. It ignores
token boundaries that do not line up, hence approximate; it is cheap (one token
forward per member per step).
"""

from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from surgery.bytelevel.bytelm import EOT, ByteLM, generate_bytes, sample_index
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

ENSEMBLE_MODES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def register_mode(name: str):
    """Register ``fn(logps (K, ..., N), weights (K,)) -> (..., N)`` log-probabilities under ``name``."""

    def deco(fn):
        ENSEMBLE_MODES[name] = fn
        return fn

    return deco


@register_mode("mix")
def mix(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of probabilities: ``log Σ_k w_k p_k``."""
    w = torch.log(weights).reshape(-1, *([1] * (logps.dim() - 1)))
    return torch.logsumexp(logps + w, dim=0)


@register_mode("product")
def product(logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted geometric mean of probabilities, renormalized over the last axis."""
    w = weights.reshape(-1, *([1] * (logps.dim() - 1)))
    s = torch.where(w > 0, logps * w, torch.zeros_like(logps)).sum(0)
    return s - torch.logsumexp(s, dim=-1, keepdim=True)


def _weights(n: int, weights: Sequence[float] | None) -> torch.Tensor:
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if len(weights) != n:
        raise SurgeryError(f"{len(weights)} weights for {n} models", "give one --weight per --model (or none)")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if (w < 0).any() or not torch.isfinite(w).all() or float(w.sum()) <= 0:
        raise SurgeryError(f"ensemble weights must be non-negative and not all zero, got {list(weights)}",
                           "use weights such as 0.5 0.5")
    return w / w.sum()


def _check_mode(mode: str) -> Callable:
    fn = ENSEMBLE_MODES.get(mode)
    if fn is None:
        raise SurgeryError(f"unknown ensemble mode {mode!r}", f"choose one of: {', '.join(sorted(ENSEMBLE_MODES))}")
    return fn


class ByteEnsemble:
    """Byte-level ensemble of :class:`ByteLM` members (any mix of tokenizers).

    Args:
        members: the byte-level LMs.
        weights: one non-negative weight per member (normalized; default uniform).
        mode: a name in :data:`ENSEMBLE_MODES` (``"mix"`` or ``"product"``).
        parallel: run the members' forward passes in threads (overlaps them on a GPU or
            with spare cores; default: when a member is on CUDA).
    """

    def __init__(self, members: Sequence[ByteLM], weights: Sequence[float] | None = None, mode: str = "mix",
                 parallel: bool | None = None):
        if not members:
            raise SurgeryError("an ensemble needs at least one model", "pass --model at least once")
        self.members = list(members)
        self.weights = _weights(len(self.members), weights)
        self.mode = mode
        self.combine = _check_mode(mode)
        if parallel is None:
            parallel = any(next(m.model.parameters()).is_cuda for m in self.members)
        self._pool = ThreadPoolExecutor(len(self.members)) if parallel and len(self.members) > 1 else None

    def _each(self, fn):
        if self._pool is None:
            return [fn(m) for m in self.members]
        return list(self._pool.map(fn, self.members))

    @torch.no_grad()
    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        """``(257,)`` float64 next-byte log-probabilities of the ensemble."""
        logps = torch.stack(self._each(lambda m: m.next_byte_logprobs(prefix)))
        return self.combine(logps, self.weights)

    def byte_logprobs(self, data: bytes) -> torch.Tensor:
        """``(len(data)+1, 257)`` next-byte log-probabilities after every prefix of ``data``."""
        logps = torch.stack(self._each(lambda m: m.byte_logprobs(data)))
        return self.combine(logps, self.weights)

    def logprob(self, data: bytes) -> float:
        """Natural-log prefix probability of ``data`` under the ensemble (chain of its next-byte distributions)."""
        from surgery.bytelevel.scoring import score

        data = bytes(data)
        if self.mode == "mix":  # only the probability of each actual byte is needed
            per = torch.stack(self._each(lambda m: torch.from_numpy(score(m, data).byte_logprobs)))
            return float(mix(per, self.weights).sum())
        dists = self.byte_logprobs(data)
        idx = torch.tensor(list(data), dtype=torch.long)
        return float(dists[torch.arange(len(data)), idx].sum())

    def bits_per_byte(self, text: str) -> float:
        data = text.encode("utf-8")
        return -self.logprob(data) / math.log(2) / len(data)

    def generate(self, prefix: bytes = b"", max_bytes: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, stop: bytes | None = None) -> bytes:
        """Sample bytes from the ensemble (see :meth:`ByteLM.generate`)."""
        return generate_bytes(self.next_byte_logprobs, prefix, max_bytes, temperature, top_p, seed, stop)

    @property
    def forwards(self) -> list[int]:
        return [m.forwards for m in self.members]


# -- token level (approximate) ---------------------------------------------------------------------
class _Member:
    """One model of a token-level ensemble with an incremental KV cache over its own tokens."""

    def __init__(self, model, tokenizer):
        from transformers import DynamicCache

        from surgery.bytelevel.validity import Canonicalizer
        from surgery.evaluate import document_start_id

        self.model = model
        self.canon = Canonicalizer(tokenizer)
        self.vocab = self.canon.vocab
        self.device = next(model.parameters()).device
        start = document_start_id(tokenizer)
        if start is None:
            raise SurgeryError("a tokenizer has neither BOS nor EOS", "set its bos_token")
        self.start = start
        self._cache_cls = DynamicCache
        self.ids: list[int] = []
        self.cache = None
        self.last = None

    @property
    def offset(self) -> int:
        return 1 if self.vocab.dummy_prefix else 0

    def stream(self, data: bytes) -> bytes:
        return b" " + data if self.vocab.dummy_prefix else data

    @torch.no_grad()
    def logprobs_after(self, ids: list[int]) -> torch.Tensor:
        """``(V,)`` next-token log-probabilities after ``[start] + ids`` (reusing the cached prefix)."""
        from surgery.bytelevel.treeattn import cache_kwarg, truncate_cache

        full = [self.start] + list(ids)
        common = 0
        while common < min(len(full), len(self.ids)) and full[common] == self.ids[common]:
            common += 1
        if common == len(full) and self.last is not None and common == len(self.ids):
            return self.last
        if self.cache is None or common == 0:
            self.cache, common = self._cache_cls(), 0
        else:
            common = min(common, len(full) - 1)  # recompute at least the last token
            truncate_cache(self.cache, common)
        new = torch.tensor([full[common:]], device=self.device)
        out = self.model(input_ids=new, position_ids=torch.arange(common, len(full), device=self.device)[None],
                         use_cache=True, logits_to_keep=1, **{cache_kwarg(self.model): self.cache})
        self.ids = full
        self.last = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return self.last


class TokenEnsemble:
    """Approximate token-level ensemble in the first member's vocabulary (see module docstring).

    Args:
        models, tokenizers: the members (the first one's vocabulary is the output vocabulary).
        weights, mode: as for :class:`ByteEnsemble`.
    """

    def __init__(self, models: Sequence, tokenizers: Sequence, weights: Sequence[float] | None = None,
                 mode: str = "mix"):
        from surgery.vocab.projection import build_projection, to_torch_sparse

        if len(models) != len(tokenizers) or not models:
            raise SurgeryError("give one tokenizer per model", "pass matching --model values")
        self.members = [_Member(m, t) for m, t in zip(models, tokenizers)]
        self.weights = _weights(len(models), weights)
        self.mode = mode
        self.combine = _check_mode(mode)
        head = self.members[0]
        n0 = head.model.get_output_embeddings().weight.shape[0]
        self.proj = [None]
        for m in self.members[1:]:
            P = build_projection(m.vocab, head.vocab).matrix  # (V_k, V_0)
            n_k = m.model.get_output_embeddings().weight.shape[0]
            P = P[:n_k] if P.shape[0] >= n_k else _pad_rows(P, n_k)
            P = P[:, :n0] if P.shape[1] >= n0 else _pad_cols(P, n0)
            with warnings.catch_warnings():  # torch flags sparse CSR as beta
                warnings.simplefilter("ignore", UserWarning)
                self.proj.append(to_torch_sparse(P.T.tocsr(), device=m.device))  # (V_0, V_k)

    def _projected(self, k: int, lp: torch.Tensor) -> torch.Tensor:
        """Member ``k``'s ``(V_k,)`` log-probabilities as ``(V_0,)`` log-probabilities."""
        if k == 0:
            return lp.double().cpu()
        p = lp.exp().to(torch.float32)[:, None]
        q = (self.proj[k] @ p)[:, 0].double().cpu()
        total = float(q.sum())
        if total <= 0:
            return torch.full_like(q, -math.inf)
        with np.errstate(divide="ignore"):
            return torch.log(q / total)

    def next_token_logprobs(self, data: bytes, head_ids: list[int]) -> torch.Tensor:
        """``(V_0,)`` log-probabilities of the head's next token after text ``data`` tokenized as ``head_ids``."""
        outs = []
        for k, m in enumerate(self.members):
            if k == 0:
                lp = m.logprobs_after(head_ids)
            else:
                z = m.stream(data)
                ids = m.canon.encode(z)
                lp = m.logprobs_after(ids)
            outs.append(self._projected(k, lp))
        return self.combine(torch.stack(outs), self.weights)

    @torch.no_grad()
    def generate(self, prefix: bytes = b"", max_bytes: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None) -> bytes:
        """Sample tokens of the head vocabulary until ``max_bytes`` bytes or a token without bytes."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        head = self.members[0]
        data = bytes(prefix)
        ids = head.canon.encode(head.stream(data))
        out = bytearray()
        while len(out) < max_bytes:
            lp = self.next_token_logprobs(data + bytes(out), ids)
            t = sample_index(lp, temperature, top_p, gen)
            surface = head.vocab.surfaces[t] if t < len(head.vocab.surfaces) else None
            if not surface:
                break
            ids.append(t)
            out.extend(surface)
        return bytes(out[:max_bytes])

    @torch.no_grad()
    def _logprobs_at(self, k: int, ids: list[int], rows: list[int], batch: int = 64) -> dict[int, torch.Tensor]:
        """Member ``k``'s projected next-token log-probabilities after ``ids[:r]`` for each ``r`` in ``rows``."""
        from surgery.bytelevel.treeattn import logits_from_hidden

        m = self.members[k]
        seq = torch.tensor([[m.start] + list(ids)], device=m.device)
        limit = getattr(m.model.config, "max_position_embeddings", None)
        if limit and seq.shape[1] > limit:
            raise SurgeryError(f"the text is {seq.shape[1]} tokens, more than the model's {limit}",
                               "score a shorter text with the token-level ensemble")
        hidden = m.model.get_decoder()(input_ids=seq, use_cache=False).last_hidden_state[0]
        out = {}
        rows = sorted(set(rows))
        for s in range(0, len(rows), batch):
            part = rows[s:s + batch]
            lp = torch.log_softmax(logits_from_hidden(m.model, hidden[part]), dim=-1)
            for r, row in zip(part, lp):
                out[r] = self._projected(k, row)
        return out

    def logprob(self, text: str) -> float:
        """Natural-log probability of ``text`` tokenized by the head; each head token's probability
        combines every member (a member is read after its last token ending at or before that byte)."""
        data = text.encode("utf-8")
        head = self.members[0]
        ids = head.canon.encode(head.stream(data))
        starts = np.cumsum([0] + [len(head.vocab.surfaces[t]) for t in ids])[:-1] - head.offset
        per = [self._logprobs_at(0, ids, list(range(len(ids))))]
        where = [list(range(len(ids)))]
        for k, m in enumerate(self.members[1:], start=1):
            mids = m.canon.encode(m.stream(data))
            ends = np.cumsum([0] + [len(m.vocab.surfaces[t]) for t in mids]) - m.offset
            rows = [int(np.searchsorted(ends, off, side="right")) - 1 for off in starts]
            where.append(rows)
            per.append(self._logprobs_at(k, mids, rows))
        total = 0.0
        for j, t in enumerate(ids):
            stacked = torch.stack([per[k][where[k][j]] for k in range(len(self.members))])
            total += float(self.combine(stacked, self.weights)[t])
        return total

    def bits_per_byte(self, text: str) -> float:
        return -self.logprob(text) / math.log(2) / len(text.encode("utf-8"))


def _pad_rows(P, n):
    import scipy.sparse as sp

    return sp.vstack([P, sp.csr_matrix((n - P.shape[0], P.shape[1]), dtype=P.dtype)]).tocsr()


def _pad_cols(P, n):
    import scipy.sparse as sp

    return sp.hstack([P, sp.csr_matrix((P.shape[0], n - P.shape[1]), dtype=P.dtype)]).tocsr()


__all__ = ["ENSEMBLE_MODES", "ByteEnsemble", "TokenEnsemble", "mix", "product", "register_mode", "EOT"]
