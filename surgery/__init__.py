"""Cross-tokenizer model surgery: vocabulary alignment, transplantation, distillation, byte-level LMs."""

__version__ = "0.1.0"
