"""Streaming transplant: body tensors pass through bit for bit, rows equal the in-memory path, clear errors."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open

from helpers import asset_dir, tiny_llama, tokenizer
from surgery.checkpoint import CheckpointReader, INDEX_NAME, save_checkpoint
from surgery.errors import SurgeryError
from surgery.transplant import TransplantConfig, transplant, transplant_checkpoint
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def _tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_NAME).read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / shard), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _base(tmp_path, old_tok, tie=True, dtype=torch.bfloat16, shard=30_000, model=None):
    model = model if model is not None else tiny_llama(len(old_tok), seed=3, tie=tie)
    return save_checkpoint(model.to(dtype), old_tok, tmp_path / "base", max_shard_bytes=shard)


@pytest.fixture(scope="module")
def toks():
    return byte_level_toy(320), sentencepiece_toy(150)


@pytest.mark.parametrize("tie", [True, False])
def test_body_bit_identical_dtype_kept_and_index(tmp_path, toks, tie):
    from transformers import AutoModelForCausalLM

    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=tie)
    assert len(set(json.loads((base / INDEX_NAME).read_text())["weight_map"].values())) > 2
    out = tmp_path / "out"
    rep = transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out),
                                TransplantConfig(method="mean"), progress=False, max_shard_bytes=30_000)
    before, after = _tensors(base), _tensors(out)
    changed = {"model.embed_tokens.weight", "lm_head.weight"}
    assert set(after) == set(before)  # a tied head stays unstored, an untied one is rewritten
    for k, v in before.items():
        if k not in changed:
            assert after[k].dtype == torch.bfloat16
            assert after[k].view(torch.int16).equal(v.view(torch.int16)), k
    assert after["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert after["model.embed_tokens.weight"].shape[0] == rep["new_vocab"]["rows_padded"] == 256
    assert ("lm_head.weight" in after) == (not tie) and rep["head"] == ("tied" if tie else "untied")
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s == f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                   for i, s in enumerate(shards, 1))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in after.values())
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {k for k, v in index["weight_map"].items() if v == s}
    assert rep["stream"]["output_dtype"] == "bfloat16" and (out / "transplant_rows.json").exists()
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.vocab_size == 256 and m.config.tie_word_embeddings == tie
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def new_tok_dir(tmp_path, tok):
    d = tmp_path / "newtok"
    if not d.exists():
        tok.save_pretrained(d)
    return d


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_rows_equal_in_memory_rows(tmp_path, toks, tie):
    from transformers import AutoModelForCausalLM

    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=tie)
    out = tmp_path / "out"
    cfg = TransplantConfig(method="mean", untie=tie)
    transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), cfg, progress=False)
    mem = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    mem, _ = transplant(mem, old_tok, new_tok, cfg)
    after = _tensors(out)
    assert torch.equal(after["model.embed_tokens.weight"], mem.get_input_embeddings().weight)
    assert torch.equal(after["lm_head.weight"], mem.get_output_embeddings().weight)


def test_layer_streamer_matches_full_forward(tmp_path, toks):
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.transplant.calibration import head_inputs
    from surgery.transplant.streaming import LayerStreamer, model_skeleton

    old_tok, _ = toks
    base = _base(tmp_path, old_tok, tie=False, dtype=torch.float32)
    texts = ["the cat sat on the mat", "Debian packages are built from source."]
    full = head_inputs(AutoModelForCausalLM.from_pretrained(base).eval(), old_tok, texts)
    reader = CheckpointReader(base)
    skeleton = model_skeleton(AutoConfig.from_pretrained(base))
    with LayerStreamer(skeleton, reader, reader.get("model.embed_tokens.weight")) as ls:
        streamed = head_inputs(ls.model, old_tok, texts)
        assert all(p.is_meta for p in skeleton.model.layers.parameters())  # dropped after each layer
    assert all(p.is_meta for p in skeleton.parameters())  # nothing kept after the forward
    assert torch.equal(full, streamed)


def test_lockstep_calibration_reads_each_layer_once_and_matches_the_in_memory_forward(tmp_path, toks):
    """All calibration texts go through the streamed layers together: one read per layer instead of
    one per text (texts of one length as one batch, the others in lockstep), and the hidden states of
    the in-memory calibration forward bit for bit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.transplant.calibration import head_inputs, length_groups
    from surgery.transplant.rows import calibration_sequences
    from surgery.transplant.streaming import LayerStreamer, model_skeleton

    old_tok, _ = toks
    base = _base(tmp_path, old_tok, tie=False, dtype=torch.float32)
    texts = ["the cat sat on the mat", "Debian packages are built from source.", "a", "zwei Wörter und mehr"]
    n_groups = len(length_groups(calibration_sequences(old_tok, texts, 5, "cpu")))
    assert 1 < n_groups < len(texts)  # both paths: a batch of equal lengths and a thread per length
    full = head_inputs(AutoModelForCausalLM.from_pretrained(base).eval(), old_tok, texts, max_tokens=5)
    reader = CheckpointReader(base)
    skeleton = model_skeleton(AutoConfig.from_pretrained(base))
    with LayerStreamer(skeleton, reader, reader.get("model.embed_tokens.weight")) as ls:
        together = ls.head_inputs(calibration_sequences(old_tok, texts, 5, ls.device))
        assert ls.layer_reads == skeleton.config.num_hidden_layers
        assert all(p.is_meta for p in skeleton.model.layers.parameters())
        one_by_one = head_inputs(ls.model, old_tok, texts, max_tokens=5)  # one forward per length group
        assert ls.layer_reads == skeleton.config.num_hidden_layers * (1 + n_groups)
    assert together.shape[0] == sum(min(5, len(old_tok(t, add_special_tokens=False)["input_ids"])) + 1 for t in texts)
    assert torch.equal(together, full)
    assert torch.equal(together, one_by_one)


def test_lockstep_calibration_error_is_raised_not_hung(tmp_path, toks):
    from transformers import AutoConfig

    from surgery.transplant.rows import calibration_sequences
    from surgery.transplant.streaming import LayerStreamer, model_skeleton

    old_tok, _ = toks
    base = _base(tmp_path, old_tok, tie=False, dtype=torch.float32)
    reader = CheckpointReader(base)
    skeleton = model_skeleton(AutoConfig.from_pretrained(base))
    with LayerStreamer(skeleton, reader, reader.get("model.embed_tokens.weight")) as ls:
        seqs = calibration_sequences(old_tok, ["one text", "another"], 8, ls.device)
        seqs[1] = torch.full((1, 4), 10**6)  # an id beyond the embedding: that thread fails, the other must not hang
        with pytest.raises(IndexError):
            ls.head_inputs(seqs)


def test_gemma_scaled_embedding_rows_stay_in_storage_scale(tmp_path, toks):
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    old_tok, new_tok = toks
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(old_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    base = _base(tmp_path, old_tok, model=Gemma3ForCausalLM(cfg).eval())
    out = tmp_path / "out"
    transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), TransplantConfig(method="mean"),
                          progress=False)
    mem, _ = transplant(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), old_tok, new_tok,
                        TransplantConfig(method="mean"))
    assert torch.equal(_tensors(out)["model.embed_tokens.weight"], mem.get_input_embeddings().weight)
    m = AutoModelForCausalLM.from_pretrained(out)
    assert float(m.get_input_embeddings().embed_scale) == pytest.approx(32 ** 0.5, rel=1e-2)  # bf16 buffer


def _no_output(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}")]


def test_truncated_shard_is_one_clear_error_and_writes_nothing(tmp_path, toks):
    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match="corrupt or truncated"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out),
                              TransplantConfig(method="mean"), progress=False)
    _no_output(tmp_path, out)


def test_tensor_missing_from_its_shard_is_named(tmp_path, toks):
    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok)
    idx = json.loads((base / INDEX_NAME).read_text())
    first = sorted(set(idx["weight_map"].values()))[0]
    idx["weight_map"]["model.layers.0.mlp.extra.weight"] = first
    (base / INDEX_NAME).write_text(json.dumps(idx))
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match="model.layers.0.mlp.extra.weight"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out),
                              TransplantConfig(method="mean"), progress=False)
    _no_output(tmp_path, out)


def _poison(folder, name, dtype=torch.bfloat16):
    """Overwrite the first value of tensor ``name`` in its shard with a NaN of ``dtype``, in place."""
    idx = json.loads((folder / INDEX_NAME).read_text())
    path = folder / idx["weight_map"][name]
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    start = 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]
    nan = torch.tensor([float("nan")], dtype=dtype).view(torch.uint8).numpy().tobytes()
    raw[start:start + len(nan)] = nan
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"])
def test_nan_tensor_refused_and_nothing_written(tmp_path, toks, name):
    from surgery.loading import load_model

    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok)
    _poison(base, name)
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=f"{name}.*NaN or inf"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out),
                              TransplantConfig(method="mean"), progress=False)
    _no_output(tmp_path, out)
    with pytest.raises(SurgeryError, match=f"{name}.*NaN or inf"):
        load_model(base)


def test_failure_after_the_body_copy_started_writes_nothing(tmp_path, toks):
    """The body copy starts as soon as the shard headers are checked; an old tokenizer that does not load (read
    after that) stops it: one clear error, no output, no temporary folder left."""
    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok)
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match="tokenizer"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out),
                              TransplantConfig(method="mean"), old_tokenizer=str(tmp_path / "no-such-tokenizer"),
                              progress=False)
    _no_output(tmp_path, out)


def test_cli_max_shard_size_and_dtype(tmp_path, toks):
    from surgery.cli import main

    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=False)
    out = tmp_path / "cli"
    assert main(["transplant", str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), "--method", "mean",
                 "--max-shard-size", "20KB", "--dtype", "float32"]) == 0
    index = json.loads((out / INDEX_NAME).read_text())
    sizes: dict[str, int] = {}
    biggest = 0
    for k, v in _tensors(out).items():
        assert v.dtype == torch.float32
        n = v.numel() * v.element_size()
        sizes[index["weight_map"][k]] = sizes.get(index["weight_map"][k], 0) + n
        biggest = max(biggest, n)
    assert len(sizes) > 3 and all(s <= max(20_000, biggest) for s in sizes.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert main(["transplant", str(base), str(new_tok_dir(tmp_path, new_tok)), str(tmp_path / "x"),
                 "--max-shard-size", "lots"]) == 2


@pytest.mark.integration
def test_smollm2_sized_rows_equal_in_memory_path(tmp_path):
    """SmolLM2's real tokenizer (49k) on a tiny model, into Llama-3's (128k): streamed rows = in-memory rows."""
    from transformers import AutoModelForCausalLM

    asset_dir("smollm2-135m")
    old_tok, new_tok = tokenizer("smollm2-135m"), tokenizer("llama3-tokenizer")
    base = _base(tmp_path, old_tok, tie=True, dtype=torch.float32, shard=2_000_000,
                 model=tiny_llama(len(old_tok), seed=5, hidden=16, layers=1))
    out = tmp_path / "out"
    transplant_checkpoint(str(base), str(asset_dir("llama3-tokenizer")), str(out), TransplantConfig(method="mean"),
                          progress=False)
    mem, _ = transplant(AutoModelForCausalLM.from_pretrained(base), old_tok, new_tok, TransplantConfig(method="mean"))
    got = _tensors(out)["model.embed_tokens.weight"]
    assert got.dtype == torch.float32 and torch.equal(got, mem.get_input_embeddings().weight)


def test_omp_reads_only_the_donor_embedding_and_matches_in_memory(tmp_path, toks):
    from transformers import AutoModelForCausalLM

    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=True)
    donor_model = tiny_llama(len(new_tok), seed=9, hidden=24)
    donor = save_checkpoint(donor_model, new_tok, tmp_path / "donor")
    cfg = TransplantConfig(method="omp", donor=str(donor), omp_k=4)
    out = tmp_path / "out"
    transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), cfg, progress=False)
    mem, _ = transplant(AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), old_tok, new_tok, cfg,
                        donor=AutoModelForCausalLM.from_pretrained(donor))
    assert torch.equal(_tensors(out)["model.embed_tokens.weight"], mem.get_input_embeddings().weight)


@pytest.mark.integration
def test_streamed_tokenadapt_with_logit_offsets_equals_in_memory(tmp_path, toks):
    """The bias-direction forward run layer by layer gives the in-memory rows bit for bit (float32)."""
    from transformers import AutoModelForCausalLM

    asset_dir("minilm")
    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=True, dtype=torch.float32)
    cfg = TransplantConfig(method="tokenadapt", cache_dir=str(tmp_path / "aux"), aux_dtype="float32", device="cpu")
    out = tmp_path / "out"
    rep = transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), cfg, progress=False)
    assert rep["method_stats"]["bias_direction"]["n"] > 0
    before, after = _tensors(base), _tensors(out)
    body = [k for k in before if k != "model.embed_tokens.weight"]
    assert all(after[k].view(torch.int32).equal(before[k].view(torch.int32)) for k in body)
    # every body tensor was read and checked by the calibration forward, then copied file to file
    assert rep["stream"]["tensors_copied_as_bytes"] == len(body) == rep["stream"]["tensors_passed_through"]
    mem, mrep = transplant(AutoModelForCausalLM.from_pretrained(base), old_tok, new_tok, cfg)
    assert rep["method_stats"]["bias_direction"] == mrep.data["method_stats"]["bias_direction"]
    assert torch.equal(_tensors(out)["model.embed_tokens.weight"], mem.get_input_embeddings().weight)


def test_streamed_calibration_with_a_pad_id_beyond_the_calibration_rows(tmp_path, toks):
    """A config whose pad_token_id is a high id (Qwen2: 151643) makes the embedding module check it against the
    rows it is given; the streamed calibration gives only the calibration tokens' rows, and still runs."""
    asset_dir("minilm")
    old_tok, new_tok = toks
    model = tiny_llama(len(old_tok), seed=3, tie=False)
    model.config.pad_token_id = len(old_tok) - 1
    base = save_checkpoint(model.to(torch.bfloat16), old_tok, tmp_path / "base", max_shard_bytes=30_000)
    assert json.loads((base / "config.json").read_text())["pad_token_id"] == len(old_tok) - 1
    cfg = TransplantConfig(method="tokenadapt", cache_dir=str(tmp_path / "aux"), aux_dtype="float32", device="cpu")
    rep = transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(tmp_path / "out"), cfg,
                                progress=False)
    assert rep["method_stats"]["bias_direction"]["n"] > 0


def test_capped_calibration_of_a_bf16_checkpoint_runs_in_bf16_close_to_float32(tmp_path, toks, monkeypatch):
    """A bfloat16 checkpoint whose calibration is capped (a large model; forced here by a small FLOPs budget)
    runs its streamed forward in bfloat16, and the report says so: the direction is the float32 forward's
    within bfloat16 precision. Uncapped, or stored in float32 or float16, the forward stays float32."""
    from transformers import AutoConfig

    from surgery.transplant import streaming
    from surgery.transplant.rows import calibration_dtype, streamed_bias_fn
    from surgery.transplant.streaming import layer_parameter_count, model_skeleton

    assert calibration_dtype(torch.bfloat16, capped=True) == torch.bfloat16
    assert calibration_dtype(torch.bfloat16, capped=False) == torch.float32
    assert calibration_dtype(torch.float16, capped=True) == torch.float32
    assert calibration_dtype(torch.float32, capped=True) == torch.float32
    old_tok, _ = toks
    base = _base(tmp_path, old_tok, tie=False, dtype=torch.bfloat16)
    reader = CheckpointReader(base)
    skeleton = model_skeleton(AutoConfig.from_pretrained(base))
    emb = reader.get("model.embed_tokens.weight").float()
    cfg = TransplantConfig(method="tokenadapt", device="cpu")
    monkeypatch.setattr(streaming, "CALIBRATION_FLOPS", 2 * layer_parameter_count(skeleton) * 200)
    d16, fit16 = streamed_bias_fn(skeleton, reader, old_tok, cfg, emb, torch.bfloat16)()
    d32, fit32 = streamed_bias_fn(skeleton, reader, old_tok, cfg, emb, torch.float32)()
    assert fit16["forward_dtype"] == "bfloat16" and "forward_dtype" not in fit32
    assert fit16["max_tokens_per_text"] == fit32["max_tokens_per_text"] < 384
    assert fit16["n"] == fit32["n"]
    assert not torch.equal(d16, d32)  # another forward
    assert float(d16.double() @ d32.double() / (d16.double().norm() * d32.double().norm())) > 0.99


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.o_proj.weight", "model.extra.weight"])
def test_nan_in_the_body_found_when_it_is_copied_unread(tmp_path, toks, name):
    """With logit offsets the body is copied file to file from the start, unread, and checked by the
    calibration forward that reads each layer (in a read-ahead thread); a tensor the forward never reads
    (not part of the architecture) is checked at the end. A NaN in either is one clear error naming the
    tensor, and nothing is written."""
    from safetensors.torch import save_file

    asset_dir("minilm")
    old_tok, new_tok = toks
    base = _base(tmp_path, old_tok, tie=True, dtype=torch.float32)
    if name == "model.extra.weight":  # one more shard, listed in the index
        save_file({name: torch.ones(8)}, str(base / "extra.safetensors"), metadata={"format": "pt"})
        idx = json.loads((base / INDEX_NAME).read_text())
        idx["weight_map"][name] = "extra.safetensors"
        (base / INDEX_NAME).write_text(json.dumps(idx))
    _poison(base, name, dtype=torch.float32)
    cfg = TransplantConfig(method="tokenadapt", cache_dir=str(tmp_path / "aux"), aux_dtype="float32", device="cpu")
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=f"{name}.*NaN or inf"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(out), cfg, progress=False)
    _no_output(tmp_path, out)


def test_match_keys_matches_prefixes_apart_but_never_another_layers_tensor():
    """Against the rule written out: a name matches itself, else the one key that ends with its longest suffix that
    keeps every index; several keys with that suffix, or none, leave it unmatched."""
    from surgery.transplant.streaming import match_keys

    keys = ["language_model.model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    names = ["model.language_model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.1.mlp.up_proj.weight", "model.language_model.layers.1.self_attn.q_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    assert match_keys(names, keys) == {
        "model.language_model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        # layer 1's up_proj is missing: layer 0's is the only key ending in mlp.up_proj.weight, and still no match
        "model.language_model.layers.1.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "lm_head.weight": "lm_head.weight",
    }


def test_a_base_that_lacks_a_layer_tensor_is_refused_before_anything_is_written(tmp_path):
    """A consistent checkpoint (index and shard agree) without layer 1's up_proj: transformers would make it at
    random; the streamed transplant refuses it by name and writes nothing."""
    from safetensors.torch import load_file, save_file

    old_tok, new_tok = byte_level_toy(320), sentencepiece_toy(150)
    base = _base(tmp_path, old_tok, shard=10**9)
    index = json.loads((base / INDEX_NAME).read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = base / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (base / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match=r"lacks 1 weight\(s\) .*model\.layers\.1\.mlp\.up_proj\.weight"):
        transplant_checkpoint(str(base), str(new_tok_dir(tmp_path, new_tok)), str(tmp_path / "out"),
                              TransplantConfig(method="mean"), progress=False)
    assert not (tmp_path / "out").exists()


def test_the_stored_weights_check_leaves_tensors_transformers_converts_to_the_load():
    """Mixtral's checkpoints store one tensor per expert, which transformers merges into one parameter on load: the
    names cannot be compared before loading, so the check stands aside (the load's own report decides); a Llama
    checkpoint without a tensor is refused."""
    from transformers import AutoConfig

    from surgery.transplant.streaming import check_weights_stored, model_skeleton

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=100)
    mixtral = model_skeleton(AutoConfig.for_model("mixtral", num_local_experts=2, **small))
    stored = [n for n, _ in mixtral.named_parameters() if ".experts." not in n]
    stored += [f"model.layers.0.block_sparse_moe.experts.{e}.w{i}.weight" for e in range(2) for i in (1, 2, 3)]
    check_weights_stored(mixtral, stored, "mixtral")
    llama = model_skeleton(AutoConfig.for_model("llama", **small))
    names = [n for n, _ in llama.named_parameters()]
    check_weights_stored(llama, names, "llama")
    with pytest.raises(SurgeryError, match=r"lacks 1 weight\(s\) its architecture \(LlamaForCausalLM\)"):
        check_weights_stored(llama, [n for n in names if "norm.weight" != n.split("model.")[-1]], "llama")
