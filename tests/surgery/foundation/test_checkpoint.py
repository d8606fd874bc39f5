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


def test_check_finite_names_the_tensor():
    from surgery.checkpoint import check_finite

    check_finite("ok", torch.ones(3, dtype=torch.bfloat16))
    check_finite("ints", torch.tensor([1, 2]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(SurgeryError, match="'layer.w' holds NaN or inf"):
            check_finite("layer.w", torch.tensor([0.0, bad], dtype=torch.bfloat16))


def test_streamed_shards_round_trip_and_size_limit(tmp_path):
    """write_streamed_shards (one tensor at a time) reads back bit for bit through safetensors."""
    from safetensors import safe_open

    from surgery.checkpoint import CheckpointReader
    from surgery.shards import write_streamed_shards

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 7, generator=g).to(torch.bfloat16), "b": torch.randn(300, generator=g),
               "c": torch.arange(12).reshape(3, 4), "d": torch.randn(50, 50, generator=g).half(),
               "e": torch.zeros(0, 3)}
    entries = [(k, v.dtype, list(v.shape)) for k, v in tensors.items()]
    calls = []

    def produce(k):
        calls.append(k)
        return tensors[k]

    index = write_streamed_shards(entries, produce, tmp_path, max_shard_bytes=1500)
    assert calls == list(tensors)  # each produced once, in order
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and shards[0] == "model-00001-of-00003.safetensors"
    for s in shards:
        with safe_open(str(tmp_path / s), "pt") as f:
            for k in f.keys():
                assert f.get_tensor(k).dtype == tensors[k].dtype and torch.equal(f.get_tensor(k), tensors[k])
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    assert sorted(reader.keys) == sorted(tensors)
    for k, v in tensors.items():
        assert reader.dtype(k) == v.dtype and reader.shape(k) == list(v.shape) and torch.equal(reader.get(k), v)


def test_mapped_reads_equal_plain_reads_stay_private_and_check_the_file(tmp_path):
    """get(mapped=True) gives the stored tensor (offsets not page-aligned), writes to it never reach the
    file, non-finite values and a file truncated after the headers were read are clear errors."""
    from surgery.checkpoint import CheckpointReader
    from surgery.errors import SurgeryError
    from surgery.shards import write_streamed_shards

    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(3, generator=g).half(), "b": torch.randn(1000, 9, generator=g).to(torch.bfloat16),
               "c": torch.randn(2049, generator=g), "d": torch.arange(5), "e": torch.zeros(0, 3)}
    entries = [(k, v.dtype, list(v.shape)) for k, v in tensors.items()]
    write_streamed_shards(entries, tensors.__getitem__, tmp_path, max_shard_bytes=10**9)
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    for k, v in tensors.items():
        m = reader.get(k, mapped=True)
        assert m.dtype == v.dtype and torch.equal(m, v) and torch.equal(m, reader.get(k))
    shard = next(tmp_path.glob("*.safetensors"))
    before = shard.read_bytes()
    m = reader.get("c", mapped=True)
    m.fill_(7.0)
    assert shard.read_bytes() == before and torch.equal(reader.get("c", mapped=True), tensors["c"])

    data = bytearray(before)  # a NaN written into "c" behind the reader's back
    at = data.rfind(tensors["c"][:4].numpy().tobytes())
    data[at:at + 4] = torch.tensor([float("nan")]).numpy().tobytes()
    shard.write_bytes(bytes(data))
    with pytest.raises(SurgeryError, match="'c' holds NaN"):
        reader.get("c", mapped=True)
    shard.write_bytes(before[:-100])  # truncated after the headers were read
    with pytest.raises(SurgeryError, match="truncated"):
        reader.get("c", mapped=True)


def test_load_model_refuses_nan_weights(tmp_path):
    tok = byte_level_toy()
    m = tiny_llama(len(tok))
    with torch.no_grad():
        m.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    from surgery.checkpoint import write_safetensors_shards

    out = tmp_path / "bad"
    out.mkdir()
    write_safetensors_shards({k: v.contiguous() for k, v in m.state_dict().items() if k != "lm_head.weight"}, out)
    m.config.save_pretrained(out)
    with pytest.raises(SurgeryError, match="model.layers.1.mlp.up_proj.weight' holds NaN or inf"):
        load_model(out)


def test_model_options_defaults_and_errors():
    import argparse

    from surgery.commands._model_options import add_model_options, model_options

    p = argparse.ArgumentParser()
    add_model_options(p)
    dtype, device = model_options(p.parse_args([]))
    if not torch.cuda.is_available():
        assert dtype == torch.float32 and device.type == "cpu"
    assert model_options(p.parse_args(["--dtype", "bf16", "--device", "cpu"]))[0] == torch.bfloat16
    assert model_options(p.parse_args(["--dtype", "auto", "--device", "cpu"]))[0] == "auto"
    with pytest.raises(SurgeryError, match="unknown --dtype 'int8'"):
        model_options(p.parse_args(["--dtype", "int8"]))
    with pytest.raises(SurgeryError, match="--device"):
        model_options(p.parse_args(["--device", "tpu"]))
    q = argparse.ArgumentParser()
    q.add_argument("--device", default=None)
    add_model_options(q)  # an existing --device is kept
    assert model_options(q.parse_args(["--device", "cpu"]))[1].type == "cpu"
