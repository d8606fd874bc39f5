"""Token identity: which id a tokenizer emits for a surface, and which ids it never emits.

Several ids of one vocabulary can share a canonical surface. The common case is
SentencePiece byte fallback (Kudo & Richardson, 2018, arXiv 1808.06226; Gemma,
Mistral, Llama-2): ``<0x2C>`` and ``,`` both decode to ``b","``, but byte fallback
only spells characters that no piece covers, so the tokenizer emits ``,`` and never
``<0x2C>`` for that byte. A model trained on the tokenizer's output has seen the
never-emitted twin rarely or never, so its rows are no stand-in for the emitted one.

The emitted id of a duplicated surface is found by asking the tokenizer: the
surface is encoded as it would be in the middle of a text
(:meth:`~surgery.vocab.surfaces.Vocabulary.encode_text_many`, one batch for all
groups); when that yields exactly one id of the group, that id is the emitted one
and the others are never emitted. Groups the tokenizer does not resolve that way
(their bytes encode to several pieces, or are not valid UTF-8) keep every id as
emitted and map the surface to the lowest id. Only duplicated surfaces are encoded,
so this costs milliseconds on a 262k vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TokenIdentity:
    """Emitted ids of one vocabulary.

    Attributes:
        is_emitted: ``(V,)`` bool; False exactly for ids that share their surface with another
            id and that the tokenizer never produces for those bytes. Special tokens and ids
            without a surface are True.
        emitted_id: ``(V,)`` int64; for each id, the id the tokenizer emits for its surface
            (itself for emitted ids and for ids without a surface).
        surface_to_id: surface → the emitted id with that surface.
        groups: ids sharing a surface (ascending ids, groups ordered by their lowest id).
        unresolved: the groups whose emitted id the tokenizer did not decide (all kept emitted).
    """

    is_emitted: np.ndarray
    emitted_id: np.ndarray
    surface_to_id: dict
    groups: tuple
    unresolved: tuple

    @property
    def never_emitted(self) -> np.ndarray:
        """Sorted int64 ids that are never emitted."""
        return np.flatnonzero(~self.is_emitted).astype(np.int64)


def surface_groups(surfaces) -> tuple[dict[bytes, int], list[tuple[bytes, tuple[int, ...]]]]:
    """Lowest id per surface, and the surfaces carried by more than one id.

    Args:
        surfaces: canonical bytes per id (``None`` for special or undefined ids).

    Returns:
        ``(first, duplicates)``: surface → lowest id, and ``(surface, ids)`` for every
        surface with two or more ids.
    """
    first: dict[bytes, int] = {}
    extra: dict[bytes, list[int]] = {}
    for i, s in enumerate(surfaces):
        if s is None:
            continue
        j = first.setdefault(s, i)
        if j != i:
            extra.setdefault(s, [j]).append(i)
    dups = sorted(((s, tuple(ids)) for s, ids in extra.items()), key=lambda x: x[1][0])
    return first, dups


def token_identity(vocab) -> TokenIdentity:
    """Decide the emitted id of every duplicated surface of ``vocab`` (see module docstring).

    Args:
        vocab: a :class:`~surgery.vocab.surfaces.Vocabulary`.

    Returns:
        Its :class:`TokenIdentity`.
    """
    V = len(vocab)
    first, dups = surface_groups(vocab.surfaces)
    is_emitted = np.ones(V, dtype=bool)
    emitted_id = np.arange(V, dtype=np.int64)
    texts, which = [], []
    for k, (s, _) in enumerate(dups):
        try:
            texts.append(s.decode("utf-8"))
            which.append(k)
        except UnicodeDecodeError:  # no text encodes to these bytes alone
            pass
    encoded = dict(zip(which, vocab.encode_text_many(texts)))
    unresolved = []
    for k, (s, ids) in enumerate(dups):
        enc = encoded.get(k)
        if enc is not None and len(enc) == 1 and enc[0] in ids:
            winner = int(enc[0])
            others = [i for i in ids if i != winner]
            is_emitted[others] = False
            emitted_id[others] = winner
            first[s] = winner
        else:
            unresolved.append(ids)
    if unresolved:
        LOG.info("%s: %d duplicated surfaces the tokenizer does not resolve; all their ids stay emitted",
                 vocab.name, len(unresolved))
    return TokenIdentity(is_emitted, emitted_id, first, tuple(ids for _, ids in dups), tuple(unresolved))
