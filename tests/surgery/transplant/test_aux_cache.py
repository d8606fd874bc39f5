"""The aux-embedding cache records what it was built from; a stale, truncated or corrupt file is rebuilt
with a log line and never used."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from helpers import asset_dir
from surgery.transplant.aux_embeddings import AuxEmbedder, cache_path, vocab_embeddings
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy

IDS = np.arange(40, 90)


@pytest.fixture(scope="module")
def aux():
    asset_dir("minilm")
    return AuxEmbedder("minilm", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def vocab():
    return canonical_vocabulary(byte_level_toy(320))


def _fresh(aux, vocab, tmp_path):
    emb, st = vocab_embeddings(aux, vocab, IDS, tmp_path)
    path = cache_path(tmp_path, aux, vocab)
    assert st["computed"] == len(IDS) and path.exists()
    return emb, path


def test_cache_records_its_sources_and_is_reused(aux, vocab, tmp_path):
    emb, path = _fresh(aux, vocab, tmp_path)
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["aux_key"] == aux.key and meta["vocab_size"] == len(vocab)
    assert meta["surfaces_sha256"] and meta["max_seq_length"] == aux.max_seq_length
    again, st = vocab_embeddings(aux, vocab, IDS, tmp_path)
    assert st["computed"] == 0 and np.array_equal(again, emb)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    m = os.umask(0o022)
    os.umask(m)
    return m


def _rewrite(path, **changes):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez(path, **arrays)


@pytest.mark.parametrize("damage", ["truncated", "other_aux_model", "other_vocabulary", "no_record", "nan_rows"])
def test_stale_or_broken_cache_is_rebuilt_with_a_log_line(damage, aux, vocab, tmp_path, caplog):
    emb, path = _fresh(aux, vocab, tmp_path)
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        poisoned = z["emb"].copy()
    poisoned[IDS] = 0.5  # what a stale file would hand back if it were used
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "other_aux_model":
        _rewrite(path, emb=poisoned, meta=np.array(json.dumps({**meta, "aux_key": "another-model-0123"})))
    elif damage == "other_vocabulary":
        _rewrite(path, emb=poisoned, meta=np.array(json.dumps({**meta, "surfaces_sha256": "0" * 64})))
    elif damage == "no_record":
        np.savez(path, emb=poisoned, done=np.ones(len(vocab), dtype=bool))
    elif damage == "nan_rows":
        poisoned[IDS[0]] = np.nan
        _rewrite(path, emb=poisoned)
    with caplog.at_level(logging.WARNING, logger="surgery.transplant.aux_embeddings"):
        again, st = vocab_embeddings(aux, vocab, IDS, tmp_path)
    assert st["computed"] == len(IDS) and np.array_equal(again, emb)  # rebuilt, not read
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    with np.load(path) as z:  # the rebuilt file is whole and carries the right record again
        assert json.loads(str(z["meta"])) == meta and np.isfinite(z["emb"][IDS]).all()


def test_aux_key_follows_the_weights_content(tmp_path):
    """Two aux folders that differ only in their weights' bytes (same sizes) get different cache keys."""
    import shutil

    from surgery.transplant.aux_embeddings import aux_key

    src = asset_dir("minilm")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(src, a)
    shutil.copytree(src, b)
    w = next(b.rglob("*.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    assert aux_key(str(a)).split("-")[-1] != aux_key(str(b)).split("-")[-1]
