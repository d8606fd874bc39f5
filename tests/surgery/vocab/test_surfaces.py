"""Canonical surfaces on the real shipped tokenizers of every family."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers import tokenizer, vocab
from surgery.vocab.surfaces import BYTE_LEVEL, SENTENCEPIECE, WORDPIECE, _split_utf8, gpt2_byte_decoder

FAMILIES = {
    "smollm2-135m": BYTE_LEVEL, "llama3-tokenizer": BYTE_LEVEL, "qwen2-tokenizer": BYTE_LEVEL,
    "tekken-tokenizer": BYTE_LEVEL, "gemma3-270m": SENTENCEPIECE, "mistral-v1-tokenizer": SENTENCEPIECE,
    "mistral-v3-tokenizer": SENTENCEPIECE, "bert-tokenizer": WORDPIECE,
}
LOSSLESS = [n for n, f in FAMILIES.items() if f != WORDPIECE]

def _escape_surrogate(c: str) -> str:
    """Lone surrogates cannot be UTF-8 text: they enter the texts escaped, as ``\\udXXX``."""
    return f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c


# Random Unicode rich in the hard cases: any code point (lone surrogates escaped), combining marks, emoji
# (skin tones, ZWJ families, flags, variation selectors), CJK, right-to-left scripts, C0/C1 controls,
# Unicode spaces, long runs of whitespace, and plain ASCII words and numbers.
PIECES = st.one_of(
    st.characters(codec=None).map(_escape_surrogate),
    st.characters(min_codepoint=0x0300, max_codepoint=0x036F),  # combining diacritics
    st.sampled_from(["e\u0301", "n\u0303", "\u200d", "\ufe0f", "\u200b", "\u00a0", "\u3000", "\u2009", "\u2028",
                     "\ufeff", "\u202e", "\u200f"]),
    st.sampled_from(["🙂", "🚀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "🏳️‍🌈", "❤️", "🫠"]),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),  # CJK
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),  # kana
    st.characters(min_codepoint=0x0590, max_codepoint=0x06FF),  # Hebrew, Arabic
    st.characters(min_codepoint=0x00, max_codepoint=0x1F),  # C0 controls
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),  # DEL, C1 controls
    st.integers(1, 64).flatmap(lambda n: st.sampled_from([" " * n, "\t" * n, "\n" * n, " \n" * n, "\r\n" * n,
                                                          "\u3000" * n])),
    st.text("abcXYZ éüß 0123456789.,;!?'\"-_()[]{}<>|@#$%^&*~`", min_size=1, max_size=8),
)
TEXTS = st.lists(PIECES, min_size=1, max_size=30).map("".join)
EXAMPLES: dict[str, int] = {}  # test → examples tried, reported at the end of the module


@pytest.fixture(scope="module", autouse=True)
def report_examples(request):
    yield
    if EXAMPLES:
        tr = request.config.pluginmanager.get_plugin("terminalreporter")
        line = "canonical round-trip fuzz: " + ", ".join(f"{k} {v}" for k, v in sorted(EXAMPLES.items())) + \
            f" (total {sum(EXAMPLES.values())} examples)"
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            tr.write_line(line) if tr else print(line)


def _count(key: str) -> None:
    EXAMPLES[key] = EXAMPLES.get(key, 0) + 1


def _expected_bytes(tok, v, text: str) -> bytes:
    """What the tokenizer can keep of ``text``: its normalizer applied (Qwen2 NFC), a literal "▁" read as the
    space it stands for by SentencePiece (the text "▁" and " " give the same ids), and bytes that no token
    spells dropped (SmolLM2's byte alphabet lacks a few control bytes), independently of surfaces."""
    norm = tok.backend_tokenizer.normalizer
    if norm is not None and v.family == BYTE_LEVEL:  # SentencePiece normalizers only map " " to "▁"
        text = norm.normalize_str(text)
    if v.family == SENTENCEPIECE:
        text = text.replace("\u2581", " ")
    data = text.encode("utf-8")
    return bytes(b for b in data if v.byte_token_ids[b] >= 0)


@pytest.mark.parametrize("name", LOSSLESS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXTS)
def test_canonical_bytes_round_trip(name, text):
    """decode(encode(x)) == x as bytes, at the start of a text and mid-text, on random Unicode."""
    tok, v = tokenizer(name), vocab(name)
    _count(name)
    want = _expected_bytes(tok, v, text)
    ids = tok(text, add_special_tokens=False)["input_ids"]  # at the start: the tokenizer's own encoding
    assert v.decode_bytes(ids, at_start=True) == want
    assert v.decode_bytes(v.encode_bytes(want), at_start=False) == want  # mid-text re-encoding
    # and after a prefix: the surfaces of the ids that follow the prefix's own ids spell the rest
    full = tok("§" + text, add_special_tokens=False)["input_ids"]
    assert v.decode_bytes(full, at_start=True) == _expected_bytes(tok, v, "§" + text)


@settings(max_examples=120, deadline=None)
@given(text=TEXTS)
def test_wordpiece_surfaces_modulo_normalizer(text):
    """WordPiece is lossy by design (lower case, accents and spaces dropped, unknown words -> [UNK]);
    its surfaces must still spell the normalized text minus exactly the words it marked unknown."""
    tok, v = tokenizer("bert-tokenizer"), vocab("bert-tokenizer")
    _count("bert-tokenizer")
    enc = tok.backend_tokenizer.encode(text, add_special_tokens=False)
    kept, last = [], 0
    for tid, (a, b) in zip(enc.ids, enc.offsets):  # cut the spans the tokenizer marked unknown
        if tid == tok.unk_token_id:
            kept.append(text[last:a])
            last = b
    kept.append(text[last:])
    known = " ".join(kept)
    norm = tok.backend_tokenizer.normalizer.normalize_str(known)
    got = v.decode_bytes([i for i in enc.ids if i != tok.unk_token_id]).decode("utf-8")

    def strip(s: str) -> str:
        s = tok.backend_tokenizer.normalizer.normalize_str(s)
        return "".join(c for c in unicodedata.normalize("NFD", s) if not c.isspace() and unicodedata.category(c) != "Mn")

    assert strip(got) == strip(norm)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "mistral-v1-tokenizer", "llama3-tokenizer"])
@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=1, max_size=12))
def test_encode_bytes_round_trips_arbitrary_bytes(name, data):
    """Mid-text re-encoding (used by the projection) reproduces any byte string, even invalid UTF-8.

    Only bytes the vocabulary can express at all (SmolLM2 lacks a few control bytes and 0xF5-0xFF)."""
    v = vocab(name)
    assume(all(v.byte_token_ids[b] >= 0 for b in data))
    ids = v.encode_bytes(data)
    assert v.decode_bytes(ids, at_start=False) == data


def test_known_surfaces():
    s = vocab("smollm2-135m")
    t = tokenizer("smollm2-135m")
    assert s.surfaces[t.convert_tokens_to_ids("Ġthe")] == b" the"
    assert s.surfaces[t.convert_tokens_to_ids("Ċ")] == b"\n"
    g, gt = vocab("gemma3-270m"), tokenizer("gemma3-270m")
    assert g.surfaces[gt.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert g.surfaces[gt.convert_tokens_to_ids("▁the")] == b" the"
    assert g.surfaces[gt.convert_tokens_to_ids("<0xE7>")] == b"\xe7"
    b, bt = vocab("bert-tokenizer"), tokenizer("bert-tokenizer")
    assert b.surfaces[bt.convert_tokens_to_ids("##ing")] == b"ing"
    assert b.surfaces[bt.convert_tokens_to_ids("the")] == b" the"
    assert vocab("mistral-v1-tokenizer").dummy_prefix and not g.dummy_prefix


@pytest.mark.parametrize("name", list(FAMILIES))
def test_special_tokens_have_roles_not_bytes(name):
    v, tok = vocab(name), tokenizer(name)
    for role in ("bos", "eos", "pad", "unk"):
        tid = getattr(tok, f"{role}_token_id")
        if tid is not None:
            assert v.surfaces[tid] is None
            assert role in v.roles[tid]
    byte_ids = v.byte_token_ids
    if v.family != WORDPIECE:
        assert (byte_ids[[ord(c) for c in "az \n09"]] >= 0).all()


def test_byte_decoder_is_a_bijection():
    d = gpt2_byte_decoder()
    assert sorted(d.values()) == list(range(256)) and d["Ġ"] == 32 and d["Ċ"] == 10


@given(data=st.binary(max_size=30))
def test_split_utf8(data):
    parts = _split_utf8(data)
    assert b"".join(p for _, p in parts) == data
    for kind, p in parts:
        if kind == "t":
            p.decode("utf-8")
        else:
            with pytest.raises(UnicodeDecodeError):
                p.decode("utf-8")


@pytest.mark.parametrize("name", ["llama3-tokenizer", "gemma3-270m", "mistral-v1-tokenizer"])
def test_raw_encoder_json_leaves_the_tokenizer_json_alone_and_equals_an_edited_deep_copy(name):
    """The mid-text encoder's JSON (only the changed components copied) equals the same edits made on a full
    deep copy, and the tokenizer's own JSON is unchanged afterwards."""
    import copy
    import json

    from surgery.vocab.surfaces import _raw_encoder_json, backend_json

    j = backend_json(tokenizer(name))
    before = json.dumps(j, sort_keys=True)
    got = _raw_encoder_json(j)
    assert json.dumps(j, sort_keys=True) == before
    want = copy.deepcopy(j)
    want["post_processor"] = want["truncation"] = want["padding"] = None
    norm = want.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Sequence":
        norm["normalizers"] = [n for n in norm["normalizers"]
                               if not (n.get("type") == "Prepend" or str(n.get("pattern", {}).get("Regex", ""))
                                       .startswith("\\A"))]
    elif isinstance(norm, dict) and norm.get("type") == "Prepend":
        want["normalizer"] = None
    for node in [want.get("pre_tokenizer")] + list((want.get("pre_tokenizer") or {}).get("pretokenizers", [])):
        if isinstance(node, dict) and node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
            if "add_prefix_space" in node:
                node["add_prefix_space"] = False
        if isinstance(node, dict) and node.get("type") == "ByteLevel":
            node["add_prefix_space"] = False
    assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    assert got["model"] is j["model"]  # the vocabulary is shared, not copied
