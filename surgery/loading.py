"""Resolve a model or tokenizer given as a shipped asset name, a local folder or a hub id.

The shipped assets (``smollm2-135m``, ``llama3-tokenizer``, ...) are named defaults:
:func:`surgery.assets.resolve` maps a name to its folder, every other string is
passed to ``from_pretrained`` unchanged, exactly as transformers would take it.
``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "tokenizer_config.json")


def resolve(name_or_path: str | Path) -> str:
    """Map a shipped asset name to its folder; return anything else unchanged."""
    from surgery import assets

    return assets.resolve(str(name_or_path))


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` (or ``fp32`` / ``bf16`` / ``fp16``) as a torch dtype.

    Raises:
        SurgeryError: any other name.
    """
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[str(name).lower().replace("torch.", "")]
    except KeyError:
        raise SurgeryError(f"unknown dtype {name!r}", "use float32, bfloat16 or float16") from None


def _looks_local(s: str) -> bool:
    return s.startswith((".", "/", "~")) or Path(s).exists() or s.count("/") > 1 or "\\" in s


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """Load a Hugging Face tokenizer (fast) from an asset name, folder or hub id.

    Raises:
        SurgeryError: the folder does not exist, holds no tokenizer files, or loading fails.
    """
    from transformers import AutoTokenizer

    src = resolve(name_or_path)
    p = Path(src).expanduser()
    if p.exists():
        if p.is_file():
            raise SurgeryError(f"tokenizer path {src!r} is a file", "pass the folder that holds tokenizer.json")
        if not any((p / f).exists() for f in TOKENIZER_FILES) and not list(p.glob("*.gguf")):
            raise SurgeryError(
                f"folder {src!r} holds no tokenizer files (tokenizer.json, tokenizer.model, vocab.txt)",
                "pass a Hugging Face tokenizer folder or a hub id",
            )
    elif _looks_local(src):
        raise SurgeryError(f"tokenizer folder {src!r} does not exist", "check the path, or run `surgery assets` for the shipped ones")
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else src, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types here
        raise SurgeryError(
            f"could not load a tokenizer from {src!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "pass a Hugging Face tokenizer folder or hub id (offline: a local folder)",
        ) from e
    if not getattr(tok, "is_fast", False) and not hasattr(tok, "backend_tokenizer"):
        raise SurgeryError(f"tokenizer {src!r} has no fast (Rust) backend", "convert it with transformers to a tokenizer.json")
    return tok


def load_model(
    name_or_path: str | Path,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    tokenizer=None,
):
    """Load a causal LM from an asset name, a local HF folder (sharded or not) or a hub id.

    Local folders are validated first (config present, weights present, safetensors
    headers readable) so that a broken folder gives one clear line; a checkpoint that lacks weights its
    architecture needs (which transformers would initialize at random), a ``tokenizer`` (when given: the one the
    model will read) with more ids than its embedding rows (:func:`check_tokenizer_fits`) and non-finite weights
    are refused.

    Returns:
        The model in eval mode on ``device`` (default CPU).
    """
    from transformers import AutoModelForCausalLM

    from surgery.checkpoint import validate_model_folder

    src = resolve(name_or_path)
    p = Path(src).expanduser()
    if p.exists():
        validate_model_folder(p)
    elif _looks_local(src):
        raise SurgeryError(f"model folder {src!r} does not exist", "check the path, or run `surgery assets` for the shipped models")
    if isinstance(dtype, str) and dtype != "auto":  # auto: the checkpoint's own dtype
        dtype = parse_dtype(dtype)
    try:
        on_gpu = device is not None and torch.device(device).type == "cuda"
        model, info = AutoModelForCausalLM.from_pretrained(  # straight onto a GPU: no CPU copy of a large model
            str(p) if p.exists() else src, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            **({"device_map": str(device)} if on_gpu else {}),
        )
    except SurgeryError:
        raise
    except Exception as e:
        raise SurgeryError(
            f"could not load a causal LM from {src!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
            "pass a Hugging Face causal-LM folder (config.json + safetensors) or a hub id",
        ) from e
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would have initialized them at random: a quietly broken model
        from surgery.transplant.streaming import missing_weights_error

        raise missing_weights_error(src, type(model).__name__, missing)
    if tokenizer is not None:
        check_tokenizer_fits(model.get_input_embeddings().num_embeddings, tokenizer, name_or_path)
    from surgery.checkpoint import check_finite

    for name, t in model.state_dict().items():
        check_finite(name, t)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def check_tokenizer_fits(rows: int, tokenizer, name: str | Path) -> None:
    """Refuse a tokenizer with more ids than model ``name`` has embedding ``rows``: its last ids would index past
    them (an ``IndexError`` deep in the forward pass). More rows than ids is normal (padded vocabularies).

    Raises:
        SurgeryError: naming the model and both sizes.
    """
    if rows < len(tokenizer):
        raise SurgeryError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but the model's embedding has only {rows} rows",
            "use the tokenizer that belongs to this checkpoint (or transplant it with `surgery transplant`)",
        )


def read_config(folder: str | Path, name: str | Path | None = None):
    """The transformers config of checkpoint ``folder`` (``name``: how the user named it, for the message).

    Raises:
        SurgeryError: it cannot be read.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:
        raise SurgeryError(f"could not read the config of {str(name or folder)!r}: {type(e).__name__}",
                           "pass a Hugging Face causal-LM folder (config.json + safetensors)") from e


def check_checkpoint(name_or_path: str | Path, tokenizer=None, trust_remote_code: bool = False) -> None:
    """What can be known of a local checkpoint before its weights load, from its config and safetensors headers
    alone: the folder is whole (:func:`surgery.checkpoint.validate_model_folder`), its config builds a causal LM
    whose every parameter a stored tensor provides, and ``tokenizer`` (when given) has no more ids than that
    model's embedding rows. A run that loads a model later (a heal's teacher, a distillation's models) calls this
    first, so that it refuses before it writes anything. A hub id is not checked (nothing is local yet); neither
    is the architecture of a model with custom code (``trust_remote_code``).

    Raises:
        SurgeryError: a broken folder, a config no causal LM is built from, missing weights, a tokenizer that does
            not fit.
    """
    from surgery.checkpoint import CheckpointReader, validate_model_folder
    from surgery.transplant.streaming import check_weights_stored, model_skeleton

    folder = Path(resolve(name_or_path)).expanduser()
    if not folder.is_dir():
        return
    validate_model_folder(folder)
    if trust_remote_code:
        return
    skeleton = model_skeleton(read_config(folder, name_or_path))
    check_weights_stored(skeleton, CheckpointReader(folder).keys, name_or_path)
    if tokenizer is not None:
        check_tokenizer_fits(skeleton.get_input_embeddings().num_embeddings, tokenizer, name_or_path)


def default_device() -> torch.device:
    """CUDA when there is one, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_folder(name_or_path: str | Path) -> Path:
    """A local folder holding a checkpoint's config, tokenizer, index and shards.

    Local folders (and shipped asset names) are returned as they are. For a hub id, only
    ``config.json``, the generation config, tokenizer files, the safetensors index and the
    shards it names (or ``model.safetensors``) are downloaded, one file at a time, so that
    pickles, ``original/`` folders and other formats in the repository are never fetched.

    Raises:
        SurgeryError: a local path that does not exist, or a hub id that cannot be fetched.
    """
    import json

    src = resolve(name_or_path)
    p = Path(src).expanduser()
    if p.exists():
        return p
    if _looks_local(src):
        raise SurgeryError(f"model folder {src!r} does not exist",
                           "check the path, or run `surgery assets` for the shipped models")
    from huggingface_hub import hf_hub_download

    def get(fname: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(src, fname))
        except Exception as e:  # missing file, offline, gated, unknown repo
            if required:
                raise SurgeryError(f"could not fetch {fname!r} of {src!r}: {type(e).__name__}",
                                   "check the hub id and your connection (or pass a local folder)") from e
            return None

    folder = get("config.json", True).parent
    idx = get("model.safetensors.index.json", False)
    shards = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx else ["model.safetensors"]
    for s in shards:
        get(s, True)
    for f in ("generation_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model", "merges.txt", *TOKENIZER_FILES):
        get(f, False)
    return folder
