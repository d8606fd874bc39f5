"""Projection builders: invariants on real tokenizers, and the fast sparse build against a slow dense reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.sparse as sp

from helpers import vocab
from surgery.vocab.projection import (KIND_DECOMPOSED, KIND_EXACT, KIND_NEVER_EMITTED, KIND_SPECIAL, KIND_UNMAPPED,
                                      ProjectionConfig, build_projection, exact_pairs, hkl_pairs, piece_weights,
                                      to_torch_sparse)
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def _reference_surface(tok, i: int) -> bytes | None:
    """Independent surface: the text token ``i`` adds after an anchor token (valid for ASCII toy vocabularies)."""
    if i in tok.all_special_ids:
        return None
    anchor = tok.convert_tokens_to_ids(tok.tokenize("a"))[0]
    base = tok.decode([anchor], clean_up_tokenization_spaces=False)
    both = tok.decode([anchor, i], clean_up_tokenization_spaces=False)
    return both[len(base):].encode("utf-8")


def _reference_projection(tok_a, tok_b, cfg: ProjectionConfig) -> np.ndarray:
    """The X-Token rule written out literally with dense arrays and Python loops."""
    Va, Vb = len(tok_a), len(tok_b)
    sa = [_reference_surface(tok_a, i) for i in range(Va)]
    sb = [_reference_surface(tok_b, i) for i in range(Vb)]
    W = np.zeros((Va, Vb))
    exact = {}
    for i, s in enumerate(sa):
        if s is None:
            continue
        for j, t in enumerate(sb):
            if t == s:
                exact[i] = j
                break
    special = {}
    from surgery.vocab.surfaces import ROLE_ALIASES

    for i in tok_a.all_special_ids:  # chat/text markers by alias first, then the standard roles
        content = tok_a.convert_ids_to_tokens(i)
        group = [names for names in ROLE_ALIASES.values() if content in names]
        hit = [j for j in tok_b.all_special_ids if group and tok_b.convert_ids_to_tokens(j) in group[0]]
        if hit:
            special[i] = min(hit)
            continue
        for role in ("bos", "eos", "pad", "unk"):
            if getattr(tok_a, f"{role}_token_id") == i and getattr(tok_b, f"{role}_token_id") is not None:
                special[i] = getattr(tok_b, f"{role}_token_id")
                break

    def weights(n):
        w = [cfg.first_weight * cfg.decay ** k for k in range(n)]
        return [x / sum(w) for x in w]

    for i, s in enumerate(sa):
        if s is None or i in exact:
            continue
        ids = tok_b.encode(s.decode(), add_special_tokens=False)[: cfg.max_pieces]
        for j, w in zip(ids, weights(len(ids))):
            W[i, j] += w
    for j, t in enumerate(sb):
        if t is None:
            continue
        ids = tok_a.encode(t.decode(), add_special_tokens=False)[: cfg.max_pieces]
        for i, w in zip(ids, weights(len(ids))):
            if i not in exact and i not in special:
                W[i, j] += w
    for i in range(Va):
        if W[i].sum() > 0:
            W[i] /= W[i].sum()
            if cfg.top_k:
                order = sorted(range(Vb), key=lambda j: (-W[i, j], j))
                W[i, order[cfg.top_k:]] = 0
                W[i] /= W[i].sum()
    for i, j in {**exact, **special}.items():
        W[i] = 0
        W[i, j] = 1
    return W


@pytest.mark.parametrize("top_k", [0, 2])
@pytest.mark.parametrize("direction", ["bl->sp", "sp->bl"])
def test_projection_matches_dense_reference(top_k, direction):
    ta, tb = byte_level_toy(), sentencepiece_toy()
    if direction == "sp->bl":
        ta, tb = tb, ta
    cfg = ProjectionConfig(top_k=top_k)
    P = build_projection(canonical_vocabulary(ta), canonical_vocabulary(tb), cfg)
    ref = _reference_projection(ta, tb, cfg)
    np.testing.assert_allclose(P.matrix.toarray(), ref, atol=1e-6)


def test_piece_weights():
    np.testing.assert_allclose(piece_weights(1), [1.0])
    w = piece_weights(3)
    np.testing.assert_allclose(w, np.array([0.9, 0.09, 0.009]) / 0.999)
    assert w[0] > w[1] > w[2]


@functools.lru_cache(maxsize=None)
def projection(a: str, b: str):
    return build_projection(vocab(a), vocab(b))


PAIRS = [("smollm2-135m", "gemma3-270m"), ("gemma3-270m", "smollm2-135m"), ("llama3-tokenizer", "qwen2-tokenizer"), ("llama3-tokenizer", "gemma3-270m"),
         ("mistral-v1-tokenizer", "tekken-tokenizer"), ("bert-tokenizer", "mistral-v3-tokenizer"),
         ("qwen2-tokenizer", "bert-tokenizer")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_projection_invariants_real(a, b):
    va, vb = vocab(a), vocab(b)
    P = projection(a, b)
    W = P.matrix
    assert isinstance(W, sp.csr_matrix) and W.shape == (len(va), len(vb))
    assert (W.data >= 0).all()
    sums = np.asarray(W.sum(axis=1)).ravel()
    mapped = np.isin(P.kind, [KIND_EXACT, KIND_DECOMPOSED, KIND_SPECIAL])
    np.testing.assert_allclose(sums[mapped], 1.0, atol=1e-5)
    assert (sums[~mapped] == 0).all()
    assert set(P.unmapped.tolist()) == set(np.flatnonzero(P.kind == KIND_UNMAPPED).tolist())
    # never-emitted ids: an empty row of their own kind, and no entry in their column
    assert set(np.flatnonzero(P.kind == KIND_NEVER_EMITTED).tolist()) == set(va.never_emitted.tolist())
    assert not np.isin(W.indices, vb.never_emitted).any()
    # exact rows are one-hot on a token with identical canonical bytes
    ex = np.flatnonzero(P.kind == KIND_EXACT)
    assert (np.diff(W.indptr)[ex] == 1).all()
    cols = W.indices[W.indptr[ex]]
    assert all(va.surfaces[i] == vb.surfaces[j] for i, j in zip(ex[:2000], cols[:2000]))
    # rows with a surface are never unmapped unless none of their bytes exist in b
    for i in P.unmapped[:200]:
        s = va.surfaces[i]
        if s is not None:
            assert not vb.encode_bytes(s)
    assert (np.diff(W.indptr) <= P.config.top_k).all()


def test_smollm2_gemma3_shared_tokens():
    """An independent count gave 46,285 shared tokens by canonical bytes."""
    ia, ib = exact_pairs(vocab("smollm2-135m"), vocab("gemma3-270m"))
    assert 45_000 <= len(ia) <= 47_500, len(ia)


@pytest.mark.parametrize("target", ["gemma3-270m", "qwen2-tokenizer"])
def test_llama3_multi_digit_tokens_map_to_digits(target):
    va, vb = vocab("llama3-tokenizer"), vocab(target)
    P = projection("llama3-tokenizer", target)
    multi = [i for i, s in enumerate(va.surfaces) if s is not None and s.isdigit() and len(s) > 1]
    assert len(multi) >= 1000  # Llama-3 has the 1,100 numbers 00..999
    for i in multi:
        row = P.matrix[i]
        assert P.kind[i] == KIND_DECOMPOSED
        digits = {vb.surfaces[j] for j in row.indices}
        assert digits <= {bytes([c]) for c in va.surfaces[i]}, (va.surfaces[i], digits)
        best = row.indices[np.argmax(row.data)]
        assert vb.surfaces[best] == va.surfaces[i][:1]


def test_special_tokens_by_role():
    va, vb = vocab("smollm2-135m"), vocab("qwen2-tokenizer")
    P = build_projection(va, vb)
    s2 = {c: i for i, c in vb.special_content.items()}
    for content in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        i = {c: i for i, c in va.special_content.items()}[content]
        assert P.kind[i] == KIND_SPECIAL
        assert P.matrix[i].indices.tolist() == [s2[content]]


def test_hkl_pairs_against_brute_force():
    rng = np.random.default_rng(0)
    dense = rng.random((60, 40)) ** 6
    dense[dense < 0.2] = 0
    dense[5] = 0
    dense = dense / np.maximum(dense.sum(1, keepdims=True), 1e-12)
    for i in range(10, 40):  # peaked rows, some colliding on the same column with different weights
        dense[i] = 0
        dense[i, i % 7] = 0.6 + 0.01 * (i % 5)
        dense[i, 20 + i % 13] = 1 - dense[i, i % 7]
    for i in (7, 9):  # a collision with equal weight → lowest a id wins
        dense[i] = 0
        dense[i, 3], dense[i, 5] = 0.7, 0.3
    from surgery.vocab.projection import Projection

    kind = np.where(dense.sum(1) > 0, KIND_DECOMPOSED, KIND_UNMAPPED).astype(np.int8)
    P = Projection(sp.csr_matrix(dense.astype(np.float32)), kind, "a", "b", ProjectionConfig())
    ia, ib = hkl_pairs(P, threshold=0.6)
    # brute force
    cand = {}
    for i in range(dense.shape[0]):
        if dense[i].max() <= 0:
            continue
        j = int(np.argmax(dense[i]))  # argmax takes the first (lowest column) on ties
        w = float(np.float32(dense[i, j]))
        if w >= 0.6 and (j not in cand or (w, -i) > (cand[j][1], -cand[j][0])):
            cand[j] = (i, w)
    ref = sorted((i, j) for j, (i, w) in cand.items())
    assert list(zip(ia.tolist(), ib.tolist())) == ref
    assert (7, 3) in ref and all(i != 9 for i, _ in ref)


@pytest.mark.parametrize("a,b", [("llama3-tokenizer", "gemma3-270m"), ("gemma3-270m", "smollm2-135m"),
                                 ("smollm2-135m", "mistral-v1-tokenizer")])
def test_exact_pairs_use_the_emitted_twin(a, b):
    """Every exact pair is the id b's tokenizer produces for those bytes (checked by encoding them),
    and never a never-emitted id on either side."""
    va, vb = vocab(a), vocab(b)
    ia, ib = exact_pairs(va, vb)
    assert not np.isin(ia, va.never_emitted).any() and not np.isin(ib, vb.never_emitted).any()
    singles = [k for k in range(len(ia)) if len(va.surfaces[ia[k]]) == 1]
    assert len(singles) > 90  # the single ASCII characters
    enc = vb.encode_bytes_many([va.surfaces[ia[k]] for k in singles])
    assert all(e == [int(ib[k])] for e, k in zip(enc, singles))
    # the slow reference: every emitted a-id whose bytes b has gets exactly one pair
    emitted_b = {}
    for j, s in enumerate(vb.surfaces):
        if s is not None and vb.is_emitted[j]:
            emitted_b.setdefault(s, []).append(j)
    assert all(len(v) == 1 for v in emitted_b.values())
    ref = [(i, emitted_b[s][0]) for i, s in enumerate(va.surfaces)
           if s is not None and va.is_emitted[i] and s in emitted_b]
    assert list(zip(ia.tolist(), ib.tolist())) == ref


def test_torch_sparse():
    import torch

    va, vb = canonical_vocabulary(byte_level_toy()), canonical_vocabulary(sentencepiece_toy())
    P = build_projection(va, vb)
    T = to_torch_sparse(P.matrix)
    x = torch.randn(3, len(va))
    np.testing.assert_allclose((x @ T.to_dense()).numpy(), x.numpy() @ P.matrix.toarray(), atol=1e-5)


def test_fold_to_emitted_against_a_slow_reference():
    from surgery.vocab.projection import fold_to_emitted

    vb = vocab("gemma3-270m")
    never = vb.never_emitted
    rng = np.random.default_rng(0)
    cols = np.concatenate([never[:20], rng.integers(0, len(vb), 30)])
    rows = rng.integers(0, 5, len(cols))
    vals = rng.random(len(cols))
    W = sp.csr_matrix((vals, (rows, cols)), shape=(5, len(vb)))
    F = fold_to_emitted(W, vb)
    ref = {}
    for r, c, v in zip(rows, cols, vals):
        if c in set(never.tolist()):  # the id the tokenizer produces for the twin's bytes
            c = vb.encode_bytes(vb.surfaces[c])[0]
        ref[(r, c)] = ref.get((r, c), 0.0) + v
    got = {(r, c): v for r, c, v in zip(*sp.find(F))}
    assert got.keys() == ref.keys()
    assert all(abs(got[k] - ref[k]) < 1e-6 for k in ref)
    np.testing.assert_allclose(np.asarray(F.sum(1)).ravel(), np.asarray(W.sum(1)).ravel(), rtol=1e-6)
