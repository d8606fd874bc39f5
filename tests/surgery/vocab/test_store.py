"""Saved alignments: round trip, and a clear error against other tokenizers."""

from __future__ import annotations

import numpy as np
import pytest

from surgery.errors import AlignmentMismatchError, SurgeryError
from surgery.vocab.projection import build_projection
from surgery.vocab.store import load_alignment, save_alignment
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def test_round_trip(tmp_path):
    va, vb = canonical_vocabulary(byte_level_toy()), canonical_vocabulary(sentencepiece_toy())
    P = build_projection(va, vb)
    f = save_alignment(P, tmp_path / "w.safetensors")
    Q = load_alignment(f, va, vb)
    assert (P.matrix != Q.matrix).nnz == 0
    np.testing.assert_array_equal(P.kind, Q.kind)
    assert Q.config == P.config
    assert (tmp_path / "w.safetensors.json").exists()
    with pytest.raises(SurgeryError, match="already exists"):
        save_alignment(P, f)


def test_mismatch_is_an_error(tmp_path):
    va, vb = canonical_vocabulary(byte_level_toy()), canonical_vocabulary(sentencepiece_toy())
    other = canonical_vocabulary(byte_level_toy(300))
    f = save_alignment(build_projection(va, vb), tmp_path / "w.safetensors")
    with pytest.raises(AlignmentMismatchError, match="tokenizer A"):
        load_alignment(f, other, vb)
    with pytest.raises(AlignmentMismatchError, match="tokenizer B"):
        load_alignment(f, va, va)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SurgeryError, match="not a readable alignment"):
        load_alignment(bad, canonical_vocabulary(byte_level_toy()), canonical_vocabulary(sentencepiece_toy()))
