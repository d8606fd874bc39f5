"""Donor-based init ``omp``: each new row from the donor's sparse code over the shared tokens.

The algorithm and its measured settings are described in :mod:`surgery.transplant.omp`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from surgery.transplant.methods.base import SRC_OMP, SRC_RANDOM, MethodInputs, RowPlan, register_method
from surgery.transplant.omp import batched_omp
from surgery.vocab.pieces import coef_matrix


@register_method("omp")
def omp_init(inp: MethodInputs) -> RowPlan:
    """Donor OMP over the shared tokens (see module docstring)."""
    from surgery.transplant.neighbours import topk_inner_product

    cfg = inp.config
    if inp.donor_in is None:
        raise ValueError("omp needs donor_in")
    T, V = len(inp.targets), inp.old_in.shape[0]
    t0 = time.time()
    D = inp.donor_in.float()
    ok_sh = inp.shared_new < D.shape[0]
    atoms_new, atoms_old = inp.shared_new[ok_sh], inp.shared_old[ok_sh]
    atoms = D[torch.as_tensor(atoms_new)]
    has_row = inp.targets < D.shape[0]
    tgt = np.flatnonzero(has_row)
    X = D[torch.as_tensor(inp.targets[tgt])]
    n_cand = min(4 * cfg.omp_k, len(atoms_new))
    an = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-12)
    # candidate pre-selection only: low precision is enough to shortlist, OMP itself runs in float32
    _, cand = topk_inner_product(X, an, n_cand, device=inp.device, absolute=True, progress=inp.progress,
                                 dtype=torch.bfloat16)
    t_sel = time.time() - t0
    rows, cols, vals = [], [], []
    dev = torch.device(inp.device)
    block = max(1, int(2**25 // max(1, n_cand * max(D.shape[1], n_cand))))  # ~128 MB per block
    from tqdm.auto import tqdm

    atoms_d = atoms.to(dev)
    for s in tqdm(range(0, len(tgt), block), desc="omp", disable=not inp.progress, leave=False):
        sel, coef = batched_omp(X[s:s + block].to(dev), atoms_d, cand[s:s + block].to(dev), cfg.omp_k,
                                ridge=cfg.omp_ridge)
        rows.append(np.repeat(tgt[s:s + block], sel.shape[1]))
        cols.append(atoms_old[sel.cpu().numpy().ravel()])
        vals.append(coef.double().cpu().numpy().ravel())
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    coef = coef_matrix(r, np.concatenate(cols) if cols else r, np.concatenate(vals) if vals else np.zeros(0), (T, V))
    src = np.where(has_row, SRC_OMP, SRC_RANDOM).astype(np.int8)
    return RowPlan(coef, None, src, {"omp_k": cfg.omp_k, "omp_ridge": cfg.omp_ridge, "omp_candidates": n_cand, "omp_atoms": len(atoms_new),
                                     "seconds_omp_select": round(t_sel, 2),
                                     "seconds_omp": round(time.time() - t0, 2)})
