"""Transplant on tiny models with real (toy-trained) tokenizers: copies, heads, specials, output, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny_llama, token_bytes
from surgery.errors import ConfigError, SurgeryError
from surgery.transplant import TransplantConfig, transplant, transplant_checkpoint
from surgery.vocab.surfaces import canonical_vocabulary
from toy_tokenizers import byte_level_toy, sentencepiece_toy


def shared_pairs(new_tok, old_tok) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference for the rows a transplant copies: ids of the new and old tokenizer whose
    tokens spell the same bytes, from ``convert_ids_to_tokens`` (not the alignment core); bytes spelled
    by more than one old id are left out."""
    nb, ob = token_bytes(new_tok), token_bytes(old_tok)
    old_ids: dict[bytes, list[int]] = {}
    for i, b in enumerate(ob):
        if b:
            old_ids.setdefault(b, []).append(i)
    pairs = [(i, old_ids[b][0]) for i, b in enumerate(nb) if b and len(old_ids.get(b, ())) == 1]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


@pytest.fixture
def toks():
    return byte_level_toy(320), sentencepiece_toy(150)


def _run(old_tok, new_tok, tie=True, **cfg):
    model = tiny_llama(len(old_tok), tie=tie)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    model, rep = transplant(model, old_tok, new_tok, TransplantConfig(**cfg))
    return model, rep, before_in, before_out


def test_shared_rows_are_copied_bit_for_bit(toks):
    old_tok, new_tok = toks
    model, rep, before, _ = _run(old_tok, new_tok, method="mean")
    n, o = shared_pairs(new_tok, old_tok)
    assert len(n) > 20
    w = model.get_input_embeddings().weight
    assert torch.equal(w[torch.as_tensor(n)], before[torch.as_tensor(o)])
    assert rep.data["counts"]["exact"] == len(n)
    copied = set(rep.copied_rows.tolist())
    assert set(n.tolist()) <= copied


def test_tied_head_stays_tied_and_padding_keeps_tokenizer_length(toks):
    old_tok, new_tok = toks
    model, rep, _, _ = _run(old_tok, new_tok, method="mean")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight.data_ptr() == emb.weight.data_ptr()
    assert model.config.tie_word_embeddings is True
    assert emb.weight.shape[0] == 256 and emb.weight.shape[0] % 128 == 0  # 150 → 256 rows
    assert model.config.vocab_size == 256 and head.out_features == 256
    assert len(rep.tokenizer) == len(new_tok) == 150
    out = model(input_ids=torch.tensor([rep.tokenizer("the cat sat")["input_ids"]]))
    assert out.logits.shape[-1] == 256 and torch.isfinite(out.logits).all()


def test_untie_gives_separate_head_with_copied_output_rows(toks):
    old_tok, new_tok = toks
    model, rep, before_in, before_out = _run(old_tok, new_tok, tie=False, method="mean")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert head.weight.data_ptr() != emb.weight.data_ptr()
    assert model.config.tie_word_embeddings is False
    n, o = shared_pairs(new_tok, old_tok)
    # untied source: input rows from the embedding, output rows from the head
    assert torch.equal(emb.weight[torch.as_tensor(n)], before_in[torch.as_tensor(o)])
    assert torch.equal(head.weight[torch.as_tensor(n)], before_out[torch.as_tensor(o)])
    assert rep.data["head"] == "untied"

    model2, rep2, b_in, _ = _run(old_tok, new_tok, tie=True, method="mean", untie=True)
    e2, h2 = model2.get_input_embeddings(), model2.get_output_embeddings()
    assert h2.weight.data_ptr() != e2.weight.data_ptr() and model2.config.tie_word_embeddings is False
    assert torch.equal(h2.weight[torch.as_tensor(n)], b_in[torch.as_tensor(o)])
    assert rep2.data["untied_by_request"] is True


def test_special_tokens_mapped_by_role_and_config_ids_updated(toks):
    old_tok, new_tok = toks  # old: <|endoftext|> is bos=eos; new: <bos>, <eos>, <pad>, <unk>
    model, rep, before, _ = _run(old_tok, new_tok, method="mean")
    w = model.get_input_embeddings().weight
    old_start = old_tok.bos_token_id
    assert torch.equal(w[new_tok.bos_token_id], before[old_start])
    assert torch.equal(w[new_tok.eos_token_id], before[old_tok.eos_token_id])
    assert model.config.bos_token_id == new_tok.bos_token_id
    eos = model.config.eos_token_id
    assert new_tok.eos_token_id in (eos if isinstance(eos, list) else [eos])
    assert model.config.pad_token_id == new_tok.pad_token_id
    assert model.generation_config.bos_token_id == new_tok.bos_token_id
    assert rep.data["counts"]["special_matched"] >= 2


def test_random_and_mean_rows_are_reproducible(toks):
    old_tok, new_tok = toks
    a, *_ = _run(old_tok, new_tok, method="random", seed=3)
    b, *_ = _run(old_tok, new_tok, method="random", seed=3)
    assert torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)


def test_mean_rows_are_the_mean_of_the_pieces(toks):
    old_tok, new_tok = toks
    model, rep, before, _ = _run(old_tok, new_tok, method="mean")
    ov, nv = canonical_vocabulary(old_tok), canonical_vocabulary(new_tok)
    w = model.get_input_embeddings().weight
    checked = 0
    for i in range(len(nv)):
        s = nv.surfaces[i]
        if s is None or s in ov.surface_to_id or i in set(rep.copied_rows.tolist()):
            continue
        pieces = ov.encode_bytes(s)
        if len(pieces) >= 2:
            torch.testing.assert_close(w[i], before[torch.as_tensor(pieces)].mean(0))
            checked += 1
    assert checked > 5


def test_gemma_scaled_embedding_survives():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    old_tok, new_tok = byte_level_toy(320), sentencepiece_toy(150)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(old_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                           sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(cfg).eval()
    emb = model.get_input_embeddings()
    cls, scale = type(emb), float(emb.embed_scale)
    assert scale != 1.0
    model, rep = transplant(model, old_tok, new_tok, TransplantConfig(method="mean"))
    emb2 = model.get_input_embeddings()
    assert type(emb2) is cls and float(emb2.embed_scale) == scale
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(emb2(ids), emb2.weight[ids] * scale)
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_model_without_input_embeddings_is_a_surgery_error(toks):
    class NoEmb(torch.nn.Module):
        def get_input_embeddings(self):
            return None

    with pytest.raises(SurgeryError, match="no input embedding"):
        transplant(NoEmb(), *toks, TransplantConfig(method="mean"))


def test_an_old_tokenizer_with_more_ids_than_the_model_has_rows_is_refused(toks):
    old_tok, new_tok = toks
    model = tiny_llama(len(old_tok) - 1)  # one id past the last row
    with pytest.raises(SurgeryError, match=rf"{len(old_tok)} tokens but the model's embedding has only "
                                           rf"{len(old_tok) - 1} rows"):
        transplant(model, old_tok, new_tok, TransplantConfig(method="mean"))
    transplant(tiny_llama(len(old_tok) + 7), old_tok, new_tok, TransplantConfig(method="mean"))  # padded rows: fine


def test_config_is_validated_all_at_once():
    with pytest.raises(ConfigError) as e:
        TransplantConfig(method="nope", top_k=0, temperature=-1)
    msg = str(e.value)
    assert "unknown method" in msg and "top_k" in msg and "temperature" in msg
    with pytest.raises(ConfigError, match="donor"):
        TransplantConfig(method="omp")
    with pytest.raises(ConfigError, match="unknown (config )?key"):
        TransplantConfig.from_dict({"methd": "mean"})


# --------------------------------------------------------------------------- folders
@pytest.fixture
def folders(tmp_path, toks):
    from surgery.checkpoint import save_checkpoint

    old_tok, new_tok = toks
    model = tiny_llama(len(old_tok))
    base = save_checkpoint(model, old_tok, tmp_path / "base")
    tokdir = tmp_path / "newtok"
    new_tok.save_pretrained(tokdir)
    return base, tokdir, tmp_path


def test_transplant_checkpoint_reloads_and_generates(folders):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tokdir, tmp = folders
    out = tmp / "out"
    report = transplant_checkpoint(str(base), str(tokdir), str(out), TransplantConfig(method="mean"), progress=False)
    assert (out / "transplant_report.json").exists() and (out / "README.md").exists()
    assert (out / "transplant_rows.json").exists()
    saved = json.loads((out / "transplant_report.json").read_text())
    assert saved["counts"] == report["counts"] and saved["method"] == "mean"
    assert "wall" in saved["timings_s"]
    m = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 150 and m.config.vocab_size == 256
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    gen = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 4
    assert m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()


def test_bad_inputs_write_nothing(folders):
    base, tokdir, tmp = folders
    out = tmp / "out"
    with pytest.raises(SurgeryError, match="does not exist"):
        transplant_checkpoint(str(base), str(tmp / "missing-tok"), str(out), TransplantConfig(method="mean"))
    bad = tmp / "badtok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(SurgeryError, match="could not load a tokenizer"):
        transplant_checkpoint(str(base), str(bad), str(out), TransplantConfig(method="mean"))
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".out")]
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SurgeryError, match="already exists"):
        transplant_checkpoint(str(base), str(tokdir), str(out), TransplantConfig(method="mean"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_transplant_and_errors(folders, capsys):
    from surgery.cli import main

    base, tokdir, tmp = folders
    out = tmp / "cli-out"
    assert main(["transplant", str(base), str(tokdir), str(out), "--method", "mean", "--untie"]) == 0
    summary = capsys.readouterr().out
    assert "exact" in summary and str(out) in summary
    assert json.loads((out / "transplant_report.json").read_text())["head"] == "untied"
    assert main(["transplant", str(base), str(tokdir), str(out), "--method", "mean"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "already exists" in err[0]


def test_omp_transfers_donor_combinations(toks):
    """A donor row that is an exact combination of shared tokens' donor rows maps to the same
    combination of the base model's rows."""
    old_tok, new_tok = toks
    ov, nv = canonical_vocabulary(old_tok), canonical_vocabulary(new_tok)
    n_sh, o_sh = shared_pairs(new_tok, old_tok)
    torch.manual_seed(1)
    donor = torch.randn(len(new_tok), 24, dtype=torch.float64).float()
    model = tiny_llama(len(old_tok))
    before = model.get_input_embeddings().weight.detach().clone()
    shared = set(n_sh.tolist())
    target = next(i for i, s in enumerate(nv.surfaces) if s is not None and i not in shared)
    donor[target] = 0.5 * donor[n_sh[3]] - 0.25 * donor[n_sh[10]]
    cfg = TransplantConfig(method="omp", donor="x", omp_k=4, omp_ridge=0.0)  # exact fit: no shrinkage
    model, rep = transplant(model, old_tok, new_tok, cfg,
                            donor=donor)
    got = model.get_input_embeddings().weight[target]
    want = 0.5 * before[o_sh[3]] - 0.25 * before[o_sh[10]]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    assert rep.data["counts"]["omp"] == rep.data["counts"]["initialized"]
    with pytest.raises(SurgeryError, match="donor"):
        transplant(tiny_llama(len(old_tok)), old_tok, new_tok, TransplantConfig(method="omp", donor="x"),
                   donor=torch.randn(10, 24))


def test_chat_template_kept_carried_dropped_or_markers_added(toks):
    import copy

    old_tok, new_tok = copy.deepcopy(toks[0]), copy.deepcopy(toks[1])
    old_tok.chat_template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    # the new tokenizer lacks <|endoftext|>: the old template is dropped, and the caller's tokenizer untouched
    _, rep, _, _ = _run(old_tok, new_tok, method="mean")
    assert rep.data["chat_template"] == {"decision": "dropped", "missing_markers": ["<|endoftext|>"]}
    assert not rep.tokenizer.chat_template
    # markers added on request: the template is carried over and the marker row copied from the old one
    model, rep, before, _ = _run(old_tok, new_tok, method="mean", add_chat_markers=True)
    assert rep.data["added_chat_markers"] == ["<|endoftext|>"]
    assert rep.data["chat_template"]["decision"] == "carried"
    tid = rep.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tid == len(new_tok) and len(rep.tokenizer) == len(new_tok) + 1
    assert torch.equal(model.get_input_embeddings().weight[tid], before[old_tok.convert_tokens_to_ids("<|endoftext|>")])
    assert "<|endoftext|>" not in new_tok.get_vocab()  # the caller's tokenizer is not modified
    # a new tokenizer with its own template keeps it
    new2 = copy.deepcopy(new_tok)
    new2.chat_template = "{{ messages[0]['content'] }}"
    _, rep, _, _ = _run(old_tok, new2, method="mean")
    assert rep.data["chat_template"]["decision"] == "new" and rep.tokenizer.chat_template == new2.chat_template
