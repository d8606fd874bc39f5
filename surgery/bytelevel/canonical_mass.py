"""Where canonical mode's byte-level probability differs from the token-level one.

The token-level evaluation (:func:`surgery.evaluate.bits_per_byte`) scores one encoding of a
text, the tokenizer's. Canonical :class:`~surgery.bytelevel.bytelm.ByteLM` scores every byte
with ``Q(x·b) / N(x)``, where ``Q`` sums the admitted encodings and ``N`` the 257 next-byte
masses. Without renormalization the chain of numerators would telescope: the mass of prefix
``x`` one byte earlier, ``C(x)``, would be the denominator. Canonical mode divides by
``N(x) ≤ C(x)`` instead, so each byte gains ``log C(x) − log N(x)`` nats:

- at the end of a pre-token piece (the next byte opens a new one), every segmentation of the
  finished piece except the tokenizer's loses its mass: the covering tree moves its root to
  the tokenizer's encoding of the piece, and ``C`` is the old numerator divided by the
  probability of those tokens;
- inside a piece, encodings the tokenizer never emits drop out (pairs it would merge,
  byte-fallback spellings of characters the vocabulary has, never-emitted twins).

With ``L`` the token-level log-probability of the tokenizer's encoding up to the last root,
``logprob = Σ gains + L(root) + log Q(text)``, and the token-level figure is ``L`` of the whole
encoding, so the difference is the sum of the gains plus the marginal of the text's last piece.
:func:`renormalization_gains` measures both, byte by byte, with :meth:`ByteLM.next_byte_masses`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from surgery.errors import SurgeryError


@dataclass(frozen=True)
class RenormalizationGains:
    """Byte-level log-probabilities of a text split into the token-level one and the gains.

    Attributes:
        byte_logprobs: ``(n,)`` log P(byte k | bytes before it), canonical mode (nats).
        gains: ``(n,)`` ``log C − log N`` before byte ``k`` (nats, ≥ 0 up to rounding).
        piece_start: ``(n,)`` bool, the covering tree's root moved between prefixes ``k − 1`` and ``k``
            (byte ``k − 1`` finished a pre-token piece), so ``gains[k]`` includes the dropped segmentations.
        token_logprobs: ``(T,)`` log-probabilities of the tokenizer's tokens of the text (one window).
        last_piece: ``log Q(text) + L(root) − Σ token_logprobs``, the marginal over the encodings of the
            text's last piece (nats).
    """

    byte_logprobs: np.ndarray
    gains: np.ndarray
    piece_start: np.ndarray
    token_logprobs: np.ndarray
    last_piece: float

    @property
    def gap(self) -> float:
        """Byte-level minus token-level log-probability (nats) = ``gains.sum() + last_piece``."""
        return float(self.byte_logprobs.sum() - self.token_logprobs.sum())


def renormalization_gains(blm, data: bytes, progress: bool = False) -> RenormalizationGains:
    """Measure canonical renormalization byte by byte (see module docstring).

    One :meth:`~surgery.bytelevel.bytelm.ByteLM.next_byte_masses` call per byte (no windows:
    the text must fit the model's context) and one forward pass over the tokenizer's encoding.

    Args:
        blm: a :class:`~surgery.bytelevel.bytelm.ByteLM`.
        data: the text's bytes.

    Raises:
        SurgeryError: the encoding is longer than the model's context.
    """
    from surgery.evaluate import token_nll

    data = bytes(data)
    z = blm.stream(data)
    trunk = blm.canon.encode(z)
    ids = [blm.start_id] + trunk
    if blm.max_positions and len(ids) > blm.max_positions:
        raise SurgeryError(f"the text has {len(trunk)} tokens, more than the model's context",
                           "measure a shorter text")
    nll, _ = token_nll(blm.model, ids, max_length=len(ids), stride=max(1, len(ids) - 1), progress=False)
    token_lp = -nll.numpy()
    cum = np.concatenate([[0.0], np.cumsum(token_lp)])  # log p(first i tokens)
    n = len(data)
    byte_lp, gains = np.zeros(n), np.zeros(n)
    piece_start = np.zeros(n, dtype=bool)
    prev_q, prev_root = 0.0, 0  # log C of the empty prefix relative to the empty root
    for k in tqdm(range(n), desc="renormalization", disable=not progress, leave=False):
        log_q, log_n, root = blm.next_byte_masses(data[:k])
        if root != trunk[:len(root)]:
            raise SurgeryError("the covering tree's root is not a prefix of the text's tokenization",
                               "report this text: canonical mode assumes pieces before the last never change")
        piece_start[k] = len(root) != prev_root
        log_c = prev_q - (cum[len(root)] - cum[prev_root])
        gains[k] = log_c - log_n
        byte_lp[k] = log_q[data[k]] - log_n
        prev_q, prev_root = float(log_q[data[k]]), len(root)
    last = prev_q + cum[prev_root] - cum[-1]
    if not math.isfinite(last):
        raise SurgeryError("the text has no admitted encoding", "use a text the tokenizer can encode")
    return RenormalizationGains(byte_lp, gains, piece_start, token_lp, float(last))
