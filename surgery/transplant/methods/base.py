"""The init-method registry and what every method receives and returns.

A method answers one question for the *target* tokens (new tokens with bytes but no
identical old token): which combination of old rows should each new row be? The answer
is a :class:`RowPlan` (sparse coefficients over the old rows), so the model's matrices
are only touched once, by :mod:`surgery.transplant.transplant`. Methods register
themselves with :func:`register_method`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.sparse as sp
import torch

from surgery.vocab.pieces import coef_matrix
from surgery.vocab.surfaces import Vocabulary

SRC_NONE, SRC_LOCAL, SRC_GLOBAL, SRC_HYBRID, SRC_RANDOM, SRC_MEAN, SRC_OMP = range(7)
SOURCE_NAMES = {SRC_NONE: "none", SRC_LOCAL: "local", SRC_GLOBAL: "global", SRC_HYBRID: "hybrid",
                SRC_RANDOM: "random", SRC_MEAN: "mean", SRC_OMP: "omp"}


@dataclass
class MethodInputs:
    """What a method may use.

    Attributes:
        old_vocab, new_vocab: canonical vocabularies.
        old_in: ``(V_old, d)`` input embedding rows of the base model.
        old_out: ``(V_old, d)`` output rows (the same tensor as ``old_in`` when tied).
        targets: ``(T,)`` new ids to initialize.
        separate_output: the result will have an untied head (output rows may differ).
        shared_new, shared_old: ``(S,)`` exact pairs (new id, old id), from the alignment core.
        config: the :class:`~surgery.transplant.config.TransplantConfig`.
        aux: factory of the :class:`~surgery.transplant.aux_embeddings.AuxEmbedder` (lazy).
        donor_in: ``(V_donor, d_donor)`` donor input rows (``omp`` only).
        device: where dense numeric work runs.
    """

    old_vocab: Vocabulary
    new_vocab: Vocabulary
    old_in: torch.Tensor
    old_out: torch.Tensor
    targets: np.ndarray
    separate_output: bool
    shared_new: np.ndarray
    shared_old: np.ndarray
    config: object
    aux: Callable | None = None
    donor_in: torch.Tensor | None = None
    device: str = "cpu"
    progress: bool = False


@dataclass
class RowPlan:
    """Coefficients of the new rows over the old rows.

    Attributes:
        coef_in: ``(T, V_old)`` CSR float64; row ``t`` gives target ``t``'s input row.
        coef_out: ``(T, V_old)`` CSR for output rows, or ``None`` (same as ``coef_in``).
        source: ``(T,)`` int8 ``SRC_*`` code; rows with ``SRC_RANDOM`` are drawn from ``N(mean, std)``.
        stats: counts and timings for the report.
        out_bias: ``(T,)`` logit offsets for the output rows (added along the bias direction of
            :mod:`surgery.transplant.calibration`), or ``None``.
    """

    coef_in: sp.csr_matrix
    coef_out: sp.csr_matrix | None
    source: np.ndarray
    stats: dict = field(default_factory=dict)
    out_bias: np.ndarray | None = None


METHODS: dict[str, Callable[[MethodInputs], RowPlan]] = {}


# name -> ``offsets(config) -> bool``: whether the method will ask for logit offsets (so the calibration forward
# that fits their direction can start before the method runs, beside it)
OFFSETS: dict[str, Callable[[object], bool]] = {}


def register_method(name: str, offsets: Callable[[object], bool] | None = None):
    """Register an init method under ``name`` (used by ``--method``); ``offsets(config)`` says whether its
    :class:`RowPlan` will carry ``out_bias`` under that config."""

    def deco(fn):
        METHODS[name] = fn
        if offsets is not None:
            OFFSETS[name] = offsets
        return fn

    return deco


def method_wants_offsets(config) -> bool:
    """Whether ``config.method`` will ask for logit offsets under ``config`` (:data:`OFFSETS`)."""
    offsets = OFFSETS.get(config.method)
    return offsets is not None and offsets(config)


def onehot_rows(ids: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """``(len(ids), n_cols)`` with a 1 at ``(t, ids[t])``; rows with ``ids[t] < 0`` stay empty."""
    ok = ids >= 0
    return coef_matrix(np.flatnonzero(ok), ids[ok], np.ones(int(ok.sum())), (len(ids), n_cols))


def row_scale(m: sp.csr_matrix, s: np.ndarray) -> sp.csr_matrix:
    """Each row of ``m`` times ``s[row]``."""
    return sp.csr_matrix(sp.diags(np.asarray(s, dtype=np.float64)) @ m)
