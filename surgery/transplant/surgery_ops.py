"""Model surgery for a new vocabulary: rows, heads, special tokens, config ids, chat template.

- Rows are replaced *in the existing modules* (``weight`` swapped, sizes updated), so
  module subclasses survive: Gemma's ``Gemma3TextScaledWordEmbedding`` keeps its
  ``embed_scale``. New rows are computed in the stored (unscaled) weight space; the
  scale multiplies every row alike, so linear combinations of old rows stay consistent.
- Tied heads are tied again (one ``Parameter``); ``untie`` gives the head its own rows
  and sets ``tie_word_embeddings = False``.
- The row count is padded to a multiple (default 128) for fast matmuls; the tokenizer
  keeps its own length (``len(tokenizer)`` ≤ ``config.vocab_size``), as HF expects.
- Special tokens are matched by role (see :func:`special_token_map`), config and
  generation-config ids are rewritten to the new tokenizer's ids.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.vocab.surfaces import Vocabulary

LOG = logging.getLogger(__name__)

_BOS_NAMES = ("<|begin_of_text|>", "<bos>", "<s>", "<|startoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "<eos>", "</s>", "<|endoftext|>")


def padded_size(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ≥ ``n``."""
    return int(math.ceil(n / multiple) * multiple) if multiple > 1 else int(n)


def embedding_modules(model) -> tuple[nn.Module, nn.Module | None, bool]:
    """The input embedding, the output head (or ``None``) and whether they share weights.

    Raises:
        SurgeryError: the model has no input embedding matrix.
    """
    try:
        emb = model.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    w = getattr(emb, "weight", None)
    if emb is None or not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise SurgeryError(f"model {type(model).__name__} has no input embedding matrix",
                           "pass a causal LM whose get_input_embeddings() returns an embedding layer")
    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        head = None
    if head is not None and getattr(head, "bias", None) is not None:
        raise SurgeryError(f"model {type(model).__name__} has an output head with a bias; not supported",
                           "transplant a model whose lm_head has no bias")
    tied = head is not None and (head.weight is emb.weight or (
        not head.weight.is_meta and head.weight.data_ptr() == emb.weight.data_ptr()))
    return emb, head, tied


def _set_vocab_size(config, n: int) -> None:
    config.vocab_size = n
    sub = getattr(config, "text_config", None)
    if sub is not None and hasattr(sub, "vocab_size"):
        sub.vocab_size = n


def set_vocab_config(config, n_rows: int, tie: bool) -> None:
    """Write the new row count and head tying into a model config (and its ``text_config``)."""
    _set_vocab_size(config, n_rows)
    config.tie_word_embeddings = tie
    sub = getattr(config, "text_config", None)
    if sub is not None and hasattr(sub, "tie_word_embeddings"):
        sub.tie_word_embeddings = tie


def replace_rows(model, new_in: torch.Tensor, new_out: torch.Tensor | None, pad_id: int | None = None) -> None:
    """Swap in new embedding (and head) rows in place.

    Args:
        new_in: ``(V, d)`` input rows.
        new_out: ``(V, d)`` head rows, or ``None`` to tie the head to the input rows.
        pad_id: new ``padding_idx`` for embeddings that had one.
    """
    emb, head, _ = embedding_modules(model)
    V = new_in.shape[0]
    emb.weight = nn.Parameter(new_in.contiguous(), requires_grad=emb.weight.requires_grad)
    emb.num_embeddings = V
    if getattr(emb, "padding_idx", None) is not None:
        emb.padding_idx = pad_id if pad_id is not None and pad_id < V else None
    if head is not None:
        if new_out is None:
            head.weight = emb.weight
        else:
            head.weight = nn.Parameter(new_out.contiguous(), requires_grad=head.weight.requires_grad)
        if hasattr(head, "out_features"):
            head.out_features = V
    tie = head is not None and new_out is None
    set_vocab_config(model.config, V, tie)
    if hasattr(model, "get_expanded_tied_weights_keys"):
        try:
            model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True) if tie else {}
        except Exception:  # older/newer transformers: the attribute is advisory for saving only
            pass


# --------------------------------------------------------------------------- special tokens
def fill_missing_roles(tokenizer) -> dict[str, str]:
    """Set a missing ``bos_token`` / ``eos_token`` from the tokenizer's own begin/end-of-text token.

    The Llama-3 ``tokenizer.json`` alone, for example, carries ``<|begin_of_text|>`` but no
    ``bos_token`` (that lives in ``tokenizer_config.json``).

    Returns:
        ``{role: token}`` of what was set.
    """
    vocab = tokenizer.get_vocab()
    added = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    done = {}
    for role, names in (("bos", _BOS_NAMES), ("eos", _EOS_NAMES)):
        if getattr(tokenizer, f"{role}_token", None) is None:
            for n in names:
                if n in added or n in vocab:
                    setattr(tokenizer, f"{role}_token", n)
                    done[role] = n
                    break
    return done


def special_token_map(old_vocab: Vocabulary, new_vocab: Vocabulary, old_tok, new_tok) -> tuple[np.ndarray, np.ndarray]:
    """New special tokens matched to old ones: ``(new_ids, old_ids)``.

    Order of rules: the new tokenizer's document-start token (BOS, else EOS) gets the
    old document-start row, so a text is conditioned on the token the model knows as
    a start; then the alignment core's role matching (chat-marker aliases, names,
    bos/eos/pad/...).
    """
    from surgery.evaluate import document_start_id
    from surgery.vocab.projection import special_pairs

    pairs: dict[int, int] = {}
    ds_new, ds_old = document_start_id(new_tok), document_start_id(old_tok)
    if ds_new is not None and ds_old is not None and new_vocab.surfaces[ds_new] is None and \
            (ds_old >= len(old_vocab) or old_vocab.surfaces[ds_old] is None):
        pairs[int(ds_new)] = int(ds_old)
    a, b = special_pairs(new_vocab, old_vocab)
    for i, j in zip(a.tolist(), b.tolist()):
        pairs.setdefault(i, j)
    keys = np.array(sorted(pairs), dtype=np.int64)
    return keys, np.array([pairs[k] for k in keys], dtype=np.int64)


def update_config_ids(model, old_tok, new_tok, new_ids: np.ndarray, old_ids: np.ndarray) -> dict:
    """Rewrite bos/eos/pad/unk ids of the config and generation config to new-tokenizer ids.

    A role the new tokenizer defines wins; otherwise an old id is carried through the
    special-token map (e.g. an instruct model's ``eos_token_id`` list); otherwise ``None``.

    Returns:
        ``{field: new value}`` for the report.
    """
    old_to_new: dict[int, int] = {}
    for n, o in zip(new_ids.tolist(), old_ids.tolist()):
        old_to_new.setdefault(o, n)

    def carry(v):
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            out = [old_to_new[x] for x in v if x in old_to_new]
            return out or None
        return old_to_new.get(int(v))

    changes = {}
    for cfg_name, cfg in (("config", model.config), ("generation_config", getattr(model, "generation_config", None))):
        if cfg is None:
            continue
        for role in ("bos", "eos", "pad", "unk"):
            key = f"{role}_token_id"
            if not hasattr(cfg, key) and role == "unk":
                continue
            old_v = getattr(cfg, key, None)
            mine = getattr(new_tok, key, None)
            carried = carry(old_v)
            if role == "eos" and carried is not None:
                # keep the old stop tokens (an instruct model's turn end) next to the new EOS
                new_v = list(dict.fromkeys(([mine] if mine is not None else [])
                                           + (carried if isinstance(carried, list) else [carried])))
                new_v = new_v if len(new_v) > 1 else new_v[0]
            elif mine is not None:
                new_v = mine
            else:
                new_v = carried[0] if isinstance(carried, list) and len(carried) == 1 else carried
            setattr(cfg, key, new_v)
            changes[f"{cfg_name}.{key}"] = new_v
    return changes


# --------------------------------------------------------------------------- chat template
def template_markers(tokenizer, template: str) -> list[str]:
    """Special/added token strings of ``tokenizer`` that a chat template writes literally."""
    names = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    names |= set(getattr(tokenizer, "all_special_tokens", []) or [])
    return sorted(n for n in names if n and n in template)


def _has_token(tokenizer, s: str) -> bool:
    if s in tokenizer.get_vocab():
        return True
    ids = tokenizer.convert_tokens_to_ids(s)
    return ids is not None and ids != tokenizer.unk_token_id


def chat_template_plan(old_tok, new_tok) -> tuple[str | None, str, list[str]]:
    """Decide the output chat template.

    Returns:
        ``(template, decision, missing_markers)``; decision is ``new`` (the new
        tokenizer's own), ``carried`` (the old one, all its markers exist in the new
        vocabulary), ``dropped`` (old markers missing) or ``none``.
    """
    new_t = getattr(new_tok, "chat_template", None)
    if new_t:
        return new_t, "new", []
    old_t = getattr(old_tok, "chat_template", None)
    if not old_t or not isinstance(old_t, str):
        return None, "none", []
    markers = template_markers(old_tok, old_t)
    missing = [m for m in markers if not _has_token(new_tok, m)]
    if missing:
        return None, "dropped", missing
    return old_t, "carried", []


def add_chat_markers(old_tok, new_tok) -> list[str]:
    """Add the old chat template's missing markers to ``new_tok`` as special tokens.

    Returns:
        The markers added (their rows are then matched by name to the old ones).
    """
    old_t = getattr(old_tok, "chat_template", None)
    if getattr(new_tok, "chat_template", None) or not isinstance(old_t, str):
        return []
    missing = [m for m in template_markers(old_tok, old_t) if not _has_token(new_tok, m)]
    if missing:
        new_tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing
