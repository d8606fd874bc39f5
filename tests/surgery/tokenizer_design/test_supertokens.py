"""Superword tokenizers: spaces inside tokens, the stage-2 curriculum, HF folders that round-trip."""

from __future__ import annotations

import json
import random
import re

import pytest

from surgery.errors import ConfigError, SurgeryError
from surgery.tokenizer_design.supertokens import (
    CONTROL_DIR, META_NAME, SPECIAL_TOKENS, SupertokenConfig, random_chunks, train_supertokens, train_tokenizer,
)

WORDS = ("system package manager install file user read write kernel module driver network device console "
         "message night middle manual admin root shell script command option value config service boot disk "
         "partition mount label memory process thread signal socket pipe link path home directory").split()
PHRASES = ["the package manager", "of the system", "in the middle of the night", "you can", "as root"]


def _corpus(n_lines: int = 400, seed: int = 0) -> str:
    """Random lines of words and recurring multi-word phrases (about 23 KB)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(4, 9)
        lines.append(" ".join(rng.choice(PHRASES) if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(k)))
    return "\n".join(lines) + "\n"


CORPUS = _corpus()
ROUND_TRIP = [
    CORPUS[:500],
    "Ünïcödé façade — naïve café: 東京の天気は晴れです。中文文本。 🙂🚀 tabs\tand\r\nCRLF  double  spaces\n\n",
    "def f(x):\n    return x ** 2  # 12345678 and 3.14159\n",
    " leading space, trailing space ",
    "<s> literal special text </s> <|im_start|>",
    "",
]
INNER_SPACE = re.compile(rb"\S \S")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("texts") / "corpus.txt"
    p.write_text(CORPUS)
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_file):
    """One tiny superbpe tokenizer with its BPE control, saved and reloaded (shared by the tests below)."""
    out = tmp_path_factory.mktemp("tok") / "superbpe"
    res = train_supertokens([corpus_file], out, SupertokenConfig("superbpe", vocab_size=420, transition=340),
                            with_control=True)
    return out, res


def _surfaces(folder):
    from transformers import AutoTokenizer

    from surgery.vocab.surfaces import canonical_vocabulary

    return canonical_vocabulary(AutoTokenizer.from_pretrained(str(folder)))


def test_a_supertoken_spans_a_space(trained):
    out, res = trained
    v = _surfaces(out)
    spanning = [s for s in v.surfaces if s is not None and INNER_SPACE.search(s)]
    assert spanning, "no token joins two words"
    assert any(b"the package" in s for s in spanning)
    # The control (word-regex BPE of the same size) never crosses a space between words.
    vc = _surfaces(out / CONTROL_DIR)
    assert not [s for s in vc.surfaces if s is not None and INNER_SPACE.search(s)]
    assert res.vocab_size == 420 and res.control_vocab_size == 420


def test_superbpe_compresses_better_than_its_control(trained):
    _, res = trained
    assert res.bytes_per_token > 1.1 * res.control_bytes_per_token


def test_chunks_tokens_can_span_spaces():
    tok = train_tokenizer([CORPUS], SupertokenConfig("chunks", vocab_size=400))
    spanning = [t for t in tok.get_vocab() if INNER_SPACE.search(t.replace("Ġ", " ").encode())]
    assert spanning
    assert tok.decode(tok.encode(CORPUS).ids) == CORPUS


def test_random_chunks_cover_the_text_within_the_length_range():
    text = "".join(random.Random(1).choice("ab c\n") for _ in range(5000))
    chunks = random_chunks(text, random.Random(0), 4, 23)
    assert "".join(chunks) == text
    assert all(4 <= len(c) <= 23 for c in chunks[:-1]) and 1 <= len(chunks[-1]) <= 23
    assert len({len(c) for c in chunks}) > 10  # lengths really vary


def _naive_bpe(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """Reference BPE: apply each merge, in rank order, left to right over the whole sequence."""
    for a, b in merges:
        i, out = 0, []
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def test_superbpe_encoding_is_stage1_then_stage2_merges(trained):
    """The saved tokenizer = stage-1 merges, then stage-2 merges, applied in order (naive reference)."""
    from tokenizers import Tokenizer

    out, _ = trained
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    meta = json.loads((out / META_NAME).read_text())
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    n1 = meta["info"]["stage1_merges"]
    assert meta["info"]["stage2_merges"] == len(merges) - n1 > 0
    stage1, stage2 = merges[:n1], merges[n1:]
    pre = tok.pre_tokenizer
    for text in [CORPUS[:2000], "the package manager of the console 2024 in the night"]:
        for piece, _ in pre.pre_tokenize_str(text):
            expected = _naive_bpe(_naive_bpe(list(piece), stage1), stage2)
            assert tok.model.tokenize(piece) and [t.value for t in tok.model.tokenize(piece)] == expected


@pytest.mark.parametrize("folder", ["", CONTROL_DIR])
def test_saved_folder_reloads_and_round_trips(trained, folder):
    from transformers import AutoTokenizer

    out, _ = trained
    tok = AutoTokenizer.from_pretrained(str(out / folder))
    assert [tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token] == list(SPECIAL_TOKENS[:4])
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]  # no automatic BOS
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 4


def test_saved_folder_feeds_the_alignment_core(trained):
    out, _ = trained
    v = _surfaces(out)
    assert v.family == "byte_level"
    assert v.ids_with_role("bos") == [1] and v.ids_with_role("eos") == [2]
    assert v.ids_with_role("turn_start") == [4] and v.ids_with_role("turn_end") == [5]
    assert sum(s is None for s in v.surfaces) == len(SPECIAL_TOKENS)
    meta = json.loads((out / META_NAME).read_text())
    assert meta["config"]["method"] == "superbpe" and meta["transition"] == 340
    assert meta["texts"][0]["bytes"] == len(CORPUS.encode())


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        SupertokenConfig("nope", vocab_size=10, chunk_min=9, chunk_max=3, min_frequency=0).validate()
    msg = str(e.value)
    for part in ("method 'nope'", "vocab_size 10", "chunk lengths", "min_frequency 0"):
        assert part in msg
    with pytest.raises(ConfigError, match="transition 5000"):
        SupertokenConfig(vocab_size=1000, transition=5000).validate()


def test_existing_output_is_refused_before_training(tmp_path, corpus_file):
    out = tmp_path / "tok"
    out.mkdir()
    with pytest.raises(SurgeryError, match="already exists"):
        train_supertokens([corpus_file], out, SupertokenConfig(vocab_size=300))
    missing = tmp_path / "fresh"
    with pytest.raises(SurgeryError, match="does not exist"):
        train_supertokens([tmp_path / "missing.txt"], missing, SupertokenConfig(vocab_size=300))
    assert not missing.exists() and not list(tmp_path.glob(".fresh*"))


def test_cli_train(tmp_path, corpus_file, capsys):
    from surgery.cli import main

    out = tmp_path / "chunks"
    argv = ["supertokens", "train", "--text", str(corpus_file), "--vocab-size", "320", "--out", str(out),
            "--method", "chunks", "--with-control", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "chunks" and res["vocab_size"] == 320
    assert (out / "tokenizer.json").exists() and (out / CONTROL_DIR / "tokenizer.json").exists()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0


def test_superbpe_beats_bpe_and_chunks_on_shipped_english():
    """The issue's ordering at a test-sized vocabulary: superbpe > 1.1 x BPE and > chunks on held-out English."""
    from helpers import TEXTS

    from surgery.tokenizer_design.supertokens import bytes_per_token

    train, held = TEXTS / "debian-reference.en.train.txt", TEXTS / "debian-reference.en.heldout.txt"
    if not (train.exists() and held.exists()):
        pytest.skip("shipped texts missing")
    texts, heldout = [train.read_text()], [held.read_text()]
    bpt = {m: bytes_per_token(train_tokenizer(texts, SupertokenConfig(m, vocab_size=4000)), heldout)
           for m in ("bpe", "chunks", "superbpe")}
    assert bpt["superbpe"] >= 1.10 * bpt["bpe"]
    assert bpt["superbpe"] > bpt["chunks"]
