"""The exact neighbour search of TokenAdapt's global estimate, cached on disk.

The search (distinct aux vectors of the new tokens against those of the old ones: 108k × 77k
products of 384 dimensions for Gemma-3 into a Llama-3 model) depends on the two vocabularies and
the aux model only, never on the checkpoint: transplanting one tokenizer into several models of a
family (1B, 8B, 70B share Llama-3's vocabulary) repeats it exactly. Its answer is stored beside the
aux embeddings, under a name made of the SHA-256 of both operands and ``k``; a file that does not
match (other shapes, ids out of range, unreadable) is ignored with a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

LOG = logging.getLogger(__name__)

FORMAT = "tokensurgery-neighbours/1"


def search_key(queries: np.ndarray, keys: np.ndarray, k: int) -> str:
    """SHA-256 of the search: both ``(Q, D)`` / ``(K, D)`` float32 operands (bytes and shapes) and ``k``."""
    h = hashlib.sha256(json.dumps([FORMAT, list(queries.shape), list(keys.shape), int(k)]).encode())
    for a in (queries, keys):
        h.update(memoryview(np.ascontiguousarray(a, dtype=np.float32)).cast("B"))
    return h.hexdigest()


def cache_file(folder: str | Path, key: str) -> Path:
    return Path(folder) / f"neighbours-{key[:32]}.npz"


def read(folder: str | Path, key: str, n_queries: int, n_keys: int, k: int):
    """``(scores (Q, k) float32, idx (Q, k) int64)`` from the cache, or ``None``."""
    path = cache_file(folder, key)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta, scores, idx = json.loads(str(z["meta"])), z["scores"], z["idx"].astype(np.int64)
    except Exception as e:  # truncated or corrupt: recomputed, never trusted
        LOG.warning("neighbour cache %s is unreadable (%s: %s); searching again", path, type(e).__name__, e)
        return None
    if meta != {"format": FORMAT, "key": key} or scores.shape != (n_queries, k) or idx.shape != (n_queries, k) \
            or scores.dtype != np.float32 or (idx.size and (idx.min() < 0 or idx.max() >= n_keys)):
        LOG.warning("neighbour cache %s does not match this search; searching again", path)
        return None
    return scores, idx


def write(folder: str | Path, key: str, scores: np.ndarray, idx: np.ndarray) -> None:
    """Store a search result (atomically: a temporary file renamed); failures only warn."""
    path = cache_file(folder, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps({"format": FORMAT, "key": key})),
                     scores=np.ascontiguousarray(scores, dtype=np.float32), idx=np.asarray(idx, dtype=np.int32))
        os.replace(tmp, path)
    except OSError as e:
        LOG.warning("could not write the neighbour cache %s (%s)", path, e)
        tmp.unlink(missing_ok=True)
