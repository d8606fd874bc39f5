"""Checkpoint I/O: round trip with identical logits, shards + index, atomic writes, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import tiny_llama
from surgery.checkpoint import atomic_output_dir, save_checkpoint, validate_model_folder
from surgery.errors import SurgeryError
from surgery.loading import load_model
from toy_tokenizers import byte_level_toy


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_logits_identical(tmp_path, tie):
    tok = byte_level_toy()
    m = tiny_llama(len(tok), seed=1, tie=tie)
    x = torch.randint(0, len(tok), (2, 17))
    out = save_checkpoint(m, tok, tmp_path / "ckpt", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    m2 = load_model(out)
    assert m2.config.tie_word_embeddings == tie
    with torch.no_grad():
        assert torch.equal(m(x).logits, m2(x).logits)
    # a second save → load is stable too (plain transformers)
    m3 = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(m(x).logits, m3(x).logits)


def test_refuses_to_overwrite(tmp_path):
    tok = byte_level_toy()
    m = tiny_llama(len(tok))
    save_checkpoint(m, tok, tmp_path / "c")
    before = sorted(p.name for p in (tmp_path / "c").iterdir())
    with pytest.raises(SurgeryError, match="already exists"):
        save_checkpoint(m, tok, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == before
    save_checkpoint(m, tok, tmp_path / "c", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nan_weights_refused(tmp_path):
    tok = byte_level_toy()
    m = tiny_llama(len(tok))
    with torch.no_grad():
        m.model.norm.weight[0] = float("nan")
    with pytest.raises(SurgeryError, match="NaN"):
        save_checkpoint(m, tok, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_bad_folders(tmp_path):
    with pytest.raises(SurgeryError, match="does not exist"):
        validate_model_folder(tmp_path / "nope")
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly" / "config.json").write_text("{}")
    with pytest.raises(SurgeryError, match="no safetensors weights"):
        validate_model_folder(tmp_path / "cfgonly")
    tok = byte_level_toy()
    out = save_checkpoint(tiny_llama(len(tok)), tok, tmp_path / "trunc")
    shard = next(out.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SurgeryError, match="corrupt or truncated"):
        validate_model_folder(out)
