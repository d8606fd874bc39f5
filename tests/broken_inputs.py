"""The broken inputs of the bad-input catalogue (tests/test_bad_input_catalogue.py).

:func:`build_world` makes what every row shares: two tiny models (hidden 32, 2 layers) carrying the real SmolLM2
and Mistral tokenizers, texts, saved alignments. Each maker ``(world, case_dir) -> Path`` builds one broken input in
the row's own folder (a truncated shard, a NaN weight, a tokenizer that does not fit, a recipe naming one of them,
...), before the row snapshots what exists.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from helpers import asset_dir, tiny_llama

TEXT = "The cat sat on the mat. Der Rechner startet neu. 猫が座った。 1234 + 5678 = 6912!\n" * 8


# --------------------------------------------------------------------------- the world
def _save_tiny(tok_dir: Path, out: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    from surgery.checkpoint import save_checkpoint

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = tiny_llama(len(tok), seed=seed)
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    return save_checkpoint(model, tok, out)


def build_world(tmp_path_factory) -> dict:
    """Inputs shared by every row of the catalogue (never modified by a row: it checks them by hash)."""
    root = tmp_path_factory.mktemp("world")
    a = _save_tiny(asset_dir("smollm2-135m"), root / "model-a", seed=1)  # byte-level BPE, 49,152 tokens
    b = _save_tiny(asset_dir("mistral-v1-tokenizer"), root / "model-b", seed=2)  # SentencePiece, 32,000 tokens
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    (root / "latin1.txt").write_bytes("café crème brûlée, à la carte\n".encode("latin-1"))
    from surgery.cli import main

    aligned = tmp_path_factory.mktemp("alignments")
    assert main(["align", str(a), str(b), "--out", str(aligned / "ab.safetensors"), "--json", "--top-k", "4"]) == 0
    assert main(["align", str(b), str(a), "--out", str(aligned / "ba.safetensors"), "--json", "--top-k", "4"]) == 0
    return {"root": root, "a": a, "b": b, "text": root / "text.txt", "empty": root / "empty.txt",
            "latin1": root / "latin1.txt", "alignment_ab": aligned / "ab.safetensors",
            "alignment_ba": aligned / "ba.safetensors", "tok_a": asset_dir("smollm2-135m"),
            "tok_b": asset_dir("mistral-v1-tokenizer")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _shard(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def truncated_model(w, d):
    m = _copy(w["a"], d / "truncated")
    s = _shard(m)
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    return m


def corrupt_weights(w, d):
    m = _copy(w["a"], d / "corrupt")
    _shard(m).write_bytes(b"\xff" * 64)
    return m


def nan_model(w, d):
    """Model A with one NaN in its embedding (a valid safetensors file)."""
    from safetensors.torch import load_file, save_file

    m = _copy(w["a"], d / "nan")
    s = _shard(m)
    t = load_file(str(s))
    k = next(k for k in t if "embed_tokens" in k)
    t[k][5, 3] = float("nan")
    save_file(t, str(s), metadata={"format": "pt"})
    return m


def no_config(w, d):
    m = _copy(w["a"], d / "noconfig")
    (m / "config.json").unlink()
    return m


def corrupt_config(w, d):
    m = _copy(w["a"], d / "badconfig")
    (m / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    return m


def corrupt_tokenizer(w, d):
    t = d / "badtok"
    t.mkdir()
    (t / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    (t / "tokenizer_config.json").write_text("{}")
    return t


def truncated_tokenizer(w, d):
    t = _copy(w["tok_a"], d / "truncatedtok")
    p = t / "tokenizer.json"
    p.write_bytes(p.read_bytes()[:5000])
    return t


def model_with_corrupt_tokenizer(w, d):
    m = _copy(w["a"], d / "badtokmodel")
    (m / "tokenizer.json").write_text("{not json")
    return m


def model_b_with_tokenizer_a(w, d):
    """Model B (32,000 rows) carrying model A's tokenizer (49,152 tokens): a tokenizer that does not fit."""
    m = _copy(w["b"], d / "foreigntok")
    for f in m.glob("tokenizer*"):
        f.unlink()
    for f in w["a"].glob("tokenizer*"):
        shutil.copy(f, m / f.name)
    return m


def model_missing_a_tensor(w, d):
    """Model A without one of its layers' tensors, in its shard and its index alike (a consistent checkpoint that
    lacks a weight): transformers would fill it at random."""
    from safetensors.torch import load_file, save_file

    m = _copy(w["a"], d / "partial")
    s = _shard(m)
    t = load_file(str(s))
    key = next(k for k in t if "layers.1.mlp.up_proj" in k)
    del t[key]
    save_file(t, str(s), metadata={"format": "pt"})
    for index in m.glob("*.safetensors.index.json"):
        data = json.loads(index.read_text())
        del data["weight_map"][key]
        index.write_text(json.dumps(data))
    return m


def rows_file(content: str):
    """Model A with a transplant rows file holding ``content`` (``{rows}``: A's embedding rows)."""
    def make(w, d):
        m = _copy(w["a"], d / "withrows")
        rows = json.loads((m / "config.json").read_text())["vocab_size"]
        (m / "transplant_rows.json").write_text(content.replace("{rows}", str(rows)))
        return m
    return make


def encoder_model(w, d):
    """The shipped MiniLM: a BERT encoder, which transformers loads as a causal LM with a randomly made head."""
    return asset_dir("minilm")


def distill_yaml_with(side: str, make_model):
    """A distill recipe whose student (model A) or teacher (model B) is replaced by what ``make_model`` makes."""
    def make(w, d):
        m = make_model(w, d)
        text = distill_yaml(w, d)
        old = f"student:\n  model: {w['a']}" if side == "student" else f"  - model: {w['b']}"
        assert old in text
        return yaml_file(text.replace(old, old.replace(str(w["a" if side == "student" else "b"]), str(m))))(w, d)
    return make


def distill_yaml_writing_into(what: str):
    """A distill recipe whose ``output_dir`` overlaps an input: ``student`` (a copy of model A is the student and
    the output_dir), ``data`` (the folder that holds a copy of the train text), ``teacher`` (a folder inside model
    B). Returns the recipe; every input stays as it was when the run is refused."""
    def make(w, d):
        text = distill_yaml(w, d)
        if what == "student":
            out = _copy(w["a"], d / "student")
            text = text.replace(f"model: {w['a']}", f"model: {out}")
        elif what == "data":
            out = d / "data"
            out.mkdir()
            shutil.copy(w["text"], out / "train.txt")
            text = text.replace(f"train: {w['text']}", f"train: {out / 'train.txt'}")
        else:
            out = Path(w["b"]) / "run"
        return yaml_file(text.replace(f"output_dir: {d / 'run'}", f"output_dir: {out}"))(w, d)
    return make


def tokenizer_copy(w, d):
    """A copy of tokenizer A (an alignment may not be written into it)."""
    return _copy(w["tok_a"], d / "tok-a")


def alignment_sidecar(w, d):
    """An existing ``w.safetensors.json``: the metadata file an alignment written to ``w.safetensors`` would replace."""
    p = d / "w.safetensors.json"
    p.write_text("{}\n")
    return d / "w.safetensors"


def output_holding_the_text(w, d):
    """An existing output folder that holds the heal's text (the text is the returned path)."""
    (d / "out").mkdir()
    return Path(shutil.copy(w["text"], d / "out" / "train.txt"))


def text_dir(w, d):
    p = d / "adir.txt"
    p.mkdir()
    return p


def unreadable_text(w, d):
    """A text file without read permission (as root, permissions do not apply: a folder stands in)."""
    p = d / "secret.txt"
    p.write_text(TEXT)
    p.chmod(0)
    if os.access(p, os.R_OK):
        p.chmod(0o644)
        p.unlink()
        p.mkdir()
    return p


def yaml_file(content: str):
    def make(w, d):
        p = d / "recipe.yaml"
        p.write_text(content)
        return p
    return make


def distill_yaml(w, d, extra: str = "", steps: int = 1) -> str:
    return (f"output_dir: {d / 'run'}\nstudent:\n  model: {w['a']}\nteachers:\n  - model: {w['b']}\n{extra}"
            f"data:\n  train: {w['text']}\n  heldout: {w['text']}\n  block_chars: 120\n  max_tokens: 32\n"
            f"train:\n  steps: {steps}\n  batch_size: 1\n  micro_batch_size: 1\n  eval_max_bytes: 200\n"
            f"  eval_max_length: 64\n  checkpoint_every: 100\n  threads: 1\n")


def alignment(kind: str):
    """A saved alignment A→B (built once per module) that is truncated, corrupt, or built for other tokenizers."""
    def make(w, d):
        p = d / "w.safetensors"
        shutil.copy(w["alignment_ba" if kind == "mismatch" else "alignment_ab"], p)
        if kind == "truncated":
            p.write_bytes(p.read_bytes()[: p.stat().st_size - 100])
        elif kind == "corrupt":
            data = bytearray(p.read_bytes())
            data[-50:] = b"\x00" * 50
            p.write_bytes(bytes(data))
        recipe = d / "recipe.yaml"
        recipe.write_text(distill_yaml(w, d).replace(f"  - model: {w['b']}\n",
                                                      f"  - model: {w['b']}\n    alignment: {p}\n"))
        return recipe
    return make


def existing_dir(w, d):
    p = d / "taken"
    p.mkdir()
    (p / "keep.txt").write_text("do not lose me")
    return p


def existing_file(w, d):
    p = d / "taken.safetensors"
    p.write_bytes(b"do not lose me")
    return p
