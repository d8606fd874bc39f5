"""The tokenizer report: every number against a direct count or a brute-force reference."""

from __future__ import annotations

import json
import random

import pytest
from helpers import TEXTS, tokenizer
from toy_tokenizers import byte_level_toy, sentencepiece_toy

from surgery.tokenizer_design.report import (
    english_parallel, format_report, number_probes, plot_report, shortest_paths, tokenizer_report,
)

EN = "the cat sat on the mat. 1234 dogs and 56 cats; the dog sat on the log.\nwhat? yes: no. 7 8 90\n"
DE = "die katze sass auf der matte. 1234 hunde und 56 katzen; der hund sass auf dem log.\nwas? ja: nein.\n"


@pytest.fixture
def texts(tmp_path):
    out = []
    for lang, t in (("en", EN), ("de", DE)):
        p = tmp_path / f"sample.{lang}.heldout.txt"
        p.write_text(t)
        out.append((str(p), t))
    return out


def _toys():
    return {"bl": byte_level_toy(), "sp": sentencepiece_toy()}


def test_numbers_match_a_direct_count(texts):
    toks = _toys()
    rep = tokenizer_report(list(toks), texts, tokenizers=toks)
    assert len(rep.rows) == 4
    for r in rep.rows:
        tok = toks[r.tokenizer]
        text = dict(texts)[r.text]
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert r.n_tokens == n
        assert r.n_bytes == len(text.encode("utf-8"))
        assert r.bytes_per_token == pytest.approx(len(text.encode("utf-8")) / n, abs=1e-4)
        assert r.tokens_per_word == pytest.approx(n / len(text.split()), abs=1e-4)
        en = len(tok(EN, add_special_tokens=False)["input_ids"])
        assert r.premium == pytest.approx(n / en, abs=1e-4)
        assert 0 <= r.shorter_path_share <= r.ambiguous_word_share <= 1
        assert r.words_checked == len(set(text.split()))


def test_overlap_equals_exact_pairs():
    from surgery.vocab.projection import exact_pairs

    toks = _toys()
    rep = tokenizer_report(list(toks), [("x.txt", EN)], tokenizers=toks)
    from surgery.vocab.surfaces import canonical_vocabulary

    va, vb = canonical_vocabulary(toks["bl"]), canonical_vocabulary(toks["sp"])
    ia, _ = exact_pairs(va, vb)
    shared = {va.surfaces[i] for i in ia.tolist()}
    assert rep.overlap["bl"]["sp"] == pytest.approx(len(shared) / len(va.surface_to_id), abs=1e-4)
    assert rep.overlap["bl"]["bl"] == 1.0 and 0 < rep.overlap["sp"]["bl"] <= 1


def _all_segmentations(target: bytes, pieces: set[bytes]) -> list[tuple[bytes, ...]]:
    if not target:
        return [()]
    out = []
    for j in range(1, len(target) + 1):
        if target[:j] in pieces:
            out += [(target[:j],) + rest for rest in _all_segmentations(target[j:], pieces)]
    return out


def test_shortest_paths_against_brute_force_enumeration():
    rng = random.Random(0)
    alphabet = b"ab "
    for _ in range(300):
        pieces = {bytes([c]) for c in alphabet} if rng.random() < 0.7 else set()
        for _ in range(rng.randint(0, 12)):
            pieces.add(bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 4))))
        target = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
        segs = _all_segmentations(target, pieces)
        fewest, count = shortest_paths(target, dict.fromkeys(pieces, 0))
        if not segs:
            assert count == 0
            continue
        m = min(len(s) for s in segs)
        assert fewest == m
        assert count == min(2, sum(len(s) == m for s in segs))


def test_ambiguity_definition_on_a_known_vocabulary():
    """Vocabulary {a, b, ab, ba, aba}: " " + "abab" can be spelled ab|ab or aba|b (2 tokens each)."""
    pieces = dict.fromkeys([b" ", b"a", b"b", b" ab", b"ab", b"ba", b"aba", b" aba"], 0)
    assert shortest_paths(b" abab", pieces) == (2, 2)  # " ab"|"ab" and " aba"|"b"
    assert shortest_paths(b" ab", pieces) == (1, 1)


def test_number_probes_and_single_digit_splitting(texts):
    probes = number_probes(50)
    assert probes[1] == [str(d) for d in range(10)]
    assert all(len(s) == n and s[0] != "0" for n in range(2, 7) for s in probes[n])
    toks = _toys()
    rep = tokenizer_report(list(toks), texts[:1], tokenizers=toks)
    for name, m in rep.tokenizers.items():
        d = m["digits_per_token"]
        assert set(d) == {"1", "2", "3", "4", "5", "6"} and d["1"] == 1.0
        # direct count: the toy vocabularies hold few multi-digit tokens
        from surgery.vocab.surfaces import canonical_vocabulary

        v = canonical_vocabulary(toks[name])
        encs = v.encode_text_many(number_probes()[4])
        assert d["4"] == pytest.approx(4 * 100 / sum(len(e) for e in encs), abs=1e-3)


def test_truncating_tokenizer_counts_the_whole_text_and_is_left_alone():
    tok = byte_level_toy(330)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=type(tok.backend_tokenizer).from_str(tok.backend_tokenizer.to_str()))
    tok.backend_tokenizer.enable_truncation(8)
    long = EN * 5
    rep = tokenizer_report(["t"], [("x.txt", long)], tokenizers={"t": tok})
    assert rep.rows[0].n_tokens > 8
    assert tok.backend_tokenizer.truncation is not None  # not mutated


def test_anchored_sentencepiece_normalizer_is_not_applied_mid_text():
    """Mistral v1's conversion doubles a leading ▁; mid-text " word" must still be one "▁word" piece."""
    from tokenizers import Regex, normalizers
    from transformers import PreTrainedTokenizerFast

    from surgery.tokenizer_design.report import load_infos

    base = sentencepiece_toy()
    raw = type(base.backend_tokenizer).from_str(base.backend_tokenizer.to_str())
    raw.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.Replace(Regex("\\A▁"), "▁▁")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>")
    info = load_infos(["t"], {"t": tok})[0]
    frags = [" the", " cat sat", "  two spaces", "the"]
    from surgery.vocab.surfaces import canonical_vocabulary

    assert info.mid_text(frags) == canonical_vocabulary(base).encode_text_many(frags)  # same as without the rule
    assert "".join(tok.backend_tokenizer.encode(" the", add_special_tokens=False).tokens).startswith("▁▁")  # rule active


def test_english_parallel_lookup():
    paths = ["t/debian-reference.en.heldout.txt", "t/debian-reference.de.heldout.txt", "t/code.heldout.txt",
             "t/debian-reference.fr.train.txt"]
    assert english_parallel(paths[1], paths) == paths[0]
    assert english_parallel(paths[0], paths) == paths[0]
    assert english_parallel(paths[2], paths) is None
    assert english_parallel(paths[3], paths) is None  # no English train text given


def test_table_plot_and_cli(tmp_path, texts, capsys):
    from surgery.cli import main

    toks = _toys()
    folders = []
    for name, tok in toks.items():
        tok.save_pretrained(str(tmp_path / name))
        folders.append(str(tmp_path / name))
    rep = tokenizer_report(list(toks), texts, tokenizers=toks)
    table = format_report(rep)
    assert table.count("\n| bl |") == 2 + 1 + 1  # two texts, numbers, overlap
    assert "| bl | sample.en.heldout | " in table and "single-digit split" in table
    png = plot_report(rep, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["tokenizer-report", *folders, "--text", *[p for p, _ in texts], "--json",
                 "--plot", str(tmp_path / "c.png")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert len(d["rows"]) == 4 and set(d["overlap"]) == set(folders)
    assert (tmp_path / "c.png").exists()
    assert main(["tokenizer-report", folders[0], "--text", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_shipped_tokenizers_number_segmentation():
    names = ["smollm2-135m", "llama3-tokenizer"]
    toks = {n: tokenizer(n) for n in names}
    p = TEXTS / "debian-reference.en.heldout.txt"
    if not p.exists():
        pytest.skip("shipped texts missing")
    rep = tokenizer_report(names, [(str(p), p.read_text())], tokenizers=toks, max_words=100)
    llama = rep.tokenizers["llama3-tokenizer"]
    assert llama["digits_per_token"]["3"] == 3.0 and llama["digits_per_token"]["6"] == 3.0
    assert llama["single_digit_share"] == 0.0
    assert rep.tokenizers["smollm2-135m"]["single_digit_share"] == 1.0
    for r in rep.rows:
        n = len(toks[r.tokenizer](p.read_text(), add_special_tokens=False)["input_ids"])
        assert r.n_tokens == n
    assert 0.5 < rep.overlap["smollm2-135m"]["llama3-tokenizer"] < 1.0
