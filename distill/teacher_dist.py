"""The teacher's next-token distribution at selected positions, dense or top-k sparse.

Losses never touch teacher logits directly; they ask this view for what they
need, so a live teacher (dense logits, ``(N, V_t)``) and a teacher read back
from the top-k cache (``(N, k)`` ids + logits + the full log-partition) are
interchangeable:

- :meth:`TeacherDist.probs_at` — probabilities on a column set ``(N, K)``;
- :meth:`TeacherDist.column_mass` — ``(V_t,)`` mass summed over positions (top-k column choice);
- :meth:`TeacherDist.sorted_topk` — descending top-k probabilities and the mass left
  (ULD), optionally with some columns excluded;
- :meth:`TeacherDist.full_log_probs` / :meth:`TeacherDist.sparse_log_probs` (same-vocabulary KL).

Temperature. Dense: ``softmax(z / T)`` over the whole vocabulary. Cached: at
``T = 1`` the stored log-partition makes cached entries exact (the mass outside
the top-k is simply missing); at ``T ≠ 1`` the cached logits are renormalized
among themselves (the tail is unknown), a documented approximation.

Dense work is done in row blocks so that only ``block × V_t`` temporaries exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_BLOCK = 256


@dataclass
class TeacherDist:
    """Teacher distribution over ``V`` columns at ``N`` positions.

    Exactly one of ``logits`` (dense ``(N, V)``) or ``topk_ids``/``topk_logits``
    (``(N, k)``, sorted descending) with ``lse`` (``(N,)``, log-partition at T = 1) is set.
    """

    vocab_size: int
    temperature: float = 1.0
    logits: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # dense: the rows of ``logits`` this view covers (no copy made)

    def __post_init__(self):
        if (self.logits is None) == (self.topk_ids is None):
            raise ValueError("give either dense logits or top-k ids/logits")
        self._lse_t: torch.Tensor | None = None
        self._sparse_logp: torch.Tensor | None = None

    # -- basics ---------------------------------------------------------------------------------
    @property
    def dense(self) -> bool:
        return self.logits is not None

    @property
    def n(self) -> int:
        if self.dense:
            return int(self.logits.shape[0] if self.rows is None else self.rows.shape[0])
        return int(self.topk_ids.shape[0])

    @property
    def device(self) -> torch.device:
        return self.logits.device if self.dense else self.topk_ids.device

    def select(self, rows: torch.Tensor) -> "TeacherDist":
        """The same distribution at a subset of positions ``rows``."""
        if self.dense:  # rows are gathered block by block later: no (N, V) copy here
            rows = rows if self.rows is None else self.rows[rows]
            return TeacherDist(self.vocab_size, self.temperature, logits=self.logits, rows=rows)
        return TeacherDist(self.vocab_size, self.temperature, topk_ids=self.topk_ids[rows],
                           topk_logits=self.topk_logits[rows], lse=self.lse[rows])

    def _blocks(self):
        for i in range(0, self.n, ROW_BLOCK):
            yield i, min(i + ROW_BLOCK, self.n)

    def _z(self, a: int, b: int) -> torch.Tensor:
        """A fresh float32 copy of ``z / T`` for rows ``a..b`` of this view (safe to modify in place)."""
        idx = torch.arange(a, b, device=self.device) if self.rows is None else self.rows[a:b]
        z = self.logits.index_select(0, idx).float()
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    def lse_t(self) -> torch.Tensor:
        """``(N,)`` log-partition of ``z / T`` (dense only)."""
        if self._lse_t is None:
            self._lse_t = torch.cat([torch.logsumexp(self._z(a, b), dim=-1) for a, b in self._blocks()]) \
                if self.n else torch.zeros(0, device=self.device)
        return self._lse_t

    def _probs_block(self, a: int, b: int) -> torch.Tensor:
        """``(b-a, V)`` p_T for a row block (computes and caches the log-partition on the way)."""
        z = self._z(a, b)
        if self._lse_t is None:
            lse = torch.logsumexp(z, dim=-1)
            self._lse_parts.append(lse)
        else:
            lse = self._lse_t[a:b]
        return z.sub_(lse[:, None]).exp_()

    def _dense_pass(self):
        """Iterate ``(a, b, p_block)`` over all rows, filling the log-partition cache if needed."""
        fill = self._lse_t is None
        self._lse_parts = []
        for a, b in self._blocks():
            yield a, b, self._probs_block(a, b)
        if fill:
            self._lse_t = torch.cat(self._lse_parts) if self._lse_parts else torch.zeros(0, device=self.device)
        self._lse_parts = []

    def sparse_log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached view: ``(ids (N, k), log p_T (N, k))``."""
        if self.dense:
            raise ValueError("dense teacher: use full_log_probs")
        if self._sparse_logp is None:
            z = self.topk_logits.float()
            if self.temperature == 1.0:
                self._sparse_logp = z - self.lse.float()[:, None]
            else:
                self._sparse_logp = torch.log_softmax(z / self.temperature, dim=-1)
        return self.topk_ids, self._sparse_logp

    def full_log_probs(self) -> torch.Tensor:
        """``(N, V)`` log p_T (dense only)."""
        if not self.dense:
            raise ValueError("cached teacher: use sparse_log_probs")
        return torch.cat([torch.log_softmax(self._z(a, b), dim=-1) for a, b in self._blocks()]) if self.n else \
            torch.zeros(0, self.vocab_size, device=self.device)

    # -- views used by the losses ---------------------------------------------------------------
    @torch.no_grad()
    def probs_at(self, cols: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` probabilities p_T at columns ``cols`` (``(K,)`` distinct ids); not renormalized."""
        cols = cols.to(self.device)
        if self.dense:
            lse = self.lse_t()
            idx = torch.arange(self.n, device=self.device) if self.rows is None else self.rows
            z = self.logits[idx[:, None], cols[None, :]].float()
            if self.temperature != 1.0:
                z = z / self.temperature
            return torch.exp(z - lse[:, None])
        ids, logp = self.sparse_log_probs()
        where = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.device)
        where[cols] = torch.arange(len(cols), device=self.device)
        pos = where[ids]
        hit = pos >= 0
        out = torch.zeros(self.n, len(cols), device=self.device)
        out.scatter_add_(1, pos.clamp_min(0), torch.where(hit, logp.exp(), torch.zeros_like(logp)))
        return out

    @torch.no_grad()
    def column_mass(self) -> torch.Tensor:
        """``(V,)`` Σ over positions of p_T."""
        out = torch.zeros(self.vocab_size, device=self.device)
        if self.dense:
            for _, _, p in self._dense_pass():
                out += p.sum(0)
            return out
        ids, logp = self.sparse_log_probs()
        return out.index_add_(0, ids.reshape(-1), logp.exp().reshape(-1))

    @torch.no_grad()
    def masses(self, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: ``(V,)`` Σ over positions of p_T (as :meth:`column_mass`) and ``(N,)`` each row's mass on
        the columns where ``cols (V,)`` (bool) is True (a cached teacher: its cached entries only)."""
        out = torch.zeros(self.vocab_size, device=self.device)
        cols = cols.to(self.device)
        if self.dense:
            rows = torch.zeros(self.n, device=self.device)
            for a, b, p in self._dense_pass():
                out += p.sum(0)
                rows[a:b] = p @ cols.to(p.dtype)
            return out, rows
        ids, logp = self.sparse_log_probs()
        p = logp.exp()
        return out.index_add_(0, ids.reshape(-1), p.reshape(-1)), (p * cols[ids]).sum(-1)

    @torch.no_grad()
    def sorted_topk(self, k: int, exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Descending top-k probabilities and the remaining mass.

        Args:
            k: number of sorted entries (``0`` = the whole vocabulary, an exact sort).
            exclude: ``(V,)`` bool columns set to zero first (H-KL / GOLD "rest").

        Returns:
            ``(values (N, k'), tail (N,))`` with ``k' = min(k, V)`` (dense) or ``min(k, k_cache)``
            (cached) and ``tail`` = mass of the non-excluded columns outside the top-k.
        """
        if self.dense:
            kk = self.vocab_size if k <= 0 else min(k, self.vocab_size)
            vals, tails = [], []
            for _, _, p in self._dense_pass():
                if exclude is not None:
                    p = p.masked_fill(exclude[None, :], 0.0)
                v = torch.sort(p, dim=-1, descending=True).values if kk == self.vocab_size else torch.topk(p, kk, dim=-1).values
                vals.append(v)
                tails.append((p.sum(-1) - v.sum(-1)).clamp_min(0))
            if not vals:
                return torch.zeros(0, kk, device=self.device), torch.zeros(0, device=self.device)
            return torch.cat(vals), torch.cat(tails)
        ids, logp = self.sparse_log_probs()
        p = logp.exp()
        outside = (1.0 - p.sum(-1)).clamp_min(0)  # mass beyond the cached top-k (0 when renormalized)
        if exclude is not None:
            p = p.masked_fill(exclude[ids], 0.0)
            p = torch.sort(p, dim=-1, descending=True).values
        kk = p.shape[1] if k <= 0 else min(k, p.shape[1])
        v = p[:, :kk]
        return v, (p.sum(-1) - v.sum(-1)).clamp_min(0) + outside
