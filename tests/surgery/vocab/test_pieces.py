"""The one decomposition: token → pieces of another tokenizer, against plain loops over the tokenizer itself."""

from __future__ import annotations

import numpy as np

from surgery.vocab.pieces import Pieces, decompose
from surgery.vocab.projection import ProjectionConfig, decomposition_entries, piece_weights
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def toy_pair():
    ta, tb = byte_level_toy(), sentencepiece_toy()
    return ta, tb, canonical_vocabulary(ta), canonical_vocabulary(tb)


def test_decompose_matches_the_destination_tokenizer():
    ta, tb, va, vb = toy_pair()
    ids = np.array([i for i, s in enumerate(va.surfaces) if s is not None and not s.startswith(b" ") and s.isascii()])
    p = decompose(va, vb, ids)
    assert len(p.counts) == len(ids) and p.counts.sum() == len(p.ids) == len(p.owner) == len(p.lengths)
    for t, i in enumerate(ids.tolist()):
        want = tb.encode(va.surfaces[i].decode(), add_special_tokens=False)  # no dummy prefix in the toy
        got = p.ids[p.owner == t].tolist()
        assert got == want, (va.surfaces[i], got, want)
        assert p.lengths[p.owner == t].tolist() == [len(vb.surfaces[j]) for j in want]
        if want:  # a spellable token's pieces cover its bytes
            assert sum(p.lengths[p.owner == t]) == len(va.surfaces[i])
    assert (p.counts > 0).sum() > 0.3 * len(ids) and (p.counts > 1).any()


def test_pieces_views_against_loops():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, 40)
    ids = rng.integers(0, 30, int(counts.sum()))
    owner = np.repeat(np.arange(40), counts)
    p = Pieces(ids, owner, counts, rng.integers(1, 4, len(ids)))
    groups = [ids[owner == t].tolist() for t in range(40)]
    assert p.first().tolist() == [g[0] if g else -1 for g in groups]
    assert p.last().tolist() == [g[-1] if g else -1 for g in groups]
    assert p.position.tolist() == [k for g in groups for k in range(len(g))]
    q = p.truncate(2)
    assert [q.ids[q.owner == t].tolist() for t in range(40)] == [g[:2] for g in groups]
    assert len(q.lengths) == len(q.ids) and q.counts.tolist() == [min(len(g), 2) for g in groups]
    vals = rng.random(len(ids))
    dense = np.zeros((40, 30))
    for o, i, v in zip(owner, ids, vals):
        dense[o, i] += v
    np.testing.assert_allclose(p.matrix(vals, 30).toarray(), dense)


def test_projection_entries_weight_pieces_by_position():
    _, tb, va, vb = toy_pair()
    ids = np.array([i for i, s in enumerate(va.surfaces) if s is not None and len(s) >= 4])
    cfg = ProjectionConfig(max_pieces=2)
    rows, cols, w = decomposition_entries(va, vb, ids, cfg)
    ref = []
    for i in ids.tolist():
        pieces = tb.encode(va.surfaces[i].decode().replace(" ", "▁"), add_special_tokens=False)[:2]
        ref += [(i, j, x) for j, x in zip(pieces, piece_weights(len(pieces), cfg.first_weight, cfg.decay))]
    assert [(int(r), int(c)) for r, c in zip(rows, cols)] == [(r, c) for r, c, _ in ref]
    np.testing.assert_allclose(w, [x for _, _, x in ref])
