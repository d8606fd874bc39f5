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


def test_universal_assisted_generation_keeps_the_assistant_cache_consistent():
    """A draft that always proposes one token (re-tokenized into no new target token, so every round is rejected)
    leaves rejected tokens in the assistant's cache; with the recipe's fix universal assisted generation runs and
    its greedy output is the target's own, token for token (transformers 5.x without it: `cannot reshape tensor
    of 0 elements`)."""
    import torch

    from helpers import tiny_llama, tokenizer

    recipe = _recipe()
    tok, dtok = tokenizer("gemma3-270m"), tokenizer("smollm2-135m")
    target, draft = tiny_llama(len(tok), seed=0), tiny_llama(len(dtok), seed=2)

    def always(module, inputs, out):  # the draft's argmax is token 216, whatever the context
        out = out.clone()
        out[..., 216] += 1000.0
        return out

    draft.lm_head.register_forward_hook(always)
    for text in ["The capital of France is", "Debian is a free operating system. The package manager"]:
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            base = target.generate(**ids, max_new_tokens=12, do_sample=False)
            with recipe.universal_cache_fix():
                got = target.generate(**ids, max_new_tokens=12, do_sample=False, assistant_model=draft,
                                      tokenizer=tok, assistant_tokenizer=dtok)
        assert torch.equal(got, base)
    from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers as UAG

    assert UAG.get_candidates.__module__.startswith("transformers")  # restored on exit
