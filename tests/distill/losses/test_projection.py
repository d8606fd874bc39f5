"""The projection a loss works through: the sparse operator (distill/losses/operator.py) against the dense
matrix, and the first-piece projection (distill/losses/context.py) on real vocabularies."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from distill.losses import ProjectionOperator


def test_projection_column_block_equals_dense():
    rng = np.random.default_rng(0)
    W = sp.random(50, 80, density=0.05, random_state=1, format="csr", dtype=np.float32)
    P = ProjectionOperator(W)
    cols = torch.tensor(rng.choice(80, 17, replace=False))
    block = P.column_block(cols).to_dense()
    np.testing.assert_allclose(block.numpy(), W.toarray()[:, cols.numpy()].T, rtol=0, atol=0)
    x = torch.rand(6, 50, requires_grad=True)
    y = P.project(x, cols)
    torch.testing.assert_close(y, x @ torch.tensor(W.toarray()[:, cols.numpy()]))
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.tensor(W.toarray()[:, cols.numpy()]).sum(1).expand(6, -1))


def test_first_piece_projection_maps_long_teacher_tokens_to_their_first_student_token():
    from helpers import vocab

    from distill.losses import first_piece_projection

    sv, tv = vocab("smollm2-135m"), vocab("mistral-v1-tokenizer")
    W = first_piece_projection(tv, sv).matrix.tocsr()
    assert np.allclose(W.sum(1)[W.getnnz(1) > 0], 1.0)
    checked = 0
    for t, surface in enumerate(tv.surfaces):  # teacher words the student spells with several tokens
        if surface is None or len(surface) < 7 or surface in sv.surface_to_id or not surface[1:].isalpha():
            continue
        row = W.getrow(t)
        assert row.nnz == 1 and row.data[0] == pytest.approx(1.0)
        s = int(row.indices[0])
        assert s == sv.encode_bytes(surface)[0] and surface.startswith(sv.surfaces[s]) and surface != sv.surfaces[s]
        checked += 1
        if checked == 20:
            break
    assert checked == 20
    t = tv.surface_to_id[b" the"]  # shared tokens map onto themselves
    assert W.getrow(t).indices.tolist() == [sv.surface_to_id[b" the"]]
