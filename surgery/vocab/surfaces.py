"""Canonical token surfaces: the exact bytes each token id contributes to decoded text.

Every vocabulary entry is turned into the bytes it adds when it appears in the
middle of a text, independent of how its tokenizer spells it:

- byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen2, Tekken): each character maps
  back through the GPT-2 byte-to-unicode table (``Ġ`` → space, ``Ċ`` → newline);
- SentencePiece (Llama-2, Mistral, Gemma; BPE or Unigram): ``▁`` → space,
  ``<0xNN>`` → the single byte NN (byte fallback);
- WordPiece (BERT): ``##x`` continues a word (bytes of ``x``); any other token
  starts a new word, so it contributes a space before it (``b" " + token``).
  WordPiece is lossy (lower-casing, accents, spaces around punctuation); the
  round-trip holds only modulo its normalizer and whitespace.
- added tokens that are not special contribute their literal text.

Special tokens (BOS, EOS, pad, unk, chat markers, ...) have no surface (``None``)
and carry *roles* instead, matched across vocabularies by role, never by bytes.

A surface may be an incomplete UTF-8 sequence, so surfaces are ``bytes``.

Normalizers documented: a SentencePiece tokenizer with a *dummy prefix* (Llama-2,
Mistral v1) puts a ``▁`` before the text, so the surfaces of ``encode(text)``
concatenate to ``b" " + text``; :meth:`Vocabulary.decode_bytes` drops it at the
start of a text. Mid-text re-encoding (:meth:`Vocabulary.encode_bytes`) uses a
copy of the tokenizer without dummy prefix, post-processor or special-token
matching.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

LOG = logging.getLogger(__name__)

BYTE_LEVEL = "byte_level"
SENTENCEPIECE = "sentencepiece"
WORDPIECE = "wordpiece"

_HEX_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")

# Chat and control markers of common families → one role name, so that they can be
# matched across vocabularies (the role is what matters, not the spelling).
ROLE_ALIASES: dict[str, tuple[str, ...]] = {
    "turn_start": ("<|im_start|>", "<start_of_turn>", "<|start_header_id|>", "[INST]", "<|user|>", "<|start|>"),
    "turn_end": ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "[/INST]", "<|end|>", "<|eom_id|>"),
    "header_end": ("<|end_header_id|>",),
    "fim_prefix": ("<|fim_prefix|>", "<fim_prefix>", "<|fim_begin|>", "[PREFIX]"),
    "fim_middle": ("<|fim_middle|>", "<fim_middle>", "<|fim_hole|>", "[MIDDLE]"),
    "fim_suffix": ("<|fim_suffix|>", "<fim_suffix>", "<|fim_end|>", "[SUFFIX]"),
    "fim_pad": ("<|fim_pad|>", "<fim_pad>"),
    "tool_call_start": ("<tool_call>", "[TOOL_CALLS]", "<|tool_call|>"),
    "tool_call_end": ("</tool_call>",),
    "system": ("<|system|>", "[SYSTEM_PROMPT]"),
    "assistant": ("<|assistant|>",),
    "file_sep": ("<file_sep>", "<|file_sep|>"),
    "repo_name": ("<repo_name>", "<|repo_name|>", "<reponame>"),
    "image": ("<image>", "<start_of_image>", "<|image_pad|>", "[IMG]", "<image_soft_token>"),
    "begin_of_text": ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>"),
    "end_of_text": ("<|endoftext|>", "<|end_of_text|>", "<eos>", "</s>"),
}
_ALIAS_TO_ROLE = {a: r for r, names in ROLE_ALIASES.items() for a in names}
_STANDARD_ROLES = ("bos", "eos", "pad", "unk", "mask", "sep", "cls")


@lru_cache(maxsize=1)
def gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table (printable stand-ins → bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def normalize_special_name(content: str) -> str:
    """``<|im_start|>`` → ``im start``: the name used to match unnamed special tokens."""
    s = re.sub(r"[<>|\[\]▁_\-@]+", " ", content.lower())
    return " ".join(s.split())


def backend_json(tokenizer) -> dict:
    """The Rust tokenizer's JSON description of a HF fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return json.loads(backend.to_str())


def _walk(node, type_name: str):
    """All sub-dicts of a tokenizer component with ``type == type_name`` (Sequence-aware)."""
    if isinstance(node, dict):
        if node.get("type") == type_name:
            yield node
        for v in node.values():
            yield from _walk(v, type_name)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, type_name)


def detect_family(j: dict) -> str:
    """Classify a tokenizer JSON as byte-level BPE, SentencePiece-style or WordPiece."""
    model_type = j.get("model", {}).get("type")
    if model_type == "WordPiece":
        return WORDPIECE
    comps = [j.get("pre_tokenizer"), j.get("decoder"), j.get("normalizer")]
    if any(True for c in comps for _ in _walk(c, "ByteLevel")):
        return BYTE_LEVEL
    if model_type == "Unigram" or any(True for c in comps for _ in _walk(c, "Metaspace")):
        return SENTENCEPIECE
    if j.get("model", {}).get("byte_fallback") or any(True for c in comps for _ in _walk(c, "ByteFallback")):
        return SENTENCEPIECE
    dec = json.dumps(j.get("decoder"))
    if "▁" in dec:
        return SENTENCEPIECE
    raise ValueError(
        f"unsupported tokenizer type (model {model_type!r}, decoder {str(j.get('decoder'))[:80]}): "
        "expected byte-level BPE, SentencePiece or WordPiece"
    )


def _has_dummy_prefix(j: dict) -> bool:
    for node in _walk(j.get("normalizer"), "Prepend"):
        if node.get("prepend") == "▁":
            return True
    for node in _walk(j.get("pre_tokenizer"), "Metaspace"):
        if node.get("prepend_scheme", "always" if node.get("add_prefix_space", False) else "never") in ("always", "first"):
            return True
    return False


def _is_start_rule(n) -> bool:
    """Normalizers that only act at the start of a text: the dummy prefix (``Prepend("▁")``) and the
    legacy SentencePiece conversion's ``Replace(\\A▁ → ▁▁)``."""
    if not isinstance(n, dict):
        return False
    if n.get("type") == "Prepend":
        return True
    return n.get("type") == "Replace" and str(n.get("pattern", {}).get("Regex", "")).startswith("\\A")


def _raw_encoder_json(j: dict) -> dict:
    """A copy of the tokenizer that encodes a fragment as it would appear mid-text (``j`` is left as it is).

    Only the components that change are copied; the vocabulary and merges are shared with ``j``
    (a deep copy of a 262k-token JSON takes a second).
    """
    j = dict(j)
    j["normalizer"] = copy.deepcopy(j.get("normalizer"))
    j["pre_tokenizer"] = copy.deepcopy(j.get("pre_tokenizer"))
    j["post_processor"] = None
    j["truncation"] = None
    j["padding"] = None

    def strip_prepend(node):
        if isinstance(node, dict):
            if node.get("type") == "Sequence" and "normalizers" in node:
                node["normalizers"] = [strip_prepend(n) for n in node["normalizers"] if not _is_start_rule(n)]
                return node
            if _is_start_rule(node):
                return None
        return node

    j["normalizer"] = strip_prepend(j.get("normalizer"))
    for node in _walk(j.get("pre_tokenizer"), "Metaspace"):
        node["prepend_scheme"] = "never"
        if "add_prefix_space" in node:
            node["add_prefix_space"] = False
    for node in _walk(j.get("pre_tokenizer"), "ByteLevel"):
        node["add_prefix_space"] = False
    return j


def tokenizer_hash(tokenizer, j: dict | None = None) -> str:
    """Content hash of a tokenizer: vocabulary, merges, components and special tokens.

    Independent of where the tokenizer was loaded from; changes when any id would change.
    """
    j = dict(backend_json(tokenizer) if j is None else j)
    for k in ("truncation", "padding"):
        j.pop(k, None)
    specials = {r: getattr(tokenizer, f"{r}_token_id", None) for r in _STANDARD_ROLES}
    blob = json.dumps({"backend": j, "specials": specials, "len": len(tokenizer)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Canonical view of one tokenizer.

    Attributes:
        family: ``byte_level`` | ``sentencepiece`` | ``wordpiece``.
        surfaces: length ``size``; canonical bytes per id, ``None`` for special tokens
            and for ids the tokenizer does not define.
        roles: special-token id → roles (``bos``, ``eos``, ``turn_start``, ``special:<name>``, ...).
        special_content: special-token id → its literal string.
        dummy_prefix: the tokenizer puts a space before the text (SentencePiece ``add_dummy_prefix``).
        hash: :func:`tokenizer_hash` of the tokenizer.
        name: free-form label (path or hub id) for reports.
    """

    family: str
    surfaces: tuple
    roles: dict
    special_content: dict
    dummy_prefix: bool
    hash: str
    name: str = ""
    _build_raw: Callable[[], object] | None = field(default=None, repr=False)  # builds the mid-text encoder

    @property
    def raw_encoder(self):
        """The mid-text ``tokenizers.Tokenizer`` (no post-processor, no dummy prefix, special tokens
        encoded as text), built on first use (``None`` without a builder): a 262k-token vocabulary takes
        about a second to rebuild, and many vocabularies are never encoded with (a transplant's new one)."""
        raw = self.__dict__.get("_raw_encoder")
        if raw is None and self._build_raw is not None:
            raw = self._build_raw()
            object.__setattr__(self, "_raw_encoder", raw)
            object.__setattr__(self, "_build_raw", None)  # drops the tokenizer JSON it holds
        return raw

    @property
    def size(self) -> int:
        return len(self.surfaces)

    def __len__(self) -> int:
        return len(self.surfaces)

    # -- lookups -----------------------------------------------------------------
    @property
    def identity(self):
        """The :class:`~surgery.vocab.identity.TokenIdentity` of this vocabulary (computed once)."""
        t = self.__dict__.get("_identity")
        if t is None:
            from surgery.vocab.identity import token_identity

            t = token_identity(self)
            object.__setattr__(self, "_identity", t)
        return t

    @property
    def surface_to_id(self) -> dict[bytes, int]:
        """Surface → the id the tokenizer emits for those bytes mid-text (non-special tokens only).

        Where several ids share a surface (SentencePiece byte-fallback twins), this is the one
        the tokenizer produces; see :mod:`surgery.vocab.identity`.
        """
        return self.identity.surface_to_id

    @property
    def is_emitted(self) -> np.ndarray:
        """``(V,)`` bool: False for ids that share a surface with another id and are never emitted for it."""
        return self.identity.is_emitted

    @property
    def never_emitted(self) -> np.ndarray:
        """Sorted int64 ids whose surface the tokenizer always spells with another id."""
        return self.identity.never_emitted

    @property
    def emitted_id(self) -> np.ndarray:
        """``(V,)`` int64: for each id, the id emitted for its surface (itself unless never emitted)."""
        return self.identity.emitted_id

    @property
    def surface_groups(self) -> tuple:
        """Ids sharing a surface (twins), each group ascending."""
        return self.identity.groups

    @property
    def byte_token_ids(self) -> np.ndarray:
        """``(256,)`` id of the token whose surface is exactly that one byte, ``-1`` if none."""
        a = self.__dict__.get("_byte_ids")
        if a is None:
            a = np.full(256, -1, dtype=np.int64)
            s2i = self.surface_to_id
            for b in range(256):
                a[b] = s2i.get(bytes([b]), -1)
            object.__setattr__(self, "_byte_ids", a)
        return a

    @property
    def surface_lengths(self) -> np.ndarray:
        """``(V,)`` byte length of each surface (0 for special / undefined ids)."""
        a = self.__dict__.get("_lens")
        if a is None:
            a = np.array([len(s) if s is not None else 0 for s in self.surfaces], dtype=np.int64)
            object.__setattr__(self, "_lens", a)
        return a

    def ids_with_role(self, role: str) -> list[int]:
        return sorted(i for i, rs in self.roles.items() if role in rs)

    # -- decoding ----------------------------------------------------------------
    def decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        """Concatenate surfaces of ``ids`` (special tokens contribute nothing).

        With ``at_start`` the dummy-prefix space (SentencePiece) or the first word's
        space (WordPiece) is removed, as the tokenizer's decoder does.
        """
        out = b"".join(self.surfaces[i] or b"" for i in ids)
        if at_start and (self.dummy_prefix or self.family == WORDPIECE) and out.startswith(b" "):
            out = out[1:]
        return out

    # -- mid-text encoding ------------------------------------------------------
    def encode_text_many(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode text fragments as they would be segmented in the middle of a text."""
        if not texts:
            return []
        encs = self.raw_encoder.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode_bytes_many(self, items: Sequence[bytes]) -> list[list[int]]:
        """Encode byte strings mid-text; invalid UTF-8 bytes map to single-byte tokens.

        Returns:
            One id list per item (possibly empty when a byte has no token at all).
        """
        texts, plan = [], []
        for data in items:
            try:
                plan.append([("t", len(texts))])
                texts.append(data.decode("utf-8"))
            except UnicodeDecodeError:
                parts = []
                for kind, chunk in _split_utf8(data):
                    if kind == "t":
                        parts.append(("t", len(texts)))
                        texts.append(chunk.decode("utf-8"))
                    else:
                        parts.append(("b", chunk))
                plan[-1] = parts
        encoded = self.encode_text_many(texts)
        out = []
        bt = self.byte_token_ids
        for parts in plan:
            ids: list[int] = []
            for kind, v in parts:
                if kind == "t":
                    ids.extend(encoded[v])
                else:
                    ids.extend(int(bt[b]) for b in v if bt[b] >= 0)
            out.append(ids)
        return out

    def encode_bytes(self, data: bytes) -> list[int]:
        return self.encode_bytes_many([data])[0]


def _split_utf8(data: bytes) -> list[tuple[str, bytes]]:
    """Split bytes into maximal valid-UTF-8 runs (``"t"``) and single invalid bytes (``"b"``)."""
    out: list[tuple[str, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        try:
            data[i:].decode("utf-8")
            out.append(("t", data[i:]))
            break
        except UnicodeDecodeError as e:
            if e.start > 0:
                out.append(("t", data[i:i + e.start]))
            out.append(("b", data[i + e.start:i + e.end]))
            i += e.end
    return out


def _vocab_items(j: dict) -> list[tuple[str, int]]:
    model = j["model"]
    vocab = model.get("vocab")
    if isinstance(vocab, dict):
        return list(vocab.items())
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        return [(p[0], i) for i, p in enumerate(vocab)]
    raise ValueError("tokenizer JSON has no vocabulary")


def _surface_of(token: str, family: str, decoder: dict[str, int]) -> bytes:
    if family == BYTE_LEVEL:
        try:
            return bytes(decoder[c] for c in token)
        except KeyError:
            return token.encode("utf-8")
    if family == SENTENCEPIECE:
        m = _HEX_BYTE.match(token)
        if m:
            return bytes([int(m.group(1), 16)])
        return token.replace("▁", " ").encode("utf-8")
    # WordPiece
    if token.startswith("##"):
        return token[2:].encode("utf-8")
    return b" " + token.encode("utf-8")


def special_roles(tokenizer, special_ids: dict[int, str]) -> dict[int, tuple[str, ...]]:
    """Roles of each special token: standard roles from the tokenizer, chat markers by alias, else by name."""
    roles: dict[int, list[str]] = {i: [] for i in special_ids}
    for r in _STANDARD_ROLES:
        tid = getattr(tokenizer, f"{r}_token_id", None)
        if isinstance(tid, int) and tid in roles:
            roles[tid].append(r)
    for i, content in special_ids.items():
        alias = _ALIAS_TO_ROLE.get(content)
        if alias:
            roles[i].append(alias)
        roles[i].append("special:" + normalize_special_name(content))
    return {i: tuple(dict.fromkeys(rs)) for i, rs in roles.items()}


def canonical_vocabulary(tokenizer, name: str = "") -> Vocabulary:
    """Build the canonical :class:`Vocabulary` of a HF fast tokenizer.

    Raises:
        ValueError: the tokenizer has no fast backend or an unsupported model type.
    """
    from tokenizers import Tokenizer

    if not hasattr(tokenizer, "backend_tokenizer"):
        raise ValueError("a fast (Rust-backed) tokenizer is required")
    j = backend_json(tokenizer)
    family = detect_family(j)
    size = max(len(tokenizer), tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True))
    surfaces: list[bytes | None] = [None] * size
    decoder = gpt2_byte_decoder()
    for tok, i in _vocab_items(j):
        if i < size:
            surfaces[i] = _surface_of(tok, family, decoder)
    special_ids: dict[int, str] = {}
    for a in j.get("added_tokens", []):
        i = a["id"]
        if i >= size:
            continue
        if a.get("special", False):
            special_ids[i] = a["content"]
            surfaces[i] = None
        else:
            surfaces[i] = a["content"].encode("utf-8")
    for tid, content in zip(tokenizer.all_special_ids, tokenizer.all_special_tokens):
        if tid is not None and tid < size and tid not in special_ids:
            special_ids[tid] = content
            surfaces[tid] = None
    for i, s in enumerate(surfaces):
        if s == b"":
            surfaces[i] = None
    raw_json = _raw_encoder_json(j)

    def build_raw():
        raw = Tokenizer.from_str(json.dumps(raw_json))
        raw.encode_special_tokens = True
        return raw

    return Vocabulary(
        family=family,
        surfaces=tuple(surfaces),
        roles=special_roles(tokenizer, special_ids),
        special_content=special_ids,
        dummy_prefix=_has_dummy_prefix(j),
        hash=tokenizer_hash(tokenizer, j),
        name=name or str(getattr(tokenizer, "name_or_path", "")),
        _build_raw=build_raw,
    )
