"""Coverage audit of a projection by token category.

Categories (of vocabulary a's tokens, by canonical bytes with surrounding spaces ignored):
single digits, multi-digit numbers, whitespace runs (2+ spaces/tabs), newlines,
punctuation, CJK, byte tokens (bytes that are not complete UTF-8). For each: how
many tokens map exactly / by decomposition / not at all, and a few examples.
"""

from __future__ import annotations

import string
import unicodedata

import numpy as np

from surgery.vocab.projection import KIND_NAMES, Projection
from surgery.vocab.surfaces import Vocabulary

_PUNCT = set(string.punctuation) | {"“", "”", "‘", "’", "«", "»", "—", "–", "…", "。", "、", "，", "！", "？", "：", "；"}


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x3040 <= o <= 0x30FF or 0xAC00 <= o <= 0xD7AF
            or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x2A6DF)


def categorize(surface: bytes) -> str | None:
    """Category of one surface, or None when it is an ordinary word piece."""
    try:
        text = surface.decode("utf-8")
    except UnicodeDecodeError:
        return "byte"
    core = text.strip(" ")
    if "\n" in text and not text.strip():
        return "newline"
    if len(text) >= 2 and not text.strip(" \t") and "\n" not in text:
        return "whitespace_run"
    if core.isascii() and core.isdigit():
        return "single_digit" if len(core) == 1 else "multi_digit"
    if core and all(c in _PUNCT or unicodedata.category(c).startswith("P") for c in core):
        return "punctuation"
    if any(_is_cjk(c) for c in core):
        return "cjk"
    return None


CATEGORIES = ("single_digit", "multi_digit", "whitespace_run", "newline", "punctuation", "cjk", "byte")


def audit(P: Projection, va: Vocabulary, vb: Vocabulary, examples: int = 3) -> dict:
    """Per-category coverage of ``P`` (rows of ``va``).

    Returns:
        ``{category: {"tokens": n, "exact": .., "decomposed": .., "special": .., "unmapped": ..,
        "mean_entries": .., "examples": [..]}}``.
    """
    m = P.matrix.tocsr()
    nnz = np.diff(m.indptr)
    cats: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    for i, s in enumerate(va.surfaces):
        if s is not None:
            c = categorize(s)
            if c:
                cats[c].append(i)
    out = {}
    for c, ids in cats.items():
        ids_a = np.asarray(ids, dtype=np.int64)
        kinds = P.kind[ids_a] if len(ids_a) else np.zeros(0, np.int8)
        row = {"tokens": len(ids)}
        for k, name in KIND_NAMES.items():
            row[name] = int((kinds == k).sum())
        row["mean_entries"] = float(nnz[ids_a].mean()) if len(ids_a) else 0.0
        ex = []
        # prefer non-exact examples: they show how the category is decomposed
        pick = [i for i in ids if P.kind[i] != 1][:examples] or ids[:examples]
        for i in pick:
            lo, hi = m.indptr[i], m.indptr[i + 1]
            order = np.argsort(-m.data[lo:hi])[:4]
            targets = [(repr(vb.surfaces[m.indices[lo + j]] or vb.special_content.get(int(m.indices[lo + j]), "")),
                        round(float(m.data[lo + j]), 3)) for j in order]
            ex.append({"token": repr(va.surfaces[i]), "maps_to": targets})
        row["examples"] = ex
        out[c] = row
    return out
