"""``hidden`` — the student's final hidden states matched to the teacher's at aligned chunk ends.

When the student *is* the teacher's body with a new vocabulary (a transplant healing from its base model),
the two models share what the body computes, not only what it predicts. At the end of every aligned chunk
(:mod:`distill.chunks`: a byte where both tokenizations end a token) both models have read exactly the same
bytes, and the hidden state that enters the head there says what comes next. The student's head keeps the
base's rows for every token the two vocabularies share, so a student whose final hidden state equals the
base's at a chunk end gives those tokens the base's logits there. The signal:

``ℓ = Σ_c ‖h_s(c) − h_t(c)‖² / Σ_c ‖h_t(c)‖²``

over the chunks ``c`` of the batch (``h(c)``: the final hidden state, the head's input, at the chunk's last
token on each side): a relative squared error, one ``d``-vector per chunk instead of one number (``alm``),
and no pass over either vocabulary (the teacher's head can even be skipped). It needs a live teacher with
the student's hidden size (its own base model); the top-k cache holds no hidden states.

Balancing by gradient (``loss.rescale_by=gradient``): the term reaches the head's input ``h`` but not the
logits, so it is scaled to pull ``h`` as hard as the cross-entropy, ``‖∂CE/∂h‖ / ‖∂ℓ/∂h‖``. Computing
``∂CE/∂h`` costs a second backward pass through the head (a ``V × d`` product); :class:`HiddenBalance`
computes it exactly on the first step and from then on reads both parts off the step's own backward pass
(hooks on ``h`` and on the chunk-end rows), using the previous step's ratio.
"""

from __future__ import annotations

import numpy as np
import torch

from distill.losses.base import ChunkedBatch, KDLoss, register_loss


def chunk_last_tokens(token_chunks: np.ndarray, n_chunks: int) -> np.ndarray:
    """``(C,)`` flat index (into ``token_chunks.reshape(-1)``) of each chunk's last token; ``-1`` for none.

    Args:
        token_chunks: ``(B, L)`` chunk id per token (``ChunkAlignment.chunk_a`` / ``chunk_b``, ``-1`` none).
    """
    flat = np.asarray(token_chunks).reshape(-1)
    out = np.full(n_chunks, -1, dtype=np.int64)
    ok = flat >= 0
    np.maximum.at(out, flat[ok], np.flatnonzero(ok))
    return out


@register_loss("hidden")
class HiddenLoss(KDLoss):
    """Relative squared error of final hidden states at chunk ends (module docstring)."""

    needs = "none"
    reads_student = "hidden"  # ChunkedBatch.student_hidden / teacher_hidden, nothing of the logits
    t_squared = False

    def __init__(self, params, ctx):
        super().__init__(params, ctx)
        self.balance = HiddenBalance()

    def forward(self, batch: ChunkedBatch) -> torch.Tensor:
        if batch.student_hidden is None or batch.teacher_hidden is None:
            raise ValueError("loss 'hidden' needs ChunkedBatch.student_hidden and teacher_hidden")
        hs = batch.student_hidden.float()
        ht = batch.teacher_hidden.float().to(hs.device)
        if hs.shape != ht.shape:
            raise ValueError(f"loss 'hidden': student and teacher hidden states differ in shape ({tuple(hs.shape)} "
                             f"vs {tuple(ht.shape)}); it needs a teacher with the student's hidden size")
        return (hs - ht).square().sum() / ht.square().sum().clamp_min(1e-12)


class HiddenBalance:
    """The scale ``‖∂CE/∂h‖ / ‖∂ℓ/∂h‖`` of a ``hidden`` term, exact on the first step, then lagged by one step."""

    def __init__(self):
        self.scale: float | None = None

    def apply(self, ce: torch.Tensor, kd: torch.Tensor, h: torch.Tensor, rows: torch.Tensor,
              h_rows: torch.Tensor) -> torch.Tensor:
        """``kd`` times the current scale; hooks measure this step's ratio for the next one.

        Args:
            ce: the student's cross-entropy (its graph passes through ``h``).
            kd: the unscaled ``hidden`` term, computed from ``h_rows``.
            h: ``(B, L, d)`` the head's input (with grad).
            rows: ``(C,)`` flat row indices of ``h`` that ``h_rows = h.reshape(-1, d)[rows]`` took.
            h_rows: ``(C, d)``.
        """
        if not (kd.requires_grad and h.requires_grad):
            return kd
        if self.scale is None:
            g_ce = torch.autograd.grad(ce, h, retain_graph=True)[0].norm()
            g_kd = torch.autograd.grad(kd, h, retain_graph=True)[0].norm()
            if float(g_kd) == 0:
                return kd  # nothing to balance yet (no chunk)
            self.scale = float(g_ce / g_kd)
        used = self.scale
        seen: dict[str, torch.Tensor] = {}

        def on_rows(g):
            seen["kd"] = g.detach()

        def on_h(g):
            g = g.detach().reshape(-1, g.shape[-1])
            kd_part = seen.get("kd")
            if kd_part is None:
                return
            at = g[rows]
            ce_sq = g.square().sum() - at.square().sum() + (at - kd_part).square().sum()
            kd_norm = kd_part.norm() / used
            if float(kd_norm) > 0:
                self.scale = float(ce_sq.clamp_min(0).sqrt() / kd_norm)

        h_rows.register_hook(on_rows)
        h.register_hook(on_h)
        return kd * used
