"""Row arithmetic of a transplant: new matrices from combination weights, the logit-bias direction.

:func:`build_matrix` writes the combinations ``coef @ old`` block by block straight into the
result (work memory: the result plus one float64 column block of the old rows), so a 262k-row
head of an 8B model is built without float64 copies of the whole matrix. Copied rows stay
bit-exact: the old rows arrive as exact float32 upcasts and are cast back to the stored dtype.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import scipy.sparse as sp
import torch

from surgery.transplant.methods import SRC_RANDOM

LOG = logging.getLogger(__name__)

_EXACT_STATS_BYTES = 1 << 30  # row statistics in one piece below this (float64) size, in chunks above


def row_stats(w: torch.Tensor, rows: np.ndarray, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (``(d,)`` float64) of rows ``rows`` of ``w``.

    Small matrices in one piece (the exact float64 reduction); large ones in one pass over
    contiguous row chunks: float64 sums of values and squares as products with a 0/1 row
    selector (a GEMV: 3x faster than ``sum(dtype=float64)`` of gathered rows on a 128k × 4096
    matrix; work memory: one float64 chunk).
    """
    if len(rows) * w.shape[1] * 8 <= _EXACT_STATS_BYTES:
        x = w.detach()[torch.as_tensor(rows)].double()
        return x.mean(0), x.std(0)
    sel = torch.zeros(w.shape[0], dtype=torch.float64)
    sel[torch.as_tensor(rows)] = 1.0
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for a in range(0, w.shape[0], chunk):
        m = sel[a:a + chunk]
        if not bool(m.any()):
            continue
        x = w.detach()[a:a + chunk].double()
        total += m @ x
        x.mul_(x)
        sq += m @ x
    n = len(rows)
    mean = total / n
    return mean, ((sq - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()


_BLOCK_BYTES = 1024 * 1024**2  # one float64 column block of the old matrix (work memory of build_matrix)


def build_matrix(old: torch.Tensor, out_dtype: torch.dtype, coef, plan_src: np.ndarray, targets: np.ndarray,
                  copies: tuple, V_pad: int, base_rows: np.ndarray, gen: torch.Generator,
                  chunk: int = 8192) -> torch.Tensor:
    """New ``(V_pad, d)`` matrix: mean everywhere, copies bit for bit, combinations, random rows.

    Args:
        old: ``(V, d)`` float32 old rows (an exact upcast of the stored ones).
        out_dtype: dtype of the result (the stored dtype: copies stay bit-exact).
        coef: ``(T, V)`` CSR combination weights of the ``T`` targets (float64).

    The combinations ``coef @ old`` are float64 sums (scipy's CSR product: each element sums its
    products in the order of the row's entries), computed one column block of ``old`` at a time:
    each block is upcast to float64 once (at most 1 GB), then every ``chunk`` of targets is
    combined from it and written straight into the result. Gathering the used rows per chunk
    instead upcast every row once per chunk that uses it (44 GB of float64 for the 169k Gemma-3
    targets of an 8B head, against 4.2 GB here); the sums, hence the rows, are the same.
    """
    V, d = old.shape
    mean, std = row_stats(old, base_rows)
    new = mean.to(out_dtype).expand(V_pad, d).clone()
    coef = sp.csr_matrix(coef)
    dt = getattr(torch, np.result_type(coef.dtype, np.float32).name)
    parts = [(coef[s:s + chunk], torch.as_tensor(targets[s:s + chunk])) for s in range(0, coef.shape[0], chunk)]
    width = max(1, min(d, _BLOCK_BYTES // max(V * torch.empty(0, dtype=dt).element_size(), 1)))
    src = old.detach().float().cpu()
    for c in range(0, d if parts else 0, width):
        block = src[:, c:c + width].to(dt).numpy()  # (V, width), contiguous
        for part, rows in parts:
            comb = torch.from_numpy(np.asarray(part @ block).astype(np.float32))
            new[rows, c:c + width] = comb.to(out_dtype)
        del block
    rnd = plan_src == SRC_RANDOM
    if rnd.any():  # rows with nothing to combine: N(mean, std), as float32 rows
        rnd_rows = (torch.randn(int(rnd.sum()), d, generator=gen, dtype=torch.float64) * std + mean).float()
        new[torch.as_tensor(targets[rnd])] = rnd_rows.to(out_dtype)
    for new_ids, old_ids in copies:  # last: copies are never overwritten and stay bit-exact
        if len(new_ids):
            new[torch.as_tensor(new_ids)] = old.detach()[torch.as_tensor(old_ids)].to(out_dtype)
    return new


def calibration_sequences(tokenizer, texts: list[str], max_tokens: int, device) -> list[torch.Tensor]:
    """``(1, L)`` token ids per text, as :func:`surgery.transplant.calibration.head_inputs` feeds them."""
    from surgery.evaluate import document_start_id

    start = document_start_id(tokenizer)
    return [torch.tensor([([start] if start is not None else [])
                          + tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]], device=device)
            for t in texts]


def calibration_plan(cfg, max_positions: int | None = None) -> tuple[list[str], int] | None:
    """``(texts, max_tokens per text)`` of the bias-direction fit.

    ``max_positions`` caps the positions of a costly (streamed) forward; such a forward has no
    text-free fallback (sampling would stream every layer once per token): ``None`` then.
    """
    from surgery.transplant.calibration import default_calibration_texts

    if cfg.calibration_texts:
        from surgery.textio import read_texts

        texts = [t[:4000] for t in read_texts(cfg.calibration_texts)]
    else:
        texts = default_calibration_texts()
    max_tokens = 384
    if max_positions is not None:
        if not texts:
            LOG.warning("no calibration texts for a streamed model: logit offsets skipped (pass --calibration-text)")
            return None
        max_tokens = max(16, min(384, max_positions // len(texts)))
        if max_tokens < 384:
            LOG.info("large model: calibration capped at %d tokens per text (%d texts)", max_tokens, len(texts))
    return texts, max_tokens


def _fitted(H: torch.Tensor, texts: list[str], max_tokens: int) -> tuple[torch.Tensor, dict]:
    from surgery.transplant.calibration import bias_direction

    delta, fit = bias_direction(H)
    fit["source"] = "texts" if texts else "sampled"
    if max_tokens < 384:
        fit["max_tokens_per_text"] = max_tokens
    LOG.info("bias direction fitted on %d positions: %s", H.shape[0], fit)
    return delta, fit


def fit_bias_direction(model, old_tok, cfg) -> tuple[torch.Tensor, dict]:
    """Fit the logit-bias direction of the (still unmodified) in-memory model on calibration text."""
    from surgery.transplant.calibration import head_inputs

    texts, max_tokens = calibration_plan(cfg)
    return _fitted(head_inputs(model, old_tok, texts, max_tokens=max_tokens), texts, max_tokens)


def streamed_bias_fn(skeleton, reader, old_tok, cfg, in_rows: torch.Tensor):
    """``bias_fn`` for :func:`compute_rows` that runs the checkpoint one decoder layer at a time.

    Only the embedding rows of the calibration tokens are kept (copied now, ids renumbered: the
    same lookups, so the same states): the caller may free the ``(V, d)`` rows while the forward
    runs beside the rest of the transplant (2 GB of an 8B model's peak).

    Args:
        in_rows: ``(V, d)`` input embedding rows, in the dtype of the forward (float32).

    Returns:
        ``fn() -> (δ, fit) | None``.
    """
    from surgery.transplant.streaming import LayerStreamer, calibration_positions, layer_parameter_count

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = calibration_plan(cfg, max_positions=calibration_positions(layer_parameter_count(skeleton)))
    if plan is None:
        return lambda: None
    texts, max_tokens = plan
    seqs = calibration_sequences(old_tok, texts, max_tokens, "cpu")
    used, inverse = torch.unique(torch.cat([s.reshape(-1) for s in seqs]), return_inverse=True)
    rows = in_rows[used].clone()  # (U, d)
    local, at = [], 0
    for s in seqs:
        local.append(inverse[at:at + s.shape[1]].reshape(1, -1).to(device))
        at += s.shape[1]

    def fn():
        with LayerStreamer(skeleton, reader, rows, device=device) as ls:
            H = ls.head_inputs(local)
            LOG.info("streamed calibration: %d decoder-layer reads", ls.layer_reads)
        return _fitted(H, texts, max_tokens)

    return fn


class BackgroundCall:
    """``fn()`` started now in a daemon thread (named ``name``); :meth:`result` waits for it and
    re-raises its error.

    The calibration forward of a large checkpoint and the body writer are bound by reading and
    writing the body (16 GB for 8B shapes), the init method by arithmetic: started before the
    method, they run beside it.
    """

    def __init__(self, fn, name: str = "calibration"):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by result() in the caller's thread
            self._error = e

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value
