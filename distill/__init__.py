"""Cross-tokenizer distillation: chunk alignment, X-Token losses (pkl, hkl) and baselines, teachers, trainer.

Entry point: ``surgery distill --config recipes/distill_*.yaml`` (same under ``torchrun``).
"""
