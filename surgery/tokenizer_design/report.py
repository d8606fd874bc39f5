"""The tokenizer report: how a set of tokenizers segments a set of texts.

Per tokenizer and text (all counts without special tokens, each text encoded whole by the
tokenizer's own fast backend, dummy prefix included where the tokenizer adds one):

- ``bytes_per_token``: UTF-8 bytes of the text / tokens.
- ``tokens_per_word``: tokens / words, a *word* being a maximal run of non-whitespace
  characters (``str.split()``); for Japanese and Chinese such a "word" is a whole phrase.
- ``premium``: tokens of the text / tokens of its English parallel (Petrov et al.'s token
  premium). The English parallel of ``a.LL.b.txt`` is ``a.en.b.txt`` among the given texts (any
  one dot-separated part replaced by ``en``); ``None`` without one.
- ``ambiguous_word_share``: share of the distinct words checked for which some *other* sequence
  of vocabulary tokens, no longer than the tokenizer's own encoding of the word, decodes to the
  same bytes. The word is taken as it appears mid-text (``" " + word``, encoded with
  :meth:`~surgery.vocab.surfaces.Vocabulary.encode_text_many`); its target bytes are the
  surfaces of that encoding (so normalizers such as BERT's lower-casing are respected); paths
  are sequences of non-special vocabulary surfaces (pieces of at most
  :data:`MAX_PIECE_BYTES` bytes). A shortest-path count decides it: the word is ambiguous when
  the fewest tokens that spell it is below the tokenizer's count, or when at least two
  different paths reach that fewest count. Longer paths (e.g. spelling a word byte by byte)
  always exist in byte-level vocabularies and are deliberately not counted.
  ``shorter_path_share``: the part of those where the tokenizer's own encoding is not shortest.
  At most ``max_words`` distinct words per text are checked (a seeded random sample).

Per tokenizer: vocabulary size and family; numbers — probes of 1–6 digits (all ten 1-digit
numbers, ``number_probes`` random ones per longer length, no leading zero) encoded mid-text:
``digits_per_token`` per length and ``single_digit_share`` (share of the 2–6 digit probes split
into one token per digit).

Per pair of tokenizers: ``overlap[a][b]`` = share of the distinct non-special canonical surfaces
of ``a`` that ``b`` also has (the exact pairs of :func:`surgery.vocab.projection.exact_pairs`), so
byte-level, SentencePiece and WordPiece spellings of the same bytes count as shared.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

LOG = logging.getLogger(__name__)

MAX_PIECE_BYTES = 48
NUMBER_LENGTHS = (1, 2, 3, 4, 5, 6)


@dataclass
class TokenizerInfo:
    """A loaded tokenizer with its canonical vocabulary (built once per report run).

    Attributes:
        backend: the tokenizer's Rust backend, or a copy without truncation / padding when the
            tokenizer has them configured (BERT's truncates to 512 tokens).
        mid_text: the canonical mid-text encoder, :meth:`Vocabulary.encode_text_many` (no dummy prefix,
            no start-of-text normalizer rules).
    """

    name: str
    tokenizer: object
    vocab: object
    load_seconds: float = 0.0
    backend: object = None
    mid_text: object = None


@dataclass
class TextRow:
    """Numbers of one tokenizer on one text."""

    tokenizer: str
    text: str
    n_bytes: int
    n_words: int
    n_tokens: int
    bytes_per_token: float
    tokens_per_word: float
    premium: float | None
    ambiguous_word_share: float
    shorter_path_share: float
    words_checked: int


@dataclass
class Report:
    """Everything the report measured; :meth:`as_dict` is JSON-ready."""

    rows: list[TextRow]
    tokenizers: dict[str, dict]
    overlap: dict[str, dict[str, float]]
    seconds: float
    texts: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "tokenizers": self.tokenizers, "overlap": self.overlap,
                "texts": self.texts, "seconds": round(self.seconds, 2)}


# -- loading ---------------------------------------------------------------------------------
def load_infos(names: Sequence[str], tokenizers: dict | None = None) -> list[TokenizerInfo]:
    """Load each tokenizer once and build its canonical vocabulary.

    Args:
        names: asset names, folders or hub ids (duplicates are loaded once).
        tokenizers: already loaded tokenizers by name (used instead of loading).
    """
    from surgery.loading import load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    out, seen = [], {}
    for name in names:
        if name in seen:
            continue
        t0 = time.time()
        tok = (tokenizers or {}).get(name) or load_tokenizer(name)
        try:
            vocab = canonical_vocabulary(tok, name)
        except ValueError as e:
            from surgery.errors import SurgeryError

            raise SurgeryError(f"tokenizer {name!r}: {e}", "use a byte-level BPE, SentencePiece or WordPiece tokenizer") from e
        seen[name] = TokenizerInfo(name, tok, vocab, time.time() - t0, whole_text_encoder(tok), vocab.encode_text_many)
        LOG.info("loaded %s (%d ids, %s) in %.1f s", name, len(vocab), vocab.family, seen[name].load_seconds)
        out.append(seen[name])
    return out


def whole_text_encoder(tokenizer):
    """The Rust backend, copied without truncation and padding when it has them (never mutates ``tokenizer``)."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    if backend.truncation is None and backend.padding is None:
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def english_parallel(path: str, paths: Sequence[str]) -> str | None:
    """The English counterpart of ``path`` among ``paths`` (one dot-separated part → ``en``)."""
    p = Path(path)
    parts = p.name.split(".")
    names = {str(Path(q).parent / Path(q).name): q for q in paths}
    if "en" in parts[:-1]:
        return path  # English itself
    for i in range(len(parts)):
        cand = str(p.parent / ".".join(parts[:i] + ["en"] + parts[i + 1:]))
        if cand in names and names[cand] != path:
            return names[cand]
    return None


# -- measures --------------------------------------------------------------------------------
def count_tokens(info: TokenizerInfo, text: str) -> int:
    """Tokens of ``text`` encoded whole by the tokenizer, without special tokens."""
    return len(info.backend.encode(text, add_special_tokens=False).ids)


def shortest_paths(target: bytes, surfaces: dict, max_piece: int = MAX_PIECE_BYTES) -> tuple[int, int]:
    """Fewest vocabulary pieces that spell ``target`` and how many such paths there are (capped at 2).

    Returns:
        ``(fewest, count)``; ``(10**9, 0)`` when no path exists.
    """
    n = len(target)
    inf = 10**9
    best = [inf] * (n + 1)
    cnt = [0] * (n + 1)
    best[0], cnt[0] = 0, 1
    for i in range(n):
        if cnt[i] == 0:
            continue
        b1 = best[i] + 1
        for j in range(i + 1, min(n, i + max_piece) + 1):
            if target[i:j] in surfaces:
                if b1 < best[j]:
                    best[j], cnt[j] = b1, cnt[i]
                elif b1 == best[j]:
                    cnt[j] = min(2, cnt[j] + cnt[i])
    return best[n], cnt[n]


def word_ambiguity(info: TokenizerInfo, words: Sequence[str]) -> tuple[float, float, int]:
    """``(ambiguous share, shorter-path share, words checked)`` over distinct ``words`` (see module doc)."""
    vocab = info.vocab
    s2i = vocab.surface_to_id
    encs = info.mid_text([" " + w for w in words])
    amb = shorter = checked = 0
    for ids in encs:
        if not ids or any(vocab.surfaces[i] is None for i in ids):
            continue  # unknown / special: no byte spelling to compare
        target = b"".join(vocab.surfaces[i] for i in ids)
        fewest, count = shortest_paths(target, s2i)
        checked += 1
        if fewest < len(ids):
            shorter += 1
            amb += 1
        elif count >= 2:
            amb += 1
    return (amb / checked if checked else 0.0), (shorter / checked if checked else 0.0), checked


def number_probes(per_length: int = 100, seed: int = 0) -> dict[int, list[str]]:
    """Probe numbers per digit count: all 1-digit numbers, ``per_length`` random ones otherwise."""
    rng = random.Random(seed)
    out = {1: [str(d) for d in range(10)]}
    for n in NUMBER_LENGTHS[1:]:
        out[n] = [str(rng.randint(10 ** (n - 1), 10**n - 1)) for _ in range(per_length)]
    return out


def number_segmentation(info: TokenizerInfo, probes: dict[int, list[str]]) -> dict:
    """Digits per token per number length and the share of multi-digit numbers split digit by digit."""
    flat = [(n, s) for n, ss in probes.items() for s in ss]
    encs = info.mid_text([s for _, s in flat])
    toks = {n: 0 for n in probes}
    single = multi = 0
    for (n, _), ids in zip(flat, encs):
        toks[n] += len(ids)
        if n > 1:
            multi += 1
            single += int(len(ids) == n)
    dpt = {str(n): round(n * len(probes[n]) / max(toks[n], 1), 3) for n in probes}
    return {"digits_per_token": dpt, "single_digit_share": round(single / max(multi, 1), 3)}


def vocabulary_overlap(infos: Sequence[TokenizerInfo]) -> dict[str, dict[str, float]]:
    """``overlap[a][b]``: share of a's distinct non-special surfaces that b also has.

    The same pairs as :func:`surgery.vocab.projection.exact_pairs` (identical canonical bytes),
    counted per distinct surface with set intersections of ``Vocabulary.surface_to_id``.
    """
    keys = {i.name: set(i.vocab.surface_to_id) for i in infos}
    out: dict[str, dict[str, float]] = {}
    for a in infos:
        ka = keys[a.name]
        out[a.name] = {b.name: round(len(ka & keys[b.name]) / max(len(ka), 1), 4) for b in infos}
    return out


def distinct_words(text: str, max_words: int, seed: int = 0) -> list[str]:
    words = sorted(set(text.split()))
    if len(words) > max_words:
        words = sorted(random.Random(seed).sample(words, max_words))
    return words


def tokenizer_report(tokenizer_names: Sequence[str], texts: Sequence[tuple[str, str]], max_words: int = 300,
                     number_probes_per_length: int = 100, tokenizers: dict | None = None) -> Report:
    """Measure every tokenizer on every text (see the module docstring for the definitions).

    Args:
        tokenizer_names: asset names, folders or hub ids.
        texts: ``(label or path, text)`` pairs; labels drive the English-parallel lookup.
        max_words: distinct words per text checked for ambiguity.
        number_probes_per_length: random probe numbers per digit count (2–6 digits).
        tokenizers: optional preloaded tokenizers by name.

    Returns:
        A :class:`Report`.
    """
    t0 = time.time()
    infos = load_infos(tokenizer_names, tokenizers)
    probes = number_probes(number_probes_per_length)
    paths = [p for p, _ in texts]
    english = {p: english_parallel(p, paths) for p in paths}
    words = {p: distinct_words(t, max_words) for p, t in texts}
    meta, rows = {}, []
    for info in infos:
        t1 = time.time()
        counts = {p: count_tokens(info, t) for p, t in texts}
        for p, t in texts:
            n_bytes, n_words = len(t.encode("utf-8")), len(t.split())
            amb, shorter, checked = word_ambiguity(info, words[p])
            en = english[p]
            rows.append(TextRow(
                tokenizer=info.name, text=p, n_bytes=n_bytes, n_words=n_words, n_tokens=counts[p],
                bytes_per_token=round(n_bytes / max(counts[p], 1), 4),
                tokens_per_word=round(counts[p] / max(n_words, 1), 4),
                premium=round(counts[p] / counts[en], 4) if en is not None and counts.get(en) else None,
                ambiguous_word_share=round(amb, 4), shorter_path_share=round(shorter, 4), words_checked=checked,
            ))
        meta[info.name] = {"vocab_size": len(info.vocab), "family": info.vocab.family,
                           **number_segmentation(info, probes),
                           "load_seconds": round(info.load_seconds, 2), "measure_seconds": round(time.time() - t1, 2)}
    overlap = vocabulary_overlap(infos)
    return Report(rows=rows, tokenizers=meta, overlap=overlap, seconds=time.time() - t0, texts=paths)


# -- output ----------------------------------------------------------------------------------
def _short(path: str) -> str:
    name = Path(path).name
    name = re.sub(r"^debian-reference\.", "", name)
    return re.sub(r"\.txt$", "", name)


def format_report(report: Report) -> str:
    """Markdown tables: per text, per tokenizer (numbers), and the vocabulary overlap matrix."""
    lines = ["| tokenizer | text | bytes/token | tokens/word | premium vs en | ambiguous words | shorter path exists |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        prem = f"{r.premium:.2f}" if r.premium is not None else "–"
        lines.append(f"| {r.tokenizer} | {_short(r.text)} | {r.bytes_per_token:.2f} | {r.tokens_per_word:.2f} | {prem} | "
                     f"{100 * r.ambiguous_word_share:.0f}% | {100 * r.shorter_path_share:.0f}% |")
    lines += ["", "| tokenizer | family | vocab | " + " | ".join(f"{n}-digit d/tok" for n in NUMBER_LENGTHS)
              + " | single-digit split |", "|---|---|---:|" + "---:|" * (len(NUMBER_LENGTHS) + 1)]
    for name, m in report.tokenizers.items():
        d = m["digits_per_token"]
        lines.append(f"| {name} | {m['family']} | {m['vocab_size']} | "
                     + " | ".join(f"{d[str(n)]:.2f}" for n in NUMBER_LENGTHS)
                     + f" | {100 * m['single_digit_share']:.0f}% |")
    names = list(report.overlap)
    lines += ["", "overlap: share of the row tokenizer's distinct surfaces also in the column tokenizer", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for a in names:
        lines.append(f"| {a} | " + " | ".join(f"{100 * report.overlap[a][b]:.0f}%" for b in names) + " |")
    return "\n".join(lines)


def plot_report(report: Report, out: str | Path) -> Path:
    """Bar charts (bytes per token; token premium vs English) per tokenizer and text, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.tokenizers)
    texts = report.texts
    bpt = {(r.tokenizer, r.text): r.bytes_per_token for r in report.rows}
    prem = {(r.tokenizer, r.text): r.premium for r in report.rows}
    prem_texts = [t for t in texts if any(prem.get((n, t)) is not None for n in names)]
    panels = [("bytes per token (higher = more compression)", texts, bpt)]
    if prem_texts:
        panels.append(("token premium vs English parallel (lower = cheaper)", prem_texts, prem))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.3 * len(names) + 3), 4.2 * len(panels)), squeeze=False)
    x = np.arange(len(names))
    colour = {t: f"C{k % 10}" for k, t in enumerate(texts)}  # one colour per text in every panel
    for ax, (title, cols, vals) in zip(axes[:, 0], panels):
        w = 0.8 / max(len(cols), 1)
        top = 0.0
        for k, t in enumerate(cols):
            ys = [vals.get((n, t)) or 0.0 for n in names]
            top = max(top, *ys)
            ax.bar(x + (k - (len(cols) - 1) / 2) * w, ys, w, label=_short(t), color=colour[t])
        ax.set_ylim(0, 1.3 * top if top > 0 else 1)  # room for the legend above the bars
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=min(len(cols), 4))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
