"""Row arithmetic of a transplant: new matrices from combination weights, the logit-bias direction.

:func:`build_matrix` writes the combinations ``coef @ old`` chunk by chunk straight into the
result, so a 262k-row head of an 8B model is built without a second copy of the whole matrix.
Copied rows stay bit-exact: the old rows arrive in their stored dtype, every float32 or float64
operand is an exact upcast of a column block of them, and copies are cast straight to the output dtype.

Sums are accumulated in :func:`accumulation_dtype` of the output: float64 when the output is
float32 (its rows, bit for bit, as they have always been), float32 when the output is 16-bit
(bfloat16 keeps 8 significant bits, float16 11: float32 sums carry 24, far more than the output
keeps, and read half the memory of float64 ones).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch

from surgery.transplant.methods import SRC_RANDOM

LOG = logging.getLogger(__name__)

_EXACT_STATS_BYTES = 1 << 30  # row statistics in one piece below this (float64) size, in chunks above


def accumulation_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """The dtype row sums are accumulated in for an ``out_dtype`` result: float64 for 32-bit (and wider)
    outputs, float32 for 16-bit ones."""
    return torch.float64 if out_dtype.itemsize >= 4 else torch.float32


def row_stats(w: torch.Tensor, rows: np.ndarray, chunk: int = 8192,
              acc: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std (``(d,)`` float64) of rows ``rows`` of ``w``.

    Small matrices in one piece (the exact float64 reduction); large ones in one pass over
    contiguous row chunks: sums of values and squares as products with a 0/1 row selector (a
    GEMV: 3x faster than ``sum(dtype=float64)`` of gathered rows on a 128k × 4096 matrix; work
    memory: one chunk), in ``acc`` within a chunk (float32 for 16-bit outputs: half the memory
    traffic) and in float64 across chunks.
    """
    if len(rows) * w.shape[1] * 8 <= _EXACT_STATS_BYTES:
        x = w.detach()[torch.as_tensor(rows)].double()
        return x.mean(0), x.std(0)
    sel = torch.zeros(w.shape[0], dtype=acc)
    sel[torch.as_tensor(rows)] = 1.0
    total = torch.zeros(w.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for a in range(0, w.shape[0], chunk):
        m = sel[a:a + chunk]
        if not bool(m.any()):
            continue
        x = w.detach()[a:a + chunk].to(acc, copy=True)  # squared in place below
        total += (m @ x).double()
        x.mul_(x)
        sq += (m @ x).double()
    n = len(rows)
    mean = total / n
    return mean, ((sq - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt()


_BLOCK_BYTES = 1024 * 1024**2  # one float64 column block of the old matrix (work memory of build_matrix)
_F32_BLOCK_BYTES = 512 * 1024**2  # one float32 column block of a 16-bit old matrix


def build_matrix(old: torch.Tensor, out_dtype: torch.dtype, coef, plan_src: np.ndarray, targets: np.ndarray,
                  copies: tuple, V_pad: int, base_rows: np.ndarray, gen: torch.Generator,
                  chunk: int = 8192) -> torch.Tensor:
    """New ``(V_pad, d)`` matrix: mean everywhere, copies bit for bit, combinations, random rows.

    Args:
        old: ``(V, d)`` old rows in any floating dtype (the stored one: no float32 copy of the whole
            matrix is needed; an 8B model's 128k × 4096 bf16 rows are 1 GB, their float32 upcast 2 GB).
        out_dtype: dtype of the result (the stored dtype: copies stay bit-exact).
        coef: ``(T, V)`` CSR combination weights of the ``T`` targets (float64).

    The combinations ``coef @ old`` are sums in :func:`accumulation_dtype` (scipy's CSR product:
    each element sums its products in the order of the row's entries, whatever the other columns),
    one column block of ``old`` at a time upcast to that dtype, every ``chunk`` of targets written
    straight into the result, the chunks shared among ``torch.get_num_threads()`` threads (the
    product releases the GIL; each row is the same whichever thread computes it).

    - float64 (float32 outputs): blocks of at most 1 GB of float64. Gathering the used rows per chunk
      instead upcast every row once per chunk that uses it (44 GB of float64 for the 169k Gemma-3
      targets of an 8B head, against 4.2 GB here); the sums, hence the rows, are the same.
    - float32 (16-bit outputs): a float32 ``old`` is the operand itself (no copy, whole rows), the
      weights rounded to float32; 3.6x faster than float64 blocks on an 8B head (one thread). A
      16-bit ``old`` is upcast in blocks of at most 512 MB.
    """
    V, d = old.shape
    acc = accumulation_dtype(out_dtype)
    mean, std = row_stats(old, base_rows, acc=acc)
    new = mean.to(out_dtype).expand(V_pad, d).clone()
    coef = sp.csr_matrix(coef, dtype=np.float64 if acc == torch.float64 else np.float32)
    parts = [(coef[s:s + chunk], torch.as_tensor(targets[s:s + chunk])) for s in range(0, coef.shape[0], chunk)]
    src = old.detach().cpu()
    if src.dtype == acc:
        width = d
    else:
        budget = _BLOCK_BYTES if acc == torch.float64 else _F32_BLOCK_BYTES
        width = max(1, min(d, budget // max(V * acc.itemsize, 1)))

    def combine(job) -> None:
        (part, rows), block, c = job
        comb = torch.from_numpy(np.asarray(part @ block, dtype=np.float32))
        new[rows, c:c + block.shape[1]] = comb.to(out_dtype)

    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="rows") as pool:
        for c in range(0, d if parts else 0, width):
            block = src[:, c:c + width].to(acc).contiguous().numpy()  # (V, width): src itself when it is acc, whole
            list(pool.map(combine, [(p, block, c) for p in parts]))
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


def _fitted(H: torch.Tensor, texts: list[str], max_tokens: int,
            dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    from surgery.transplant.calibration import bias_direction

    delta, fit = bias_direction(H)
    fit["source"] = "texts" if texts else "sampled"
    if max_tokens < 384:
        fit["max_tokens_per_text"] = max_tokens
    if dtype != torch.float32:
        fit["forward_dtype"] = str(dtype).replace("torch.", "")
    LOG.info("bias direction fitted on %d positions: %s", H.shape[0], fit)
    return delta, fit


def fit_bias_direction(model, old_tok, cfg) -> tuple[torch.Tensor, dict]:
    """Fit the logit-bias direction of the (still unmodified) in-memory model on calibration text."""
    from surgery.transplant.calibration import head_inputs

    texts, max_tokens = calibration_plan(cfg)
    return _fitted(head_inputs(model, old_tok, texts, max_tokens=max_tokens), texts, max_tokens)


def calibration_dtype(store: torch.dtype, capped: bool) -> torch.dtype:
    """Dtype of a streamed calibration forward: bfloat16 for a bfloat16 checkpoint whose calibration is
    capped (a large model, a few tokens per text), float32 otherwise.

    In bfloat16 the weights are used as stored (no float32 copy of each layer) and the products run
    on bfloat16 kernels: the 119-position forward of an 8B body takes 17 s instead of 40 s, with
    the same fit to four digits (direction cosine 0.9995 to the float32 one). Uncapped calibrations
    (small models) and float32 or float16 checkpoints keep float32: the states of the in-memory
    float32 forward, bit for bit.
    """
    return torch.bfloat16 if store == torch.bfloat16 and capped else torch.float32


def streamed_bias_fn(skeleton, reader, old_tok, cfg, in_rows: torch.Tensor, store: torch.dtype = torch.float32):
    """``bias_fn`` for :func:`compute_rows` that runs the checkpoint one decoder layer at a time.

    Only the embedding rows of the calibration tokens are kept (copied now, ids renumbered: the
    same lookups, so the same states): the caller may free the ``(V, d)`` rows while the forward
    runs beside the rest of the transplant (2 GB of an 8B model's peak). The forward runs in
    :func:`calibration_dtype` of the stored dtype ``store``.

    Args:
        in_rows: ``(V, d)`` input embedding rows (float32, an exact upcast of the stored ones).

    Returns:
        ``fn() -> (δ, fit) | None``.
    """
    from surgery.transplant.streaming import LayerStreamer, calibration_positions, layer_parameter_count

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = calibration_plan(cfg, max_positions=calibration_positions(layer_parameter_count(skeleton)))
    if plan is None:
        return lambda: None
    texts, max_tokens = plan
    dtype = calibration_dtype(store, max_tokens < 384)
    seqs = calibration_sequences(old_tok, texts, max_tokens, "cpu")
    used, inverse = torch.unique(torch.cat([s.reshape(-1) for s in seqs]), return_inverse=True)
    rows = in_rows[used].to(dtype)  # (U, d), a copy
    local, at = [], 0
    for s in seqs:
        local.append(inverse[at:at + s.shape[1]].reshape(1, -1).to(device))
        at += s.shape[1]

    def fn():
        with LayerStreamer(skeleton, reader, rows, device=device, dtype=dtype) as ls:
            H = ls.head_inputs(local)
            LOG.info("streamed calibration (%s): %d decoder-layer reads", dtype, ls.layer_reads)
        return _fitted(H, texts, max_tokens, dtype)

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
