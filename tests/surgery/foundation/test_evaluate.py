"""Bits per byte against an independent naive loop; windowing covers every token exactly once."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_llama
from surgery.evaluate import _windows, bits_per_byte
from toy_tokenizers import byte_level_toy, sentencepiece_toy

TEXT = "The cat sat on the mat. Le chat était assis. 猫が座った。 1234 + 5678 = 6912!\n" * 3


def naive_bpb(model, tok, text):
    """One forward per token over the full prefix; no windowing, no batching."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids = [start] + tok(text, add_special_tokens=False)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):
            logits = model(torch.tensor([ids[:t]])).logits[0, -1]
            total -= torch.log_softmax(logits.double(), -1)[ids[t]].item()
    return total / math.log(2) / len(text.encode())


@pytest.mark.parametrize("make_tok", [byte_level_toy, sentencepiece_toy])
@pytest.mark.parametrize("max_length,stride", [(1024, None), (24, 8), (16, 16)])
def test_matches_naive_loop(make_tok, max_length, stride):
    tok = make_tok()
    m = tiny_llama(len(tok), seed=3)
    r = bits_per_byte(m, tok, TEXT, max_length=1024, progress=False)
    ref = naive_bpb(m, tok, TEXT)
    assert abs(r.bits_per_byte - ref) / ref < 1e-4  # full context: identical up to float error
    w = bits_per_byte(m, tok, TEXT, max_length=max_length, stride=stride, progress=False)
    assert abs(w.bits_per_byte - ref) / ref < 0.02  # windowed: within 2% (less context per token)
    assert w.n_bytes == len(TEXT.encode())


@pytest.mark.parametrize("n,L,S", [(2, 4, 2), (10, 4, 2), (100, 16, 5), (17, 16, 16), (1000, 64, 63)])
def test_windows_score_each_token_once(n, L, S):
    scored = []
    for b, e, s in _windows(n, L, S):
        assert e - b <= L and b <= s - 1 < e
        scored.extend(range(s, e))
    assert scored == list(range(1, n))


@pytest.mark.parametrize("max_length,stride,batch,bad", [(0, None, 4, "--max-length"), (1, None, 4, "--max-length"),
                                                         (16, 17, 4, "--stride"), (16, 0, 4, "--stride"),
                                                         (16, None, 0, "--batch-size")])
def test_bad_options_are_refused_before_any_work(max_length, stride, batch, bad):
    from surgery.errors import ConfigError
    from surgery.evaluate import EvalOptions

    assert bad in " ".join(EvalOptions(max_length, stride, batch).validate())
    tok = byte_level_toy()
    with pytest.raises(ConfigError, match=bad):
        bits_per_byte(tiny_llama(len(tok)), tok, TEXT, max_length=max_length, stride=stride, batch_size=batch,
                      progress=False)


def test_smallest_window_scores_every_token():
    """A 2-token window (one token of context) is valid and equals the naive loop with one token of context."""
    tok = byte_level_toy()
    m = tiny_llama(len(tok), seed=2)
    r = bits_per_byte(m, tok, TEXT[:60], max_length=2, progress=False)
    ids = [tok.bos_token_id] + tok(TEXT[:60], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        nll = sum(-torch.log_softmax(m(torch.tensor([[ids[t - 1]]])).logits[0, -1].double(), -1)[ids[t]].item()
                  for t in range(1, len(ids)))
    assert abs(r.bits_per_byte - nll / math.log(2) / len(TEXT[:60].encode())) < 1e-4


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scores_are_an_error_not_a_figure(value):
    from surgery.errors import SurgeryError

    tok = byte_level_toy()
    m = tiny_llama(len(tok))
    with torch.no_grad():
        m.lm_head.weight[7, 0] = value  # tied: the embedding row too
    with pytest.raises(SurgeryError, match="non-finite"):
        bits_per_byte(m, tok, TEXT, progress=False)
