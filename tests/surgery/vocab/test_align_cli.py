"""`surgery align` end to end on real shipped tokenizers of every family (CLI → report → saved file)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import vocab
from surgery.cli import main
from surgery.vocab.projection import KIND_DECOMPOSED, KIND_EXACT, KIND_SPECIAL, KIND_UNMAPPED
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
    assert report["exact"] + report["decomposed"] + report["special"] + report["unmapped"] == len(va)

    P = load_alignment(out, va, vb)  # hashes match the tokenizers the CLI loaded
    assert P.matrix.shape == (len(va), len(vb))
    kinds = np.bincount(P.kind, minlength=4)
    assert kinds[KIND_EXACT] == report["exact"] and kinds[KIND_DECOMPOSED] == report["decomposed"]
    assert kinds[KIND_SPECIAL] == report["special"] and kinds[KIND_UNMAPPED] == report["unmapped"]
    sums = np.asarray(P.matrix.sum(axis=1)).ravel()
    mapped = P.kind != KIND_UNMAPPED
    assert np.allclose(sums[mapped], 1.0, atol=1e-5) and np.all(sums[~mapped] == 0)
    # exact rows point at a token with the very same bytes
    rows = np.flatnonzero(P.kind == KIND_EXACT)[:500]
    for i in rows:
        j = P.matrix.indices[P.matrix.indptr[i]]
        assert va.surfaces[i] == vb.surfaces[j]

    # a second run without --overwrite refuses and keeps the file
    before = out.read_bytes()
    assert main(["align", a, b, "--out", str(out)]) == 2
    assert out.read_bytes() == before
