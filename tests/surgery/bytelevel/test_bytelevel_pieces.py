"""Pieces, split points, pairwise validity; the prefix index; tree attention against a plain forward."""

from __future__ import annotations

import bisect

import numpy as np
import pytest
import torch

from helpers import TEXTS, tokenizer, vocab
from surgery.bytelevel.cover import CoverTree, TokenIndex
from surgery.bytelevel.treeattn import PathCache, forward_tree, forward_window, logits_from_hidden
from surgery.bytelevel.validity import Canonicalizer

FAMILIES = ["smollm2-135m", "llama3-tokenizer", "qwen2-tokenizer", "gemma3-270m", "mistral-v1-tokenizer"]


@pytest.fixture(scope="module")
def smol():
    return Canonicalizer(tokenizer("smollm2-135m"), vocab("smollm2-135m"))


def test_pieces_and_split_points(smol):
    enc = smol.encode
    # "a  " is pieces a|␣␣ at the end of a text; a following letter takes the last space
    assert smol.last_piece(b"a  ", 0) == (1, enc(b"a"))
    assert smol.split_points(b"a  ", 1) == {2}
    assert smol.split_points(b"a ", 1) == set()
    # the tokens before the last piece follow the pieces of the whole prefix, not of their own text
    B, head = smol.last_piece(b"x\n\nIn", 0)
    assert B == 3 and head == enc(b"x") + enc(b"\n") + enc(b"\n") != enc(b"x\n\n")
    decisions = smol.split_decisions(b"x\n\n", 1, (2,))
    assert decisions[ord("I"), 0] == 1 and decisions[ord("\n"), 0] == 0 and decisions[256, 0] == 0
    assert decisions[0xE4, 0] == 2  # a lead byte decides nothing yet


def test_pair_validity(smol):
    v = smol.vocab
    ids = {s: v.surface_to_id[s.encode()] for s in (" hel", "lo", " hello", " the", " cat", "\xe9")}
    assert smol.pair_valid(ids[" the"], ids[" cat"])
    assert not smol.pair_valid(ids[" hel"], ids["lo"])  # BPE merges them into " hello"
    assert smol.first_valid(ids[" hello"])
    # a token holding half of a character is judged by the BPE model on the raw bytes
    half = v.byte_token_ids[0xC3]
    assert isinstance(smol.pair_valid(int(half), int(v.byte_token_ids[0xA9])), bool)


@pytest.mark.parametrize("asset", FAMILIES)
def test_canonical_encoding_is_admitted(asset):
    """The tokenizer's own encoding of real text: stable piece starts, valid pairs inside pieces."""
    canon = Canonicalizer(tokenizer(asset), vocab(asset))
    text = (TEXTS / "debian-reference.en.heldout.txt").read_text()[:400] + "\n  Naïve 中文, it's 1234.\n"
    z = (b" " if canon.vocab.dummy_prefix else b"") + text.encode()
    ids = canon.encode(z)
    assert canon.vocab.decode_bytes(ids, at_start=False) == z
    ends = set(np.cumsum([len(canon.vocab.surfaces[i]) for i in ids]).tolist()) | {0}
    B = 0
    for k in range(1, len(z) + 1):
        B2, head = canon.last_piece(z[:k], B)
        assert B2 >= B and B2 in ends
        B = B2
    enc = canon._tok.encode(z.decode("utf-8"), add_special_tokens=False)
    words = enc.word_ids
    pairs = [(ids[i - 1], ids[i]) for i in range(1, len(ids)) if words[i] == words[i - 1]]
    assert all(canon.pairs_valid(pairs))
    assert all(canon.first_valid(ids[i]) for i in range(len(ids)) if i == 0 or words[i] != words[i - 1])


def test_token_index_against_naive():
    v = vocab("smollm2-135m")
    index = TokenIndex(v, len(v) + 7)  # output layer larger than the vocabulary
    assert index.no_surface[len(v):].all()
    surf = [s for s in v.surfaces if s]
    for prefix in (b" th", b"e", b"\xc3", b"zzzzqq", b" "):
        lo, hi = index.range(prefix)
        assert sorted(index.sorted[lo:hi]) == sorted(s for s in surf if s.startswith(prefix))
        bytes_, bounds = index.children(prefix)
        for b, a0, a1 in zip(bytes_, bounds[:-1], bounds[1:]):
            assert all(s.startswith(prefix + bytes([b])) for s in index.sorted[a0:a1])
            assert a1 - a0 == sum(1 for s in surf if s.startswith(prefix + bytes([b])))
    assert bisect.bisect_left(index.sorted, b"") == 0


def test_exact_tree_is_every_segmentation():
    v = vocab("smollm2-135m")
    index = TokenIndex(v, len(v))
    data = b"the cats"
    tree = CoverTree(index, None)
    tree.extend(data)
    got = {tuple(tree.path(i)) for i in range(len(tree))}

    def segs(m):
        out = {()}
        for e in range(m + 1, len(data) + 1):
            for t in index.exact.get(data[m:e], ()):
                out |= {(t,) + rest for rest in segs(e)}
        return out

    assert got == segs(0)


def _models():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    yield "llama", LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2)).eval()
    yield "gemma3", Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"])).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_tree_attention_equals_plain_forward(impl):
    """Branches share a prefix; every path gives the logits of a plain forward (sliding windows included)."""
    for name, m in _models():
        m.config._attn_implementation = impl
        a, b = [1, 5, 6, 7, 8, 9, 10, 11], [1, 5, 6, 20, 21, 22, 23, 24, 25]
        with torch.no_grad():
            la, lb = m(torch.tensor([a])).logits[0], m(torch.tensor([b])).logits[0]
        tokens = a + b[3:]
        parents = list(range(-1, 7)) + [2, 8, 9, 10, 11, 12]
        pos = list(range(8)) + list(range(3, 9))
        lt = logits_from_hidden(m, forward_tree(m, tokens, parents, pos))
        assert torch.allclose(lt[:8], la, atol=1e-5), name
        assert torch.allclose(lt[8:], lb[3:], atol=1e-5), name
        ht, hb = forward_window(m, a, [(t, 2 if k == 0 else 8 + k - 1) for k, t in enumerate(b[3:])], chunk=2)
        assert torch.allclose(logits_from_hidden(m, hb), lb[3:], atol=1e-5), name
        cache = PathCache(m, 1)
        s1, s2 = cache.ensure([a[1:], b[1:]], [True, True])
        assert cache.forwards == 2  # start token, then both paths in one pass
        assert torch.allclose(cache.logp[s2], torch.log_softmax(lb[-1], -1), atol=1e-5), name
        remap = cache.compact([s2])
        s3 = cache.ensure([b[1:] + [40]], [True])[0]
        with torch.no_grad():
            lc = torch.log_softmax(m(torch.tensor([b + [40]])).logits[0, -1], -1)
        assert torch.allclose(cache.logp[s3], lc, atol=1e-5) and remap[s2] < s2, name


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_forward_window_chunks_see_only_their_trunk_prefix(impl):
    """Branch trees at several attach points, split into chunks (run latest first, the cache cut at each
    chunk's last attach point): every branch token gets the hidden state of a plain forward of its path."""
    for name, m in _models():
        m.config._attn_implementation = impl
        trunk = [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]
        T = len(trunk)
        # (token, parent): trees at trunk 1, 4 (two tokens deep), 4 again, 8, and 2 (listed out of order)
        branches = [(30, 1), (31, 4), (32, T + 1), (33, 4), (34, 8), (35, T + 4), (36, 2)]
        ht, hb = forward_window(m, trunk, branches, chunk=2)
        paths = []
        for t, p in branches:
            paths.append((paths[p - T] if p >= T else trunk[: p + 1]) + [t])
        with torch.no_grad():
            assert torch.allclose(logits_from_hidden(m, ht), m(torch.tensor([trunk])).logits[0], atol=1e-5), name
            for path, h in zip(paths, hb):
                ref = m(torch.tensor([path])).logits[0, -1]
                assert torch.allclose(logits_from_hidden(m, h[None])[0], ref, atol=1e-5), (name, path)


@pytest.mark.parametrize("order", ["interleaved", "late_child"])
def test_forward_window_any_branch_order(order):
    """A branch tree rooted at the trunk may be followed by children of an earlier branch token (two
    covering trees hang off the same trunk position): chunks must keep every token with its ancestors."""
    _, m = next(_models())
    trunk = [1, 5, 6, 7, 8, 9, 10, 11]
    T = len(trunk)
    if order == "interleaved":
        branches = [(30, 1), (31, T), (32, 4), (33, T), (34, T + 3), (35, 6), (36, T + 1)]
    else:  # a token whose parent lies far before the last trunk-rooted tree (the "-18" of a long text)
        branches = [(40 + k, 2 if k == 0 else T + k - 1) for k in range(20)] + [(70, 5), (71, T + 19), (72, T + 3)]
    ht, hb = forward_window(m, trunk, branches, chunk=2)
    paths = []
    for t, p in branches:
        paths.append((paths[p - T] if p >= T else trunk[: p + 1]) + [t])
    with torch.no_grad():
        for path, h in zip(paths, hb):
            ref = m(torch.tensor([path])).logits[0, -1]
            assert torch.allclose(logits_from_hidden(m, h[None])[0], ref, atol=1e-5), path


def test_node_limit_hint_names_what_to_do_in_the_mode_in_use(smol):
    """The hint of the node limit once told canonical-mode users to use canonical mode."""
    from surgery.errors import SurgeryError

    index = TokenIndex(smol.vocab, len(smol.vocab))
    hints = {}
    for mode, canon in (("exact", None), ("canonical", smol)):
        tree = CoverTree(index, canon, max_nodes=3)
        with pytest.raises(SurgeryError) as err:
            tree.extend(b"the cat sat on the mat")
        hints[mode] = err.value.hint
        assert mode in err.value.message
    assert "mode='canonical'" in hints["exact"]
    assert "mode=" not in hints["canonical"] and "max_nodes" in hints["canonical"]


def test_no_split_points_invented_inside_a_character():
    """Gemma-3 opens pieces only at added tokens (newlines); a prefix ending inside a Cyrillic or CJK
    character once got a split point before that character (the newline probe stood in for a character
    that can only be Cyrillic), and every such point grew a chain of nodes to the end of the piece: time
    grew with the square of the paragraph length. The next character completes the partial one."""
    canon = Canonicalizer(tokenizer("gemma3-270m"), vocab("gemma3-270m"))
    for text in ("Привет, как дела у тебя сегодня", "日本語の文章です"):
        z = text.encode()
        for k in range(1, len(z)):
            assert canon.split_points(z[:k], 0) == frozenset(), (text, k)
