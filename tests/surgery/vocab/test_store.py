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


@pytest.fixture
def saved(tmp_path):
    va, vb = canonical_vocabulary(byte_level_toy()), canonical_vocabulary(sentencepiece_toy())
    P = build_projection(va, vb)
    return va, vb, P, save_alignment(P, tmp_path / "w.safetensors")


def test_truncated_file_is_a_clear_error(saved):
    va, vb, _, f = saved
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(SurgeryError, match="truncated"):
        load_alignment(f, va, vb)


def test_flipped_bytes_in_the_arrays_are_caught(saved):
    """The header is intact and the shapes fit: only the recorded hash of the arrays tells."""
    va, vb, _, f = saved
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # inside the last array
    f.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match="do not match the hash"):
        load_alignment(f, va, vb)


def test_other_parameters_are_a_mismatch(saved):
    from surgery.vocab.projection import ProjectionConfig

    va, vb, P, f = saved
    assert load_alignment(f, va, vb, P.config).config == P.config
    with pytest.raises(AlignmentMismatchError, match="max_pieces"):
        load_alignment(f, va, vb, ProjectionConfig(max_pieces=2))


def test_saved_file_follows_the_umask_and_a_folder_is_refused(saved, tmp_path):
    import os

    _, _, P, f = saved
    m = os.umask(0o022)
    os.umask(m)
    assert f.stat().st_mode & 0o777 == 0o666 & ~m
    (tmp_path / "d").mkdir()
    with pytest.raises(SurgeryError, match="is a folder"):
        save_alignment(P, tmp_path / "d", overwrite=True)
    with pytest.raises(SurgeryError, match="is a folder"):
        load_alignment(tmp_path / "d", *saved[:2])
