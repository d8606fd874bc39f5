"""Transplants with the shipped real tokenizers and models (skipped when `surgery assets` has not run)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import TOKENIZER_ASSETS, asset_dir, tiny_llama, tokenizer, vocab
from surgery.transplant import TransplantConfig, transplant, transplant_checkpoint
from surgery.vocab.projection import exact_pairs

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("new", [t for t in TOKENIZER_ASSETS if t != "smollm2-135m"])
def test_every_shipped_tokenizer_into_a_tiny_smollm2_shaped_model(new):
    old_tok, new_tok = tokenizer("smollm2-135m"), tokenizer(new)
    model = tiny_llama(len(old_tok))
    before = model.get_input_embeddings().weight.detach().clone()
    model, rep = transplant(model, old_tok, new_tok, TransplantConfig(method="mean"), old_vocab=vocab("smollm2-135m"),
                            new_vocab=vocab(new))
    n, o = exact_pairs(vocab(new), vocab("smollm2-135m"))
    never = vocab(new).never_emitted
    assert not np.isin(n, never).any()
    w = model.get_input_embeddings().weight
    assert torch.equal(w[torch.as_tensor(n)], before[torch.as_tensor(o)])
    # never-emitted twins (byte fallback beside an ordinary piece) get a zero head row, so they do not
    # take probability from the twin the tokenizer emits
    assert rep.data["never_emitted"] == len(never)
    if len(never):
        assert torch.count_nonzero(w[torch.as_tensor(never)]) == 0
    assert w.shape[0] % 128 == 0 and w.shape[0] >= len(new_tok) == len(rep.tokenizer)
    ids = rep.tokenizer("Debian uses dpkg: 12 Pakete, 软件包.", add_special_tokens=False)["input_ids"]
    assert torch.isfinite(model(input_ids=torch.tensor([ids])).logits).all()
    from surgery.evaluate import document_start_id

    ds = document_start_id(rep.tokenizer)
    if ds is not None and rep.data["counts"]["special_matched"]:
        # the new document start reads the old document-start row
        assert torch.equal(w[ds], before[document_start_id(old_tok)])


def test_smollm2_with_llama3_tokenizer_reloads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.checkpoint import iter_tensors

    base = asset_dir("smollm2-135m")
    asset_dir("llama3-tokenizer")
    out = tmp_path / "smol-llama3"
    rep = transplant_checkpoint("smollm2-135m", "llama3-tokenizer", str(out), TransplantConfig(method="mean"),
                                progress=False)
    assert rep["counts"]["exact"] > 35000 and rep["new_vocab"]["len_tokenizer"] == 128256
    m = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    old = dict(iter_tensors(base))["model.embed_tokens.weight"]
    n, o = exact_pairs(vocab("llama3-tokenizer"), vocab("smollm2-135m"))
    assert torch.equal(m.get_input_embeddings().weight[torch.as_tensor(n)], old[torch.as_tensor(o)])
    assert m.config.bos_token_id == tok.bos_token_id == 128000
    ids = tok("The Debian package manager", return_tensors="pt")["input_ids"]
    gen = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids.shape[1] + 5


def test_gemma3_base_takes_a_new_tokenizer():
    from surgery.loading import load_model

    asset_dir("gemma3-270m")
    old_tok, new_tok = tokenizer("gemma3-270m"), tokenizer("llama3-tokenizer")
    model = load_model("gemma3-270m")
    emb = model.get_input_embeddings()
    cls, scale = type(emb), float(emb.embed_scale)
    model, rep = transplant(model, old_tok, new_tok, TransplantConfig(method="mean"))
    emb2 = model.get_input_embeddings()
    assert type(emb2) is cls and float(emb2.embed_scale) == scale
    assert model.get_output_embeddings().weight.data_ptr() == emb2.weight.data_ptr()
    ids = torch.tensor([rep.tokenizer("Debian is a free operating system.")["input_ids"]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert rep.data["counts"]["exact"] > 20000


def emitted_by_tokenizer(tok, char: str) -> int | None:
    """The id ``tok`` produces for ``char`` after a word (None when it does not split there)."""
    head = tok("Hello", add_special_tokens=False)["input_ids"]
    full = tok("Hello" + char, add_special_tokens=False)["input_ids"]
    if full[:len(head)] != head or len(full) != len(head) + 1:
        return None
    return full[-1]


@pytest.mark.parametrize("new", ["llama3-tokenizer", "smollm2-135m"])
def test_single_characters_copy_the_row_a_byte_fallback_base_emits(new):
    """A tiny model with Gemma-3's tokenizer as the base: every single-character token of the new vocabulary
    that Gemma-3 has reads, bit for bit, the row of the id Gemma-3's tokenizer produces for that character
    (not its never-emitted byte-fallback twin ``<0xNN>``)."""
    old_tok, new_tok = tokenizer("gemma3-270m"), tokenizer(new)
    ov, nv = vocab("gemma3-270m"), vocab(new)
    model = tiny_llama(len(old_tok), hidden=16, layers=1)
    before = model.get_input_embeddings().weight.detach().clone()
    model, rep = transplant(model, old_tok, new_tok, TransplantConfig(method="mean"), old_vocab=ov, new_vocab=nv)
    w = model.get_input_embeddings().weight
    single = {}
    for k, t in enumerate(ov.surfaces):
        if t is not None and len(t) == 1:
            single.setdefault(t, []).append(k)
    checked = twins = 0
    for i, s in enumerate(nv.surfaces):
        if s is None or len(s) != 1 or s[0] >= 0x80:
            continue
        j = emitted_by_tokenizer(old_tok, s.decode())
        if j is None or ov.surfaces[j] != s:  # Gemma-3 has no single token for this character
            continue
        assert torch.equal(w[i], before[j]), (s, j)
        checked += 1
        twins += len(single[s]) > 1  # the base also has a byte-fallback twin for it
    assert checked >= 90 and twins >= 80, (checked, twins)


