"""Init methods for the rows of new tokens, by name (``--method``).

Every method answers the same question for the *target* tokens (new tokens that
have bytes but no identical old token): which combination of old rows should
each new row be? The answer is a :class:`RowPlan` (sparse coefficient matrices
``(T, V_old)`` for input and output rows, plus rows left to random init), so the
model's matrices are only touched once, by :mod:`surgery.transplant.transplant`.
Each method module registers itself (:func:`register_method`) when imported here.

Methods:

- ``mean`` (:mod:`.simple`): uniform mean of the old rows of the token's pieces (its bytes
  re-encoded mid-text by the old tokenizer, :func:`surgery.vocab.pieces.decompose`).
- ``random`` (:mod:`.simple`): ``N(mean, std)`` per dimension of the old rows.
- ``tokenadapt`` / ``tokenadapt-published`` (:mod:`.tokenadapt`): the TokenAdapt hybrid
  (arXiv 2505.09738) with the measured refinements, or exactly as published.
- ``omp`` (:mod:`.donor`): donor-based (mergekit ``tokensurgeon``, arXiv 2506.06607), orthogonal
  matching pursuit in :mod:`surgery.transplant.omp`.
"""

from surgery.transplant.methods.base import (METHODS, OFFSETS, SOURCE_NAMES, SRC_GLOBAL, SRC_HYBRID, SRC_LOCAL,
                                             SRC_MEAN, SRC_NONE, SRC_OMP, SRC_RANDOM, MethodInputs, RowPlan,
                                             method_wants_offsets, onehot_rows, register_method, row_scale)
from surgery.transplant.methods import donor, simple, tokenadapt  # noqa: F401  (each registers its methods)
from surgery.transplant.methods.tokenadapt import (DEFAULT_BIAS_TIED, DEFAULT_BIAS_UNTIED, apply_io_split,
                                                   extra_units, global_weights, local_weights, neighbours_dedup,
                                                   segment_softmax, tokenadapt_plan)
from surgery.vocab.pieces import Pieces, decompose

__all__ = ["METHODS", "OFFSETS", "SOURCE_NAMES", "SRC_NONE", "SRC_LOCAL", "SRC_GLOBAL", "SRC_HYBRID", "SRC_RANDOM",
           "SRC_MEAN", "SRC_OMP", "MethodInputs", "RowPlan", "register_method", "method_wants_offsets", "onehot_rows",
           "row_scale", "Pieces", "decompose",
           "DEFAULT_BIAS_TIED", "DEFAULT_BIAS_UNTIED", "apply_io_split", "extra_units", "global_weights",
           "local_weights", "neighbours_dedup", "segment_softmax", "tokenadapt_plan"]
