"""Designing the new tokenizer of a transplant: superword BPE training and a tokenizer report.

- :mod:`surgery.tokenizer_design.supertokens`: train ``superbpe`` (two-stage curriculum),
  ``chunks`` (TokenAdapt's random-chunk Supertokens) or a standard ``bpe`` control with the
  ``tokenizers`` library and save them as Hugging Face tokenizer folders.
- :mod:`surgery.tokenizer_design.report`: compression, token premiums, vocabulary overlap,
  number segmentation and segmentation ambiguity of any set of tokenizers on any texts.

(Named ``tokenizer_design`` rather than ``tokenizers`` so that it never shadows the library.)
"""
