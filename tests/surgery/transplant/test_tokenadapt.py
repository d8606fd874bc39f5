"""TokenAdapt end to end on a toy vocabulary with the real aux model: rows vs a slow reference, cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import tiny_llama
from surgery.transplant import TransplantConfig, transplant
from surgery.transplant.aux_embeddings import AuxEmbedder, resolve_aux_model, surfaces_hash, vocab_embeddings
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def _aux_available():
    from pathlib import Path

    return Path(resolve_aux_model("minilm")).exists()


pytestmark = pytest.mark.skipif(not _aux_available(), reason="aux model minilm not installed")


def _softmax(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    return [v / sum(e) for v in e]


@pytest.fixture
def toks():
    return byte_level_toy(320), sentencepiece_toy(150)


def _cfg(tmp_path, **kw):
    base = dict(method="tokenadapt-published", cache_dir=str(tmp_path / "aux"), aux_dtype="float32", device="cpu")
    base.update(kw)
    return TransplantConfig(**base)


def test_rows_match_slow_reference_and_cache_is_exact(toks, tmp_path):
    old_tok, new_tok = toks
    model = tiny_llama(len(old_tok))
    E = model.get_input_embeddings().weight.detach().clone().double()
    cfg = _cfg(tmp_path, global_weight=0.3, top_k=3, temperature=0.3)
    model, rep = transplant(model, old_tok, new_tok, cfg)
    st = rep.data["method_stats"]
    assert st["aux_old_computed"] > 0 and st["aux_new_computed"] > 0
    assert rep.data["counts"]["hybrid"] > 0

    # slow reference, token by token, from the same cached aux vectors
    ov, nv = canonical_vocabulary(old_tok), canonical_vocabulary(rep.tokenizer)
    aux = AuxEmbedder("minilm", dtype="float32")
    old_ids = [i for i, s in enumerate(ov.surfaces) if s is not None]
    phi_old, s1 = vocab_embeddings(aux, ov, old_ids, cfg.cache_dir)
    assert s1["computed"] == 0  # everything came from the cache written by the transplant
    copied = set(rep.copied_rows.tolist())
    targets = [i for i, s in enumerate(nv.surfaces) if s is not None and i not in copied]
    phi_new, _ = vocab_embeddings(aux, nv, targets, cfg.cache_dir)
    W = model.get_input_embeddings().weight.detach().double()
    checked = 0
    for t, tid in enumerate(targets):
        s = nv.surfaces[tid]
        pieces = ov.encode_bytes(s)
        if len(pieces) < 2:
            continue
        q = phi_new[t].astype(np.float64)
        sub = [phi_old[old_ids.index(j)].astype(np.float64) for j in pieces]
        alpha = [float(q @ v) for v in sub]
        lam = [len(ov.surfaces[j]) / len(s) for j in pieces]
        c = [(a + b) / 2 for a, b in zip(_softmax(alpha), lam)]
        wl = _softmax([v / 0.3 for v in c])
        e_loc = sum(w * E[j] for w, j in zip(wl, pieces))
        sims = phi_old.astype(np.float64) @ q
        nn = np.argsort(-sims, kind="stable")[:3]
        keep = [n for n in nn if sims[n] >= 0.0]
        wg = _softmax([sims[n] / 0.3 for n in keep])
        e_glob = sum(w * E[old_ids[n]] for w, n in zip(wg, keep))
        ref = 0.7 * e_loc + 0.3 * e_glob
        torch.testing.assert_close(W[tid], ref, rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked >= 10

    # warm cache: nothing recomputed, identical rows
    model2, rep2 = transplant(tiny_llama(len(old_tok)), old_tok, new_tok, cfg)
    st2 = rep2.data["method_stats"]
    assert st2["aux_old_computed"] == 0 and st2["aux_new_computed"] == 0
    assert not st["neighbours_cached"] and st2["neighbours_cached"]  # the search too is answered from the cache
    assert torch.equal(model2.get_input_embeddings().weight, model.get_input_embeddings().weight)
    files = list((tmp_path / "aux").glob("*/*.npz"))
    assert {f.stem for f in files if not f.stem.startswith("neighbours-")} == {surfaces_hash(ov)[:24],
                                                                                surfaces_hash(nv)[:24]}
    assert len([f for f in files if f.stem.startswith("neighbours-")]) == 1


def test_io_split_and_output_bias_on_untied_head(toks, tmp_path):
    old_tok, new_tok = toks
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat and the dog sat on the log " * 20)
    cfg = _cfg(tmp_path, method="tokenadapt", untie=True, io_split="pieces", output_bias=-1.0,
               calibration_texts=(str(calib),))
    model, rep = transplant(tiny_llama(len(old_tok)), old_tok, new_tok, cfg)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    copied = torch.as_tensor(rep.copied_rows)
    assert torch.equal(emb[copied], head[copied])  # tied source: copies identical in both
    new = torch.as_tensor(np.setdiff1d(np.arange(len(rep.tokenizer)), rep.copied_rows))
    assert not torch.allclose(emb[new], head[new])
    bd = rep.data["method_stats"]["bias_direction"]
    assert bd["n"] > 100 and bd["source"] == "texts"

    # the published variant with the same settings keeps input and output rows equal
    cfg2 = _cfg(tmp_path, method="tokenadapt-published", untie=True)
    m2, _ = transplant(tiny_llama(len(old_tok)), old_tok, new_tok, cfg2)
    assert torch.equal(m2.get_input_embeddings().weight, m2.get_output_embeddings().weight)
