"""Training text for distillation: documents → text blocks → a deterministic, resumable order → batches.

Sources: a UTF-8 text file (``.txt``; blank-line-separated paragraphs are kept
together in blocks), a JSON-lines file (``.jsonl``; one document per line in a
text field), or a Hugging Face ``datasets`` dataset (a local folder / data
files, or a hub id available offline).

Documents are cut into blocks of at most ``block_chars`` characters, at the
last newline or space before the limit when there is one, so that both
tokenizers see the same whole text. The order of blocks is a pure function
of ``(seed, epoch)``: the *position* (number of blocks consumed so far, over
all ranks) is the whole state needed to resume exactly.

Each block is encoded separately by every tokenizer (student and teachers),
preceded by that tokenizer's document-start token (BOS, else EOS; see
:func:`surgery.evaluate.document_start_id`), truncated to ``max_tokens``.
Byte spans of tokens come from :func:`distill.chunks.token_byte_spans`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)


def load_documents(source: str, fmt: str = "auto", text_field: str = "text", dataset_config: str | None = None,
                   split: str = "train", max_documents: int | None = None) -> list[str]:
    """Read documents from a text file, a JSONL file or a ``datasets`` dataset.

    Args:
        source: path of a ``.txt`` / ``.jsonl`` file, or a dataset folder / hub id.
        fmt: ``auto`` (by extension; folders and ids are datasets), ``text``, ``jsonl`` or ``dataset``.
        text_field: the field holding the text (JSONL and datasets).
        dataset_config: ``datasets`` configuration name.
        split: ``datasets`` split.
        max_documents: keep only the first documents.

    Returns:
        Non-empty documents in source order.

    Raises:
        SurgeryError: missing file, bad JSON line, missing field, or no text at all.
    """
    p = Path(source).expanduser()
    if fmt == "auto":
        if not p.exists() and (p.suffix in (".txt", ".jsonl", ".json") or source.startswith(("/", ".", "~"))):
            raise SurgeryError(f"data file {str(p)!r} does not exist",  # a path, not a hub id: say so
                               "check data.train / data.heldout")
        if p.is_file():
            fmt = "jsonl" if p.suffix in (".jsonl", ".json") else "text"
        else:
            fmt = "dataset"
    if fmt == "text":
        from surgery.textio import read_text

        docs = [read_text(p)]
    elif fmt == "jsonl":
        docs = _read_jsonl(p, text_field)
    elif fmt == "dataset":
        docs = _read_dataset(source, text_field, dataset_config, split, max_documents)
    else:
        raise SurgeryError(f"unknown data format {fmt!r}", "use auto, text, jsonl or dataset")
    docs = [d for d in docs if d and d.strip()]
    if max_documents:
        docs = docs[:max_documents]
    if not docs:
        raise SurgeryError(f"no text found in {source!r}", "check the file / the text field name")
    return docs


def _read_jsonl(p: Path, text_field: str) -> list[str]:
    if not p.exists():
        raise SurgeryError(f"data file {str(p)!r} does not exist", "check data.train / data.heldout")
    docs = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SurgeryError(f"{str(p)!r} line {n} is not valid JSON ({e.msg})", "write one JSON object per line") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else type(obj).__name__
                raise SurgeryError(f"{str(p)!r} line {n} has no field {text_field!r} (has: {keys})",
                                   "set data.text_field to the field holding the text")
            if not isinstance(obj[text_field], str):
                raise SurgeryError(f"{str(p)!r} line {n}: field {text_field!r} is not a string", "store the text as a string")
            docs.append(obj[text_field])
    return docs


def _read_dataset(source: str, text_field: str, config: str | None, split: str, max_documents: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise SurgeryError("the `datasets` package is not installed", "pip install datasets") from e
    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as e:
        raise SurgeryError(f"could not load dataset {source!r} (split {split!r}): {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}",
                           "pass a local text/JSONL file, a dataset folder, or a hub id available offline") from e
    if text_field not in ds.column_names:
        raise SurgeryError(f"dataset {source!r} has no column {text_field!r} (has: {', '.join(ds.column_names)})",
                           "set data.text_field")
    if max_documents:
        ds = ds.select(range(min(max_documents, len(ds))))
    return [t for t in ds[text_field] if isinstance(t, str)]


def make_blocks(docs: Sequence[str], block_chars: int, pack: bool = False) -> list[str]:
    """Cut documents into blocks of at most ``block_chars`` characters at whitespace when possible.

    With ``pack`` consecutive documents are first joined with a blank line, so that many short
    documents (one line each, say) fill blocks instead of becoming tiny ones.
    """
    if block_chars < 16:
        raise ValueError("block_chars must be >= 16")
    if pack and len(docs) > 1:
        docs = ["\n\n".join(d.strip("\n") for d in docs)]
    blocks = []
    for doc in docs:
        i, n = 0, len(doc)
        while i < n:
            end = min(i + block_chars, n)
            if end < n:
                cut = max(doc.rfind("\n", i + block_chars // 2, end), doc.rfind(" ", i + block_chars // 2, end))
                if cut > i:
                    end = cut + 1  # the separator ends this block
            piece = doc[i:end]
            if piece.strip():
                blocks.append(piece)
            i = end
    return blocks


def token_blocks(docs: Sequence[str], tokenizer, tokens: int) -> list[str]:
    """Cut documents into consecutive blocks of ``tokens`` tokens of ``tokenizer`` (the last one of a document
    shorter), each the text its tokens span (character offsets).

    Blocks of equal token counts sample a mixed corpus as windows of a token stream do (every language in
    proportion to its tokens); blocks of equal *characters* under-sample text that needs more tokens per
    character (CJK), whose blocks the token limit then also truncates.
    """
    return token_blocks_counted(docs, tokenizer, tokens)[0]


def token_blocks_counted(docs: Sequence[str], tokenizer, tokens: int) -> tuple[list[str], int]:
    """:func:`token_blocks` and the number of tokens of the documents (no special tokens), from one encoding."""
    if tokens < 1:
        raise ValueError("tokens must be >= 1")
    enc = tokenizer(list(docs), add_special_tokens=False, return_offsets_mapping=True)
    blocks, total = [], 0
    for doc, offs in zip(docs, enc["offset_mapping"]):
        total += len(offs)
        for a in range(0, len(offs), tokens):
            win = offs[a:a + tokens]
            start = win[0][0] if a else 0
            end = offs[a + tokens][0] if a + tokens < len(offs) else len(doc)  # up to the next block's first token
            piece = doc[start:max(end, win[-1][1])]
            if piece.strip():
                blocks.append(piece)
    return blocks, total


def blocks_fingerprint(blocks: Sequence[str]) -> str:
    """Content hash of a block list (keys the teacher cache to the exact data)."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(hashlib.sha256(b.encode("utf-8")).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class BlockOrder:
    """Deterministic order of ``n`` blocks over epochs: a seeded permutation per epoch.

    The state is just the global position (blocks consumed so far).
    """

    n: int
    seed: int
    shuffle: bool = True

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, position: int, count: int) -> list[int]:
        """Block ids at global positions ``position .. position+count-1``."""
        out = []
        cache: dict[int, np.ndarray] = {}
        for p in range(position, position + count):
            e, i = divmod(p, self.n)
            if e not in cache:
                cache[e] = self._perm(e)
            out.append(int(cache[e][i]))
        return out


@dataclass
class EncodedBatch:
    """One tokenizer's view of a batch of blocks.

    Attributes:
        input_ids: ``(B, L)`` long, right-padded with the pad id (or 0).
        attention_mask: ``(B, L)`` long.
        ends: ``(B, L)`` int64 numpy byte end of each token (0 for the start token, padding).
        valid: ``(B, L)`` bool numpy: tokens with text bytes (chunk candidates).
        labels: ``(B, L)`` long next-token targets aligned to positions (``-100`` = none).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    ends: np.ndarray
    valid: np.ndarray
    labels: torch.Tensor

    def to(self, device) -> "EncodedBatch":
        return EncodedBatch(self.input_ids.to(device), self.attention_mask.to(device), self.ends, self.valid,
                            self.labels.to(device))

    def take(self, rows: np.ndarray) -> "EncodedBatch":
        """The ``(len(rows), L)`` batch of rows ``rows`` (in that order; the length ``L`` is kept)."""
        t = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return EncodedBatch(self.input_ids[t], self.attention_mask[t], self.ends[rows], self.valid[rows],
                            self.labels[t])


def encode_blocks(texts: Sequence[str], tokenizer, vocab, max_tokens: int) -> EncodedBatch:
    """Encode blocks with one tokenizer: start token + text tokens, truncated, padded.

    Args:
        texts: B blocks.
        tokenizer: HF fast tokenizer.
        vocab: its canonical :class:`~surgery.vocab.surfaces.Vocabulary`.
        max_tokens: length limit including the start token.

    Returns:
        An :class:`EncodedBatch`.
    """
    from surgery.evaluate import document_start_id

    from distill.chunks import token_byte_spans

    start = document_start_id(tokenizer)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    seqs, spans = [], []
    for text, ids, offs in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        ids = list(ids)[: max_tokens - (start is not None)]
        offs = list(offs)[: len(ids)]
        starts, ends = token_byte_spans(vocab, ids, text, offs)
        valid = ends > starts
        if start is not None:
            ids = [start] + ids
            ends = np.concatenate([[0], ends])
            valid = np.concatenate([[False], valid])
        seqs.append(ids)
        spans.append((ends, valid))
    B, L = len(seqs), max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    ends_a = np.zeros((B, L), dtype=np.int64)
    valid_a = np.zeros((B, L), dtype=bool)
    labels = torch.full((B, L), -100, dtype=torch.long)
    for b, (ids, (ends, valid)) in enumerate(zip(seqs, spans)):
        n = len(ids)
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[b, :n] = t
        att[b, :n] = 1
        ends_a[b, :n] = ends
        valid_a[b, :n] = valid
        labels[b, : n - 1] = t[1:]
    return EncodedBatch(input_ids, att, ends_a, valid_a, labels)
