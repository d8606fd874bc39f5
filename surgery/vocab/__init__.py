"""The vocabulary-alignment core (pure: tokenizers in, arrays and sparse matrices out).

- :mod:`surgery.vocab.surfaces`: token id → canonical bytes, special-token roles.
- :mod:`surgery.vocab.identity`: which id a tokenizer emits for a surface; never-emitted twins
  (byte fallback beside an ordinary piece), exposed as ``Vocabulary.is_emitted`` / ``surface_to_id``.
- :mod:`surgery.vocab.pieces`: token → pieces of another tokenizer (the one decomposition).
- :mod:`surgery.vocab.projection`: sparse projection matrices between two vocabularies.
- :mod:`surgery.vocab.store`: save / load an alignment with both tokenizers' hashes.
- :mod:`surgery.vocab.audit`: coverage report by token category.
"""

from surgery.vocab.surfaces import Vocabulary, canonical_vocabulary, tokenizer_hash

__all__ = ["Vocabulary", "canonical_vocabulary", "tokenizer_hash"]
