"""Token identity: the id the core calls emitted is the one the tokenizer itself produces mid-text."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import TEXTS, TOKENIZER_ASSETS, tokenizer, vocab
from surgery.vocab.identity import surface_groups

PREFIXES = ("Hello", "x", "1", "\n", "(", "ab")


def slow_groups(surfaces):
    groups = {}
    for i, s in enumerate(surfaces):
        if s is not None:
            groups.setdefault(s, []).append(i)
    return {s: tuple(ids) for s, ids in groups.items() if len(ids) > 1}


def test_surface_groups_against_a_slow_reference():
    rng = np.random.default_rng(0)
    alphabet = [b"a", b"b", b" a", b"ab", None]
    surfaces = [alphabet[k] for k in rng.integers(0, len(alphabet), size=200)]
    first, dups = surface_groups(surfaces)
    ref = slow_groups(surfaces)
    assert dict(dups) == ref
    assert [ids[0] for _, ids in dups] == sorted(ids[0] for ids in ref.values())
    assert first == {s: surfaces.index(s) for s in set(surfaces) if s is not None}


def tail_after_prefix(tok, prefix: str, text: str) -> list[int] | None:
    """The ids the tokenizer produces for ``text`` right after ``prefix``, or None when the
    encoding does not split at the boundary (the prefix merged with the text)."""
    head = tok(prefix, add_special_tokens=False)["input_ids"]
    full = tok(prefix + text, add_special_tokens=False)["input_ids"]
    if full[:len(head)] != head:
        return None
    return full[len(head):]


@pytest.mark.integration
@pytest.mark.parametrize("name", TOKENIZER_ASSETS)
def test_emitted_id_of_every_duplicated_surface_is_what_the_tokenizer_produces_mid_text(name):
    tok, v = tokenizer(name), vocab(name)
    groups = slow_groups(v.surfaces)
    assert sorted(v.surface_groups) == sorted(groups.values())
    never = set(v.never_emitted.tolist())
    assert never == set(np.flatnonzero(~v.is_emitted).tolist())
    assert v.is_emitted.shape == (len(v),) and v.is_emitted.dtype == bool
    for s, ids in groups.items():
        text = s.decode("utf-8")
        produced = None
        for prefix in PREFIXES:
            tail = tail_after_prefix(tok, prefix, text)
            if tail is not None and len(tail) == 1:
                produced = tail[0]
                break
        assert produced is not None, (name, s)
        assert produced in ids, (name, s, produced)
        assert v.surface_to_id[s] == produced
        assert v.is_emitted[produced]
        assert {i for i in ids if i != produced} <= never
        assert all(v.emitted_id[i] == produced for i in ids)
    # ids outside the groups are emitted and map to themselves
    in_groups = {i for ids in groups.values() for i in ids}
    assert never <= in_groups
    lone = np.setdiff1d(np.arange(len(v)), np.fromiter(in_groups, np.int64, len(in_groups)))
    assert np.array_equal(v.emitted_id[lone], lone) and v.is_emitted[lone].all()
    for special in v.roles:
        assert v.is_emitted[special]


@pytest.mark.integration
@pytest.mark.parametrize("name", ["gemma3-270m", "mistral-v1-tokenizer", "mistral-v3-tokenizer"])
def test_byte_fallback_twins_are_never_emitted_on_real_text(name):
    tok, v = tokenizer(name), vocab(name)
    never = v.never_emitted
    assert len(never) > 50  # byte fallback next to ordinary ASCII pieces
    for i in never.tolist():
        assert tok.convert_ids_to_tokens(i).startswith("<0x")
    text = "".join((TEXTS / f"debian-reference.{lang}.heldout.txt").read_text()[:20000] for lang in ("en", "de", "zh"))
    text += " \t\x01 ü 软件包 ~\x7f"
    used = set(tok(text, add_special_tokens=False)["input_ids"])
    assert not used & set(never.tolist())
    # the emitted twin of ',' is in the text's encoding
    assert v.surface_to_id[b","] in used and v.surface_to_id[b","] not in never


@pytest.mark.integration
@pytest.mark.parametrize("name", ["smollm2-135m", "llama3-tokenizer", "bert-tokenizer"])
def test_vocabularies_without_twins_emit_every_id(name):
    v = vocab(name)
    assert v.is_emitted.all() and len(v.never_emitted) == 0 and v.surface_groups == ()
    assert np.array_equal(v.emitted_id, np.arange(len(v)))


class FakeVocab:
    """Surfaces plus a mid-text encoder given as a table (what the tokenizer would produce)."""

    name = "fake"

    def __init__(self, surfaces, produces):
        self.surfaces = surfaces
        self.produces = produces

    def __len__(self):
        return len(self.surfaces)

    def encode_text_many(self, texts):
        return [self.produces[t] for t in texts]


def test_token_identity_resolved_and_unresolved_groups():
    from surgery.vocab.identity import token_identity

    # ids 0/3 share ",", the tokenizer produces 3; ids 1/4 share "ab", which it spells as two pieces
    # (unresolved: both stay emitted); id 5 is an invalid-UTF-8 twin of id 2 (no text encodes to it alone)
    surfaces = [b",", b"ab", b"\xff", b",", b"ab", b"\xff", None, b"a", b"b"]
    t = token_identity(FakeVocab(surfaces, {",": [3], "ab": [7, 8]}))
    assert t.is_emitted.tolist() == [False, True, True, True, True, True, True, True, True]
    assert t.never_emitted.tolist() == [0]
    assert t.emitted_id.tolist() == [3, 1, 2, 3, 4, 5, 6, 7, 8]
    assert t.surface_to_id == {b",": 3, b"ab": 1, b"\xff": 2, b"a": 7, b"b": 8}
    assert t.groups == ((0, 3), (1, 4), (2, 5)) and t.unresolved == ((1, 4), (2, 5))
