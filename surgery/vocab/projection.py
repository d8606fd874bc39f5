"""Sparse projection matrices between two vocabularies (X-Token, arXiv 2605.21699).

``W`` has shape ``(V_a, V_b)``: one sparse row per token of vocabulary *a*
(for distillation: a = student, b = teacher). Rows are built in this order:

1. **exact**: tokens with identical canonical bytes → weight 1.0, nothing else on the row;
2. **special**: special tokens matched by role (chat-marker aliases, then the
   normalized name, then bos/eos/pad/...);
3. **decompose**: the a-token's bytes re-encoded mid-text by tokenizer b, at most
   ``max_pieces`` pieces with weights ``0.9·0.1^i`` normalized; plus the reverse
   pass (each b-token re-encoded by tokenizer a adds the same weights into
   ``W[a_piece_i, b_token]``); rows renormalized, the ``top_k`` largest entries kept,
   renormalized again;
4. **unmapped**: rows with nothing (no surface and no role match, or bytes no b
   token can express) stay zero and are listed in :attr:`Projection.unmapped`.

Only ids the tokenizers emit take part (:mod:`surgery.vocab.identity`): a never-emitted
twin of a (``<0x2C>`` beside ``,`` in a byte-fallback vocabulary) keeps an empty row of
kind ``never_emitted``, and no entry lands in the column of a never-emitted id of b;
its probability belongs to the emitted twin. Decompositions come from
:func:`surgery.vocab.pieces.decompose`.

Everything is built from index arrays with numpy/scipy; no dense ``V_a × V_b``
array is ever formed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp

from surgery.config import Config
from surgery.vocab.pieces import coef_matrix, decompose
from surgery.vocab.surfaces import Vocabulary

LOG = logging.getLogger(__name__)

KIND_UNMAPPED, KIND_EXACT, KIND_DECOMPOSED, KIND_SPECIAL, KIND_NEVER_EMITTED = 0, 1, 2, 3, 4
KIND_NAMES = {KIND_UNMAPPED: "unmapped", KIND_EXACT: "exact", KIND_DECOMPOSED: "decomposed", KIND_SPECIAL: "special",
              KIND_NEVER_EMITTED: "never_emitted"}
_ROLE_ORDER = ("bos", "eos", "pad", "mask", "sep", "cls", "unk")


@dataclass(frozen=True)
class ProjectionConfig(Config):
    """Parameters of :func:`build_projection` (defaults of the X-Token reference)."""

    max_pieces: int = field(default=4, metadata={"help": "re-encoding keeps at most this many pieces"})
    first_weight: float = field(default=0.9, metadata={"help": "weight of the first piece before normalizing"})
    decay: float = field(default=0.1, metadata={"help": "piece i gets first_weight * decay**i"})
    reverse: bool = field(default=True, metadata={"help": "add the b→a re-encodings into W"})
    top_k: int = field(default=32, metadata={"help": "entries kept per row (0 = all)"})
    specials: bool = field(default=True, metadata={"help": "match special tokens by role"})

    def validate(self) -> list[str]:
        problems = []
        if self.max_pieces < 1:
            problems.append(f"max_pieces must be >= 1, got {self.max_pieces}")
        if not 0 < self.first_weight:
            problems.append(f"first_weight must be > 0, got {self.first_weight}")
        if not 0 <= self.decay <= 1:
            problems.append(f"decay must be in [0, 1], got {self.decay}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        return problems


@dataclass(frozen=True, eq=False)
class Projection:
    """A built projection.

    Attributes:
        matrix: ``(V_a, V_b)`` CSR float32; each mapped row sums to 1.
        kind: ``(V_a,)`` int8 row kinds (``KIND_*``).
        hash_a, hash_b: tokenizer hashes of the two vocabularies.
        config: the :class:`ProjectionConfig` used.
        seconds: build time.
    """

    matrix: sp.csr_matrix
    kind: np.ndarray
    hash_a: str
    hash_b: str
    config: ProjectionConfig
    seconds: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def unmapped(self) -> np.ndarray:
        """Ids of a whose row is empty."""
        return np.flatnonzero(self.kind == KIND_UNMAPPED)

    def counts(self) -> dict[str, int]:
        return {name: int((self.kind == k).sum()) for k, name in KIND_NAMES.items()}

    def metadata(self) -> dict:
        return {"hash_a": self.hash_a, "hash_b": self.hash_b, "shape": list(self.shape),
                "method": "xtoken", "config": asdict(self.config), "counts": self.counts()}


def piece_weights(n: int, first_weight: float = 0.9, decay: float = 0.1) -> np.ndarray:
    """``(n,)`` weights ``first_weight·decay^i`` normalized to sum 1."""
    w = first_weight * decay ** np.arange(n, dtype=np.float64)
    return w / w.sum()


def exact_pairs(va: Vocabulary, vb: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Emitted ids of a and b with identical canonical bytes.

    The b side is the id b's tokenizer emits for those bytes (:attr:`Vocabulary.surface_to_id`);
    never-emitted ids of a get no pair (their emitted twin has it).

    Returns:
        ``(ids_a, ids_b)`` int64 arrays of equal length, sorted by ``ids_a``.
    """
    s2i = vb.surface_to_id
    emitted = va.is_emitted
    ia, ib = [], []
    for i, s in enumerate(va.surfaces):
        if s is not None and emitted[i]:
            j = s2i.get(s)
            if j is not None:
                ia.append(i)
                ib.append(j)
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)


def _role_candidates(roles: tuple[str, ...]) -> list[str]:
    alias = [r for r in roles if ":" not in r and r not in _ROLE_ORDER]
    names = [r for r in roles if r.startswith("special:")]
    std = [r for r in _ROLE_ORDER if r in roles]
    return alias + names + std


def special_pairs(va: Vocabulary, vb: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """Special tokens of a matched to special tokens of b by role (see module docstring)."""
    by_role: dict[str, int] = {}
    for j in sorted(vb.roles):
        for r in vb.roles[j]:
            by_role.setdefault(r, j)
    ia, ib = [], []
    for i in sorted(va.roles):
        for r in _role_candidates(va.roles[i]):
            if r in by_role:
                ia.append(i)
                ib.append(by_role[r])
                break
    return np.asarray(ia, dtype=np.int64), np.asarray(ib, dtype=np.int64)


def decomposition_entries(src: Vocabulary, dst: Vocabulary, ids: np.ndarray, cfg: ProjectionConfig
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``src`` tokens ``ids`` split into ``dst`` pieces, weighted by position.

    Returns:
        ``(src_ids, dst_ids, weights)``, one entry per piece (at most ``cfg.max_pieces`` per token).
    """
    pieces = decompose(src, dst, ids).truncate(cfg.max_pieces)
    table = np.zeros((cfg.max_pieces + 1, cfg.max_pieces), dtype=np.float64)
    for n in range(1, cfg.max_pieces + 1):
        table[n, :n] = piece_weights(n, cfg.first_weight, cfg.decay)
    w = table[np.repeat(pieces.counts, pieces.counts), pieces.position]
    return np.asarray(ids, dtype=np.int64)[pieces.owner], pieces.ids, w


def _top_k_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the ``k`` largest entries of each row (ties → lower column id)."""
    if k <= 0:
        return m
    coo = m.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))
    r, c, d = coo.row[order], coo.col[order], coo.data[order]
    counts = np.bincount(r, minlength=m.shape[0])
    rank = np.arange(len(r)) - np.repeat(np.cumsum(counts) - counts, counts)
    keep = rank < k
    return sp.csr_matrix((d[keep], (r[keep], c[keep])), shape=m.shape)


def _normalize_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    sums = np.asarray(m.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)
    return sp.csr_matrix(sp.diags(inv) @ m)


def build_projection(va: Vocabulary, vb: Vocabulary, config: ProjectionConfig | None = None) -> Projection:
    """Build the sparse projection ``W`` of shape ``(V_a, V_b)`` (see module docstring).

    Args:
        va: canonical vocabulary of a (rows; the student in distillation).
        vb: canonical vocabulary of b (columns; the teacher).
        config: parameters; defaults follow the X-Token reference.

    Returns:
        A :class:`Projection`.
    """
    cfg = config or ProjectionConfig()
    t0 = time.time()
    Va, Vb = len(va), len(vb)
    kind = np.zeros(Va, dtype=np.int8)

    ea, eb = exact_pairs(va, vb)
    kind[ea] = KIND_EXACT
    sa, sb = (special_pairs(va, vb) if cfg.specials else (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    kind[sa] = KIND_SPECIAL
    LOG.info("exact: %d, special: %d (%.1fs)", len(ea), len(sa), time.time() - t0)

    has_surface = np.fromiter((s is not None for s in va.surfaces), dtype=bool, count=Va)
    kind[has_surface & ~va.is_emitted] = KIND_NEVER_EMITTED
    need = np.flatnonzero(has_surface & (kind == KIND_UNMAPPED))
    r1, c1, w1 = decomposition_entries(va, vb, need, cfg)
    rows, cols, vals = [r1], [c1], [w1]
    if cfg.reverse:
        b_surface = np.fromiter((s is not None for s in vb.surfaces), dtype=bool, count=Vb)
        b_ids = np.flatnonzero(b_surface & vb.is_emitted)
        c2, r2, w2 = decomposition_entries(vb, va, b_ids, cfg)
        free = kind[r2] == KIND_UNMAPPED  # exact and special rows stay one-hot
        rows.append(r2[free]); cols.append(c2[free]); vals.append(w2[free])
    LOG.info("decompositions done (%.1fs)", time.time() - t0)
    r = np.concatenate(rows); c = np.concatenate(cols); v = np.concatenate(vals)
    dec = coef_matrix(r, c, v, (Va, Vb))
    dec = _normalize_rows(_top_k_rows(_normalize_rows(dec), cfg.top_k))
    nnz_rows = np.diff(dec.indptr) > 0
    kind[nnz_rows & (kind == KIND_UNMAPPED)] = KIND_DECOMPOSED

    one_r = np.concatenate([ea, sa]); one_c = np.concatenate([eb, sb])
    onehot = sp.csr_matrix((np.ones(len(one_r)), (one_r, one_c)), shape=(Va, Vb))
    keep_dec = sp.diags((kind == KIND_DECOMPOSED).astype(np.float64))
    W = (onehot + keep_dec @ dec).astype(np.float32).tocsr()
    W.sort_indices()
    P = Projection(W, kind, va.hash, vb.hash, cfg, time.time() - t0)
    LOG.info("projection %dx%d built in %.1fs: %s", Va, Vb, P.seconds, P.counts())
    return P


def fold_to_emitted(matrix: sp.spmatrix, vb: Vocabulary) -> sp.csr_matrix:
    """``(V_a, V_b)`` ``matrix`` with each never-emitted id's column added into its emitted twin's column.

    :func:`build_projection` never fills those columns; this also holds a projection built
    elsewhere (or stored by an older version) to the ids b's tokenizer emits. Rows keep their sums.

    Returns:
        float32 CSR with sorted indices.
    """
    coo = sp.coo_matrix(matrix)
    out = sp.csr_matrix((coo.data, (coo.row, vb.emitted_id[coo.col])), shape=matrix.shape, dtype=np.float32)
    out.sum_duplicates()
    out.sort_indices()
    return out


def hkl_pairs(P: Projection, threshold: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """H-KL pairing: a-tokens whose best entry is ≥ ``threshold`` pair with that b-token.

    Collisions (several a-tokens choosing the same b-token) are resolved by the
    highest weight, then the lowest a id, so the pairing is one-to-one.

    Returns:
        ``(ids_a, ids_b)`` sorted by ``ids_a``.
    """
    m = P.matrix.tocsr()
    n = m.shape[0]
    counts = np.diff(m.indptr)
    rows = np.flatnonzero(counts > 0)
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # best entry per row: max value, ties → lowest column
    r = np.repeat(np.arange(n), counts)
    order = np.lexsort((m.indices, -m.data, r))
    first = np.cumsum(counts) - counts
    best_pos = order[first[rows]]
    best_val = m.data[best_pos]
    best_col = m.indices[best_pos]
    ok = best_val >= threshold
    ra, cb, val = rows[ok], best_col[ok].astype(np.int64), best_val[ok]
    # resolve collisions on b: highest weight, then lowest a id
    order = np.lexsort((ra, -val, cb))
    ra, cb = ra[order], cb[order]
    keep = np.ones(len(cb), dtype=bool)
    keep[1:] = cb[1:] != cb[:-1]
    ra, cb = ra[keep], cb[keep]
    o = np.argsort(ra)
    return ra[o].astype(np.int64), cb[o]


def to_torch_sparse(m: sp.spmatrix, device=None, dtype=None):
    """Convert a scipy sparse matrix to a torch sparse CSR tensor on ``device``."""
    import torch

    m = m.tocsr()
    dtype = dtype or torch.float32
    t = torch.sparse_csr_tensor(
        torch.from_numpy(m.indptr.astype(np.int64)),
        torch.from_numpy(m.indices.astype(np.int64)),
        torch.from_numpy(m.data).to(dtype),
        size=m.shape,
    )
    return t.to(device) if device is not None else t
