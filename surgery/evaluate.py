"""Bits per byte: the tokenizer-neutral yardstick for every comparison across vocabularies.

Definition. The text is encoded without special tokens. One *document-start*
token is placed in front: the tokenizer's BOS if it has one, else its EOS (the
GPT-2 convention for a document boundary), else nothing. That token is context
only; every text token is scored. bits/byte = Σ −log₂ p(token) / len(text.encode()).

Windowing. Sequences longer than ``max_length`` tokens are scored with
overlapping windows: each window holds up to ``max_length`` tokens and scores
only the tokens no earlier window scored, so each scored token sees at least
``max_length − stride`` tokens of context (except at the start). Windows are
batched. With ``stride = max_length`` windows do not overlap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from surgery.errors import ConfigError, SurgeryError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalOptions:
    """Numeric options of :func:`bits_per_byte` (checked before any model is loaded)."""

    max_length: int = 1024
    stride: int | None = None
    batch_size: int = 4

    def validate(self) -> list[str]:
        """Every problem with the options (empty when they are valid)."""
        problems = []
        if self.max_length < 2:
            problems.append(f"--max-length must be >= 2 tokens (one of context, one scored), got {self.max_length}")
        if self.stride is not None and not 1 <= self.stride <= max(self.max_length, 1):
            problems.append(f"--stride must be in [1, --max-length={self.max_length}], got {self.stride}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        return problems

    def check(self) -> "EvalOptions":
        """Raise :class:`ConfigError` listing every problem; return ``self`` when valid."""
        problems = self.validate()
        if problems:
            raise ConfigError(problems, "pass a window of at least 2 tokens and a stride no larger than it")
        return self


@dataclass(frozen=True)
class BpbResult:
    """Result of :func:`bits_per_byte`."""

    bits_per_byte: float
    nll_nats: float
    n_bytes: int
    n_tokens: int
    n_windows: int
    max_length: int
    stride: int
    lossless: bool

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["bytes_per_token"] = self.bytes_per_token
        return d


def document_start_id(tokenizer) -> int | None:
    """The token every evaluated text is conditioned on (BOS, else EOS, else none)."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return None


def _windows(n: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence of ``n`` ids as ``(begin, end, first_scored)``; position 0 is never scored."""
    out = []
    scored_to = 1  # next target position to score
    while scored_to < n:
        end = min(scored_to + stride, n) if out else min(max_length, n)
        begin = max(0, end - max_length)
        out.append((begin, end, scored_to))
        scored_to = end
    return out


@torch.no_grad()
def token_nll(model, ids: list[int], max_length: int = 1024, stride: int | None = None, batch_size: int = 4,
              progress: bool = True, desc: str = "scoring") -> tuple[torch.Tensor, int]:
    """Next-token NLL (nats) of ``ids[1:]`` given everything before, with windowing.

    Args:
        ids: full sequence (first id is context only), length N.

    Returns:
        ``(nll, n_windows)`` with ``nll`` of shape ``(N-1,)``.
    """
    n = len(ids)
    stride = stride or max(1, max_length // 2)
    stride = min(stride, max_length - 1) if max_length > 1 else 1
    wins = _windows(n, max_length, stride)
    device = next(model.parameters()).device
    seq = torch.tensor(ids, dtype=torch.long)
    nll = torch.full((max(n - 1, 0),), float("nan"), dtype=torch.float64)
    bar = tqdm(total=len(wins), desc=desc, disable=not progress, leave=False)
    for i in range(0, len(wins), batch_size):
        group = wins[i:i + batch_size]
        L = max(e - b for b, e, _ in group)
        inp = torch.zeros(len(group), L, dtype=torch.long)
        att = torch.zeros(len(group), L, dtype=torch.long)
        for j, (b, e, _) in enumerate(group):
            inp[j, : e - b] = seq[b:e]
            att[j, : e - b] = 1
        logits = model(input_ids=inp.to(device), attention_mask=att.to(device)).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        for j, (b, e, s) in enumerate(group):
            # target positions s..e-1 are predicted by positions s-1..e-2 (window-relative: s-b-1..)
            tgt = seq[s:e].to(device)
            lp = logp[j, s - b - 1 : e - b - 1].gather(-1, tgt[:, None])[:, 0]
            nll[s - 1 : e - 1] = (-lp).double().cpu()
        bar.update(len(group))
    bar.close()
    return nll, len(wins)


def bits_per_byte(model, tokenizer, text: str, max_length: int = 1024, stride: int | None = None,
                  batch_size: int = 4, progress: bool = True) -> BpbResult:
    """Bits per UTF-8 byte of ``text`` under a causal LM (see module docstring)."""
    if not text:
        raise ValueError("empty text")
    EvalOptions(max_length, stride, batch_size).check()
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        max_length = min(max_length, int(max_pos))
    enc = tokenizer(text, add_special_tokens=False)["input_ids"]
    lossless = tokenizer.decode(enc, clean_up_tokenization_spaces=False) == text
    if not lossless:
        LOG.warning("tokenizer does not round-trip this text; bits/byte still counts the original bytes")
    start = document_start_id(tokenizer)
    ids = ([start] if start is not None else []) + list(enc)
    first_scored_free = start is None  # without a start token the first text token cannot be scored
    nll, n_win = token_nll(model, ids, max_length, stride, batch_size, progress)
    total = float(nll.sum())
    if not math.isfinite(total):
        bad = int((~torch.isfinite(nll)).sum())
        first = int(torch.nonzero(~torch.isfinite(nll))[0, 0]) + 1 if bad else -1
        raise SurgeryError(
            f"the model gives non-finite log-probabilities (NaN or inf) for {bad} of {len(nll)} tokens "
            f"(first at token {first}); no bits/byte figure is reported",
            "check the checkpoint for NaN/inf weights, or evaluate in float32",
        )
    if first_scored_free:
        LOG.warning("tokenizer has neither BOS nor EOS: the first token is not scored")
    n_bytes = len(text.encode("utf-8"))
    stride_eff = stride or max(1, max_length // 2)
    return BpbResult(total / math.log(2) / n_bytes, total, n_bytes, len(enc), n_win, max_length, stride_eff, lossless)
