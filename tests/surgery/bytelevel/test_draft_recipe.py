"""recipes/draft_model.py on tiny random models: acceptance counting and greedy equality.

A draft identical to the target must have every proposed token accepted; any draft, with the same or another
tokenizer (universal assisted generation), must leave the target's greedy output unchanged.
"""

from __future__ import annotations

import importlib.util

from helpers import ROOT


def _recipe():
    spec = importlib.util.spec_from_file_location("draft_model", ROOT / "recipes" / "draft_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_draft_comparison():
    recipe = _recipe()
    target, tok, drafts = recipe.tiny_setup()
    texts = recipe.prompts(2)
    assert len(texts) == 2 and all(texts)
    rows = recipe.compare(target, tok, drafts, texts[1:], max_new=5)
    base, copy, other = rows
    assert base["identical"] and copy["identical"] and other["identical"]
    assert copy["proposed"] > 0 and copy["accepted"] == copy["proposed"] and copy["acceptance"] == 1.0
    assert other["proposed"] > 0 and 0.0 <= other["acceptance"] <= 1.0
    assert base["new_tokens"] == copy["new_tokens"] == other["new_tokens"]


def test_acceptance_hook_is_removed():
    recipe = _recipe()
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    before = AssistedCandidateGenerator.update_candidate_strategy
    with recipe.count_acceptance():
        assert AssistedCandidateGenerator.update_candidate_strategy is not before
    assert AssistedCandidateGenerator.update_candidate_strategy is before
