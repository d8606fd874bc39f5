"""Byte-level conversion of token LMs, and ensembles of models with different vocabularies.

- :mod:`surgery.bytelevel.bytelm`: :class:`ByteLM`, definitions of ``exact`` and ``canonical`` modes;
- :mod:`surgery.bytelevel.cover`: token prefix index and the covering tree;
- :mod:`surgery.bytelevel.validity`: pre-token pieces and pairwise validity;
- :mod:`surgery.bytelevel.treeattn`: tree attention and the shared KV cache;
- :mod:`surgery.bytelevel.scoring`: scoring a text on its canonical tokenization;
- :mod:`surgery.bytelevel.ensemble`: byte-level and token-level ensembles;
- :mod:`surgery.bytelevel.fim`: prompts that end inside a token (naive, token healing, byte level).
"""

from surgery.bytelevel.bytelm import ByteLM
from surgery.bytelevel.ensemble import ENSEMBLE_MODES, ByteEnsemble, TokenEnsemble

__all__ = ["ByteLM", "ByteEnsemble", "TokenEnsemble", "ENSEMBLE_MODES"]
