"""Superword ("Supertoken") BPE tokenizers trained with the ``tokenizers`` library.

Three methods, registered by name (:data:`METHODS`), all byte-level BPE over the full
256-byte alphabet (so no text is ever unknown: the byte-level alphabet is the byte fallback):

- ``superbpe`` (default; Liu, Hayase et al. 2025, arXiv 2503.13423): a pre-tokenization
  curriculum. Stage 1 is ordinary BPE with a word regex (Llama-3 / GPT-4 style) up to the
  *transition* vocabulary size. Stage 2 keeps those merges and continues merging with the
  whitespace pre-tokenization turned off: as in the reference implementation the text is only cut
  around digit groups (``\\p{N}{1,3}``, the groups stage 1 makes), so merges can bridge spaces and
  line breaks. Every stage-2 boundary is also a stage-1 boundary, hence stage-1 merges keep
  applying unchanged. (Cutting stage 2 at line breaks as well cost 4% bytes/token on the wrapped
  debian-reference text.) If the text cannot support the transition size (stage 1 runs out of
  pairs) stage 2 starts where stage 1 stopped.
  Stage 2 runs on the library's own BPE trainer: each distinct stage-2 piece is encoded with the
  stage-1 model, every stage-1 token id is written as one private-use character, and a fresh
  ``BpeTrainer`` learns merges over those characters; the merges are spelled back into byte-level
  strings and appended after the stage-1 merges. The encoder applies merges by rank, so all
  stage-1 merges run first: the segmentation stage 2 trained on is what the saved tokenizer does.
- ``chunks`` (TokenAdapt's Supertokens): the training text is cut into chunks of random length
  (``chunk_min``–``chunk_max`` characters), joined by a separator that the training
  pre-tokenizer splits on and removes; byte-level without the word regex. The saved tokenizer
  drops the separator split (it would delete that character from user text) and encodes text as
  one byte-level sequence.
- ``bpe``: the same-size standard BPE control (stage 1 alone, trained to the full size).

Saved tokenizers are Hugging Face folders (:class:`transformers.PreTrainedTokenizerFast`) with
``<unk> <s> </s> <pad>`` (ids 0–3), the ChatML markers ``<|im_start|> <|im_end|>`` (ids 4–5), a
ChatML chat template, no automatic BOS/EOS, and a ``supertokens.json`` describing how they were
made.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from surgery.config import Config
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

UNK, BOS, EOS, PAD, TURN_START, TURN_END = "<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, TURN_START, TURN_END)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Stage 1 / control: Llama-3 (GPT-4) style words, 1–3 digit groups, punctuation runs, whitespace.
WORD_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
DIGITS_REGEX = r"\p{N}{1,3}"  # stage 2: digit groups stay isolated (same groups as stage 1)

# Stage-1 token ids as single characters for the stage-2 trainer: planes 15 and 16 (private use).
_PUA_A, _PUA_B, _PUA_SPAN = 0xF0000, 0x100000, 65534
MAX_STAGE1_IDS = 2 * _PUA_SPAN
MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 1  # specials, the byte alphabet and at least one merge
META_NAME = "supertokens.json"
CONTROL_DIR = "bpe-control"


@dataclass(frozen=True)
class SupertokenConfig(Config):
    """How to train a superword tokenizer.

    Attributes:
        method: a name in :data:`METHODS` (``superbpe``, ``chunks``, ``bpe``).
        vocab_size: final vocabulary size, special tokens and the 256 byte tokens included.
        transition: ``superbpe`` only: vocabulary size at which stage 2 starts
            (default ``round(transition_fraction * vocab_size)``).
        transition_fraction: default transition as a fraction of ``vocab_size``.
        min_frequency: a pair must occur at least this often to be merged (every stage, every
            method; the control of a run uses the same value).
        chunk_min: ``chunks`` only: shortest random chunk, in characters.
        chunk_max: ``chunks`` only: longest random chunk, in characters.
        seed: ``chunks`` only: random chunk lengths.
    """

    HINT = "fix the listed values (see `surgery supertokens train --help`)"

    method: str = field(default="superbpe", metadata={"help": "superbpe, chunks (TokenAdapt's random chunks) or bpe"})
    vocab_size: int = field(default=32000, metadata={
        "help": "final vocabulary size (specials and the 256 byte tokens included)"})
    transition: int | None = field(default=None, metadata={
        "help": "superbpe: vocabulary size where stage 2 starts (default: transition_fraction x vocab size)"})
    transition_fraction: float = field(default=0.8, metadata={"help": "default transition as a fraction of vocab_size"})
    min_frequency: int = field(default=2, metadata={"help": "least pair count merged (every stage, every method)"})
    chunk_min: int = field(default=4, metadata={"help": "chunks: shortest chunk in characters"})
    chunk_max: int = field(default=23, metadata={"help": "chunks: longest chunk in characters"})
    seed: int = field(default=0, metadata={"help": "chunks: random chunk lengths"})

    @property
    def transition_size(self) -> int:
        """The stage-1 target size (the default never drops below the byte alphabet plus specials)."""
        if self.transition is not None:
            return self.transition
        return max(MIN_VOCAB, int(round(self.transition_fraction * self.vocab_size)))

    def validate(self) -> list[str]:
        """Every problem with the fields (checked when the config is built: :class:`surgery.config.Config`)."""
        problems = []
        floor = MIN_VOCAB
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(sorted(METHODS))}")
        if self.vocab_size < floor:
            problems.append(f"vocab_size {self.vocab_size} is below {floor} (256 bytes + {len(SPECIAL_TOKENS)} specials + 1)")
        if self.method == "superbpe":
            t = self.transition_size
            if not floor <= t < self.vocab_size:
                problems.append(f"transition {t} must lie in [{floor}, vocab_size={self.vocab_size})")
            if t > MAX_STAGE1_IDS:
                problems.append(f"transition {t} exceeds {MAX_STAGE1_IDS} (stage-1 ids are written as private-use characters)")
        if not 0.0 < self.transition_fraction < 1.0:
            problems.append(f"transition_fraction {self.transition_fraction} must lie in (0, 1)")
        if self.min_frequency < 1:
            problems.append(f"min_frequency {self.min_frequency} must be >= 1")
        if not 1 <= self.chunk_min <= self.chunk_max:
            problems.append(f"chunk lengths must satisfy 1 <= chunk_min ({self.chunk_min}) <= chunk_max ({self.chunk_max})")
        return problems


# -- components ---------------------------------------------------------------------------------
def _byte_level(use_regex: bool = False):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def word_pre_tokenizer():
    """Stage 1 / control: word regex, then bytes → printable byte-level characters."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(WORD_REGEX), behavior="isolated"), _byte_level()])


def superword_pre_tokenizer():
    """Stage 2 (and the saved ``superbpe`` tokenizer): digit groups only, so tokens can span spaces and lines."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(DIGITS_REGEX), behavior="isolated"), _byte_level()])


def _trainer(vocab_size: int, min_frequency: int, alphabet: Sequence[str] | None = None, specials: bool = True):
    from tokenizers import pre_tokenizers, trainers

    return trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS) if specials else [],
        initial_alphabet=list(pre_tokenizers.ByteLevel.alphabet() if alphabet is None else alphabet),
    )


def _assemble(vocab: dict[str, int], merges: list[tuple[str, str]], pre_tokenizer):
    """A byte-level BPE :class:`tokenizers.Tokenizer` with our special tokens registered."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def _vocab_merges(tok) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _check_specials_first(vocab: dict[str, int]) -> None:
    for i, s in enumerate(SPECIAL_TOKENS):
        if vocab.get(s) != i:  # the trainer puts special tokens first, in order
            raise RuntimeError(f"special token {s!r} has id {vocab.get(s)}, expected {i}")


# -- methods ------------------------------------------------------------------------------------
METHODS: dict[str, Callable[[Sequence[str], SupertokenConfig], tuple[object, dict]]] = {}


def register_method(name: str):
    """Register ``f(texts, config) -> (tokenizers.Tokenizer, info dict)`` under ``name``."""

    def deco(fn):
        METHODS[name] = fn
        return fn

    return deco


def _train_word_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = word_pre_tokenizer()
    tok.train_from_iterator(list(texts), _trainer(vocab_size, min_frequency))
    vocab, merges = _vocab_merges(tok)
    _check_specials_first(vocab)
    return vocab, merges


@register_method("bpe")
def train_bpe(texts: Sequence[str], config: SupertokenConfig):
    """Standard byte-level BPE with the word regex (the control)."""
    vocab, merges = _train_word_bpe(texts, config.vocab_size, config.min_frequency)
    return _assemble(vocab, merges, word_pre_tokenizer()), {}


def _id_char(i: int) -> str:
    return chr(_PUA_A + i) if i < _PUA_SPAN else chr(_PUA_B + i - _PUA_SPAN)


def _char_id(c: str) -> int:
    o = ord(c)
    return o - _PUA_A if o < _PUA_B else o - _PUA_B + _PUA_SPAN


def stage2_pieces(texts: Sequence[str]) -> Counter:
    """Stage-2 pre-tokens (byte-level strings) of the training texts with their counts."""
    pre = superword_pre_tokenizer()
    counts: Counter = Counter()
    for text in texts:
        counts.update(p for p, _ in pre.pre_tokenize_str(text))
    return counts


@register_method("superbpe")
def train_superbpe(texts: Sequence[str], config: SupertokenConfig):
    """Two-stage SuperBPE: subword BPE up to the transition size, then merges across spaces."""
    from tokenizers import Tokenizer, models

    t0 = time.time()
    vocab, merges = _train_word_bpe(texts, config.transition_size, config.min_frequency)
    info = {"stage1_vocab_size": len(vocab), "stage1_merges": len(merges)}
    LOG.info("superbpe stage 1: %d tokens, %d merges (%.1f s)", len(vocab), len(merges), time.time() - t0)
    id_to_tok = {i: s for s, i in vocab.items()}

    # Stage-1 segmentation of every distinct stage-2 piece, spelled as one character per token id.
    counts = stage2_pieces(texts)
    pieces = [p for p, c in counts.items()]
    stage1 = Tokenizer(models.BPE(vocab=vocab, merges=merges))  # no pre-tokenizer: a piece is one word
    encoded = stage1.encode_batch(pieces, add_special_tokens=False)
    words: list[tuple[str, int]] = []
    alphabet: set[str] = set()
    for enc, p in zip(encoded, pieces):
        if len(enc.ids) > 1:
            w = "".join(_id_char(i) for i in enc.ids)
            words.append((w, counts[p]))
            alphabet.update(w)
    want = config.vocab_size - len(vocab)
    slack = want // 20 + 64  # byte-identical duplicates are skipped below
    trainer = _trainer(len(alphabet) + want + slack, config.min_frequency, alphabet=sorted(alphabet), specials=False)
    t1 = time.time()
    stage2 = Tokenizer(models.BPE())
    stage2.train_from_iterator((w for w, c in words for _ in range(c)), trainer, length=sum(c for _, c in words))
    _, merges2 = _vocab_merges(stage2)
    LOG.info("superbpe stage 2: %d candidate merges over %d pieces (%.1f s)", len(merges2), len(words), time.time() - t1)

    def spell(s: str) -> str:
        return "".join(id_to_tok[_char_id(c)] for c in s)

    vocab = dict(vocab)
    merges = list(merges)
    seen = set(merges)
    for a, b in merges2:
        if len(vocab) >= config.vocab_size:
            break
        pair = (spell(a), spell(b))
        if pair in seen:
            continue
        seen.add(pair)
        merges.append(pair)
        vocab.setdefault(pair[0] + pair[1], len(vocab))
    info.update(stage2_merges=len(merges) - info["stage1_merges"], stage2_pieces=len(words))
    return _assemble(vocab, merges, superword_pre_tokenizer()), info


def random_chunks(text: str, rng: random.Random, lo: int, hi: int) -> list[str]:
    """Cut ``text`` into consecutive chunks of uniformly random length in ``[lo, hi]`` characters."""
    out, i = [], 0
    while i < len(text):
        n = rng.randint(lo, hi)
        out.append(text[i:i + n])
        i += n
    return out


def _absent_char(texts: Sequence[str]) -> str:
    for o in range(0xE000, 0xF8FF):  # BMP private-use area
        c = chr(o)
        if not any(c in t for t in texts):
            return c
    raise SurgeryError("every private-use character occurs in the training text", "cannot pick a chunk separator")


@register_method("chunks")
def train_chunks(texts: Sequence[str], config: SupertokenConfig):
    """TokenAdapt's Supertokens: BPE over random-length chunks, byte-level without the word regex."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    sep = _absent_char(texts)
    rng = random.Random(config.seed)
    joined = [sep.join(random_chunks(t, rng, config.chunk_min, config.chunk_max)) for t in texts]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(sep, behavior="removed"), _byte_level()])
    tok.train_from_iterator(joined, _trainer(config.vocab_size, config.min_frequency))
    vocab, merges = _vocab_merges(tok)
    _check_specials_first(vocab)
    return _assemble(vocab, merges, _byte_level()), {"chunks": sum(t.count(sep) + 1 for t in joined),
                                                      "separator": f"U+{ord(sep):04X}"}


# -- Hugging Face packaging ---------------------------------------------------------------------
def to_transformers(tok):
    """Wrap a trained :class:`tokenizers.Tokenizer` as a ``PreTrainedTokenizerFast`` with ChatML."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        extra_special_tokens=[TURN_START, TURN_END], add_bos_token=False, add_eos_token=False,
        model_max_length=1_000_000_000,
    )
    hf.chat_template = CHATML_TEMPLATE
    return hf


def text_fingerprint(text: str) -> dict:
    data = text.encode("utf-8")
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def train_tokenizer(texts: Sequence[str], config: SupertokenConfig, with_info: bool = False):
    """Train one tokenizer with ``config.method``.

    Returns:
        A ``tokenizers.Tokenizer``; with ``with_info`` a pair ``(tokenizer, info)`` where info holds
        method details (e.g. the stage-1 size actually reached by ``superbpe``).
    """
    tok, info = METHODS[config.method](texts, config)
    if tok.get_vocab_size() < config.vocab_size:
        LOG.warning("%s: the text supports only %d of %d tokens (no pair occurs %d+ times); train on more text "
                    "or lower --vocab-size", config.method, tok.get_vocab_size(), config.vocab_size, config.min_frequency)
    return (tok, info) if with_info else tok


def save_tokenizer(tok, folder: Path, meta: dict) -> None:
    """Write a HF tokenizer folder plus ``supertokens.json`` into an existing folder."""
    folder.mkdir(parents=True, exist_ok=True)
    to_transformers(tok).save_pretrained(str(folder))
    (folder / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@dataclass
class TrainResult:
    """What :func:`train_supertokens` made: folders, sizes and training-text compression."""

    out: str
    method: str
    vocab_size: int
    bytes_per_token: float
    seconds: float
    control_out: str | None = None
    control_vocab_size: int | None = None
    control_bytes_per_token: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def bytes_per_token(tok, texts: Sequence[str]) -> float:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tok = sum(len(e.ids) for e in tok.encode_batch(list(texts), add_special_tokens=False))
    return n_bytes / max(n_tok, 1)


def train_supertokens(text_paths: Sequence[str | Path], out: str | Path, config: SupertokenConfig,
                      with_control: bool = False, overwrite: bool = False) -> TrainResult:
    """Train a superword tokenizer (and optionally the same-size BPE control) and save it atomically.

    The tokenizer goes to ``out``; the control, when asked for, to ``out/bpe-control``.

    Raises:
        ConfigError: invalid config. SurgeryError: unreadable texts, ``out`` exists without ``overwrite``.
    """
    import tokenizers

    from surgery.checkpoint import atomic_output_dir, check_output_free
    from surgery.textio import read_texts

    check_output_free(out, overwrite, inputs=tuple(text_paths))
    texts = read_texts(text_paths)
    base_meta = {
        "texts": [{"path": str(p), **text_fingerprint(t)} for p, t in zip(text_paths, texts)],
        "tokenizers_version": tokenizers.__version__,
        "special_tokens": list(SPECIAL_TOKENS),
    }
    t0 = time.time()
    tok, info = train_tokenizer(texts, config, with_info=True)
    secs = time.time() - t0
    res = TrainResult(out=str(out), method=config.method, vocab_size=tok.get_vocab_size(),
                      bytes_per_token=round(bytes_per_token(tok, texts), 4), seconds=round(secs, 2))
    control = None
    if with_control:
        ccfg = SupertokenConfig(method="bpe", vocab_size=config.vocab_size, min_frequency=config.min_frequency)
        control = train_tokenizer(texts, ccfg)
        res.control_out = str(Path(out) / CONTROL_DIR)
        res.control_vocab_size = control.get_vocab_size()
        res.control_bytes_per_token = round(bytes_per_token(control, texts), 4)
    with atomic_output_dir(out, overwrite) as tmp:
        meta = {**base_meta, "config": asdict(config), "vocab_size": res.vocab_size,
                "transition": config.transition_size if config.method == "superbpe" else None, "info": info,
                "train_bytes_per_token": res.bytes_per_token, "train_seconds": res.seconds}
        save_tokenizer(tok, tmp, meta)
        if control is not None:
            cmeta = {**base_meta, "config": asdict(ccfg), "vocab_size": res.control_vocab_size,
                     "train_bytes_per_token": res.control_bytes_per_token, "control_of": config.method}
            save_tokenizer(control, tmp / CONTROL_DIR, cmeta)
    return res
