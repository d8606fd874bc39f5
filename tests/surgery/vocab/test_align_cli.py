"""`surgery align` end to end on real shipped tokenizers of every family (CLI → report → saved file)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from helpers import token_bytes, tokenizer, vocab
from surgery.cli import main
from surgery.vocab.projection import KIND_DECOMPOSED, KIND_EXACT, KIND_NAMES, KIND_SPECIAL
from surgery.vocab.store import load_alignment

# one pair per family combination: byte-level → SentencePiece, SentencePiece → WordPiece, WordPiece → tiktoken-BPE
PAIRS = [("smollm2-135m", "mistral-v1-tokenizer"), ("mistral-v3-tokenizer", "bert-tokenizer"),
         ("bert-tokenizer", "tekken-tokenizer")]


@pytest.mark.parametrize("a,b", PAIRS)
def test_align_cli_json_and_saved_file(a, b, tmp_path, capsys):
    va, vb = vocab(a), vocab(b)
    out = tmp_path / "w.safetensors"
    assert main(["align", a, b, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("exact", "decomposed", "special", "unmapped"):
        assert isinstance(report[key], int)

    P = load_alignment(out, va, vb)  # hashes match the tokenizers the CLI loaded
    assert P.matrix.shape == (len(va), len(vb))
    sums = np.asarray(P.matrix.sum(axis=1)).ravel()
    mapped = np.isin(P.kind, [KIND_EXACT, KIND_DECOMPOSED, KIND_SPECIAL])
    assert np.allclose(sums[mapped], 1.0, atol=1e-5) and np.all(sums[~mapped] == 0)

    # Independent reference: token bytes from convert_ids_to_tokens (not the alignment core's surfaces).
    ta, tb = tokenizer(a), tokenizer(b)
    ba, bb = token_bytes(ta), token_bytes(tb)
    in_b = {s for s in bb if s}
    spelled = Counter(x for x in ba if x)
    plain = [i for i in range(len(ta)) if ba[i] and spelled[ba[i]] == 1]  # ordinary entries of A, no twins
    want_exact = {i for i in plain if ba[i] in in_b}
    got_exact = set(np.flatnonzero(P.kind == KIND_EXACT).tolist())
    assert got_exact & set(plain) == want_exact  # every plain A token with a byte-identical B token, and only those
    assert report["exact"] == len(got_exact) >= len(want_exact) > 0.2 * len(plain)
    # an exact row is one-hot on a B token with the same bytes
    for i in sorted(want_exact)[::37]:
        lo, hi = P.matrix.indptr[i], P.matrix.indptr[i + 1]
        assert hi - lo == 1 and bb[P.matrix.indices[lo]] in (ba[i], None)
    assert report["decomposed"] > 0
    # specials: the tokenizer's own special ids are never byte-mapped
    specials = set(ta.all_special_ids)
    assert specials and not specials & got_exact
    # byte-fallback twins the tokenizers never emit: no entry in their column, an empty row of their own
    assert report["b"]["never_emitted"] == len(vb.never_emitted) and report["a"]["never_emitted"] == len(va.never_emitted)
    assert not np.isin(P.matrix.indices, vb.never_emitted).any()
    assert (sums[va.never_emitted] == 0).all() and report["never_emitted"] == len(va.never_emitted)
    assert len(va.never_emitted) + len(vb.never_emitted) in (0, 125)  # Mistral: 125 <0xNN> twins of ASCII pieces
    kinds = np.bincount(P.kind, minlength=len(KIND_NAMES))
    assert sum(report.get(name, 0) for name in KIND_NAMES.values()) == len(va) == kinds.sum()

    # a second run without --overwrite refuses and keeps the file
    before = out.read_bytes()
    assert main(["align", a, b, "--out", str(out)]) == 2
    assert out.read_bytes() == before
