"""Data sources, blocks, resumable order, batch encoding; teacher weighting and the dense/cached teacher views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill.data import BlockOrder, encode_blocks, load_documents, make_blocks, token_blocks
from distill.teacher_dist import TeacherDist
from distill.teachers import position_stats, teacher_score, teacher_weights
from surgery.errors import SurgeryError


def test_text_jsonl_and_dataset_sources(tmp_path):
    (tmp_path / "a.txt").write_text("Hallo Welt.\n\nZweiter Absatz.", encoding="utf-8")
    assert load_documents(str(tmp_path / "a.txt")) == ["Hallo Welt.\n\nZweiter Absatz."]
    lines = [{"text": "eins"}, {"text": "zwei", "id": 2}, {"text": "   "}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert load_documents(str(tmp_path / "b.jsonl")) == ["eins", "zwei"]
    with pytest.raises(SurgeryError, match="no field 'body'"):
        load_documents(str(tmp_path / "b.jsonl"), text_field="body")
    (tmp_path / "bad.jsonl").write_text('{"text": "x"}\n{oops\n')
    with pytest.raises(SurgeryError, match="line 2 is not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "train.jsonl").write_text("\n".join(json.dumps({"content": f"doc {i}"}) for i in range(5)))
    docs = load_documents(str(ds), "dataset", text_field="content", split="train", max_documents=3)
    assert docs == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(SurgeryError, match="no column 'text'"):
        load_documents(str(ds), "dataset", split="train")
    with pytest.raises(SurgeryError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"), "text")


def test_blocks_cut_at_whitespace_and_cover_the_text():
    doc = " ".join(f"Wort{i}" for i in range(200))
    blocks = make_blocks([doc], 100)
    assert "".join(blocks) == doc
    assert all(len(b) <= 100 for b in blocks)
    assert all(b.endswith(" ") for b in blocks[:-1])
    packed = make_blocks(["kurz eins", "kurz zwei", "kurz drei"], 30, pack=True)
    assert packed == ["kurz eins\n\nkurz zwei\n\nkurz ", "drei"]
    assert make_blocks(["kurz eins", "kurz zwei"], 30) == ["kurz eins", "kurz zwei"]


def test_token_blocks_cover_the_text_in_equal_token_counts():
    import helpers

    tok = helpers.tokenizer("smollm2-135m")
    docs = [" ".join(f"Wort{i}" for i in range(120)), "中文的句子，日本語の文。" * 20, "kurz"]
    blocks = token_blocks(docs, tok, 16)
    n_doc = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    per_doc, i = [], 0
    for d, n in zip(docs, n_doc):
        k = -(-n // 16)  # ceil: one block per 16 tokens
        assert "".join(blocks[i:i + k]) == d  # consecutive, nothing lost or repeated
        per_doc.append(blocks[i:i + k])
        i += k
    assert i == len(blocks)
    counts = [len(tok(b, add_special_tokens=False)["input_ids"]) for b in per_doc[1][:-1]]
    assert all(abs(c - 16) <= 2 for c in counts)  # re-encoding a block gives its share of tokens, up to the edges


def test_block_order_is_a_pure_function_of_position():
    o = BlockOrder(7, seed=3)
    first = o.take(0, 20)
    assert sorted(first[:7]) == list(range(7)) and sorted(first[7:14]) == list(range(7))
    assert first[:7] != first[7:14]  # a new permutation per epoch
    assert o.take(5, 10) == first[5:15]  # resuming at any position continues the same stream
    assert BlockOrder(7, seed=3, shuffle=False).take(5, 4) == [5, 6, 0, 1]
    assert BlockOrder(7, seed=4).take(0, 7) != first[:7]


def test_encode_blocks_layout():
    import helpers

    tok, vocab = helpers.tokenizer("smollm2-135m"), helpers.vocab("smollm2-135m")
    texts = ["Grüße 😀", "a much longer block of plain English text"]
    b = encode_blocks(texts, tok, vocab, max_tokens=8)
    assert b.input_ids.shape == (2, 8)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert (b.input_ids[:, 0] == start).all() and not b.valid[:, 0].any()
    n0 = int(b.attention_mask[0].sum())
    assert (b.labels[0, : n0 - 1] == b.input_ids[0, 1:n0]).all() and (b.labels[0, n0 - 1:] == -100).all()
    assert b.ends[0, n0 - 1] == len(texts[0].encode())  # the whole first text fits
    assert b.ends[1, 7] < len(texts[1].encode())  # the second one is truncated


def test_teacher_weights_and_scores():
    assert teacher_weights("fixed", [2.0, 0.5], None, 1.0) == [2.0, 0.5]
    w = teacher_weights("dynamic", [1, 1], [-1.0, -2.0], 1.0)
    assert w == pytest.approx([1 / (1 + np.exp(-1)), 1 - 1 / (1 + np.exp(-1))])
    assert teacher_weights("dynamic", [1, 1], [-1.0, -2.0], 0.0) == pytest.approx([0.5, 0.5])
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    st = position_stats(logits, torch.tensor([0, -100]))
    lp = torch.log_softmax(logits, -1)
    assert st[0, 0].item() == pytest.approx(lp[0, 0].item())
    assert st[1, 1].item() == pytest.approx(np.log(3))
    assert st[1, 2].item() == pytest.approx(1 / 3)
    mask = torch.tensor([True, False])
    assert teacher_score(st, mask, n_bytes=2, kind="ce") == pytest.approx(lp[0, 0].item() / np.log(2) / 2)
    assert teacher_score(st, mask, 2, "max_prob") == pytest.approx(torch.softmax(logits[0], -1).max().item())


def test_teacher_view_rows_equal_a_copy_and_cache_at_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 30, generator=g) * 2
    rows = torch.tensor([7, 2, 2, 9])
    for T in (1.0, 1.7):
        view = TeacherDist(30, T, logits=z).select(rows)
        copy = TeacherDist(30, T, logits=z[rows].clone())
        cols = torch.tensor([3, 0, 29])
        torch.testing.assert_close(view.probs_at(cols), copy.probs_at(cols))
        torch.testing.assert_close(view.column_mass(), copy.column_mass())
        v1, t1 = view.sorted_topk(5)
        v2, t2 = copy.sorted_topk(5)
        torch.testing.assert_close(v1, v2)
        torch.testing.assert_close(t1, t2)
        torch.testing.assert_close(view.full_log_probs(), torch.log_softmax(z[rows] / T, -1))
    # cache with k < V at T = 1: exact probabilities on the cached ids, the tail stays missing
    v, i = torch.topk(z, 4, dim=-1)
    cached = TeacherDist(30, 1.0, topk_ids=i, topk_logits=v, lse=torch.logsumexp(z, -1))
    p = torch.softmax(z, -1)
    torch.testing.assert_close(cached.probs_at(i[0]), p[:, i[0]] * (i[:, :, None] == i[0][None, None]).any(1))
    vals, tail = cached.sorted_topk(2)
    top = torch.topk(p, 4, -1).values
    torch.testing.assert_close(vals, top[:, :2])
    torch.testing.assert_close(tail, 1 - top[:, :2].sum(-1))
