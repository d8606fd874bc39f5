"""Tokenizer transplantation: give a trained model a new vocabulary, then heal it.

Public API:

- :func:`transplant` (in memory) and :func:`transplant_checkpoint` (folder → folder);
- :class:`TransplantConfig`, :class:`HealConfig`;
- :data:`METHODS` (``tokenadapt``, ``tokenadapt-published``, ``omp``, ``mean``, ``random``);
- the rows file heal reads (``transplant_rows.json``); healing itself is
  :func:`distill.trainer.heal_run.heal`, run by ``surgery heal``.
"""

from surgery.transplant.config import HealConfig, TransplantConfig
from surgery.transplant.methods import METHODS, register_method
from surgery.transplant.transplant import TransplantReport, transplant, transplant_checkpoint

__all__ = ["METHODS", "HealConfig", "TransplantConfig", "TransplantReport", "register_method", "transplant",
           "transplant_checkpoint"]
