"""Hugging Face checkpoint folders: validate, stream tensors, write atomically.

Writing follows the HF layout: ``model-XXXXX-of-YYYYY.safetensors`` shards with
``model.safetensors.index.json`` (always written, even for one shard), ``config.json``,
``generation_config.json``, tokenizer files and chat template. Everything is
written into a temporary sibling folder and renamed into place at the end, so an
interrupted or failed write leaves nothing behind; an existing output is only
replaced with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def _check_safetensors_file(path: Path) -> None:
    """Check a safetensors file's header and that its data section is complete."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"data section needs {8 + n + end} bytes, file has {size}")
    except (ValueError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise SurgeryError(
            f"weights file {str(path)!r} is corrupt or truncated ({e})",
            "re-download or re-create the checkpoint",
        ) from e


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, via the index when there is one."""
    idx = folder / INDEX_NAME
    if idx.exists():
        try:
            index = json.loads(idx.read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise SurgeryError(f"{str(idx)!r} is not a valid safetensors index", "re-create the checkpoint") from e
        files = [folder / n for n in names]
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise SurgeryError(f"checkpoint {str(folder)!r} lacks shards named in its index: {', '.join(missing)}",
                               "copy the missing shard files into the folder")
        return files
    single = folder / "model.safetensors"
    return [single] if single.exists() else sorted(folder.glob("*.safetensors"))


def validate_model_folder(folder: str | Path) -> None:
    """Check that a folder looks like a loadable HF causal-LM checkpoint.

    Raises:
        SurgeryError: missing folder, no config.json, no weights, or a corrupt shard.
    """
    folder = Path(folder)
    if not folder.exists():
        raise SurgeryError(f"model folder {str(folder)!r} does not exist", "check the path")
    if not folder.is_dir():
        raise SurgeryError(f"model path {str(folder)!r} is not a folder", "pass the checkpoint folder, not a file")
    if not (folder / "config.json").exists():
        raise SurgeryError(f"folder {str(folder)!r} has no config.json", "pass a Hugging Face model folder")
    files = weight_files(folder)
    if not files:
        legacy = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = ("convert the pickle weights to safetensors (pickles are not loaded)" if legacy
                else "the folder holds a config but no *.safetensors weights; point at the full checkpoint")
        raise SurgeryError(f"folder {str(folder)!r} holds no safetensors weights", hint)
    for f in files:
        _check_safetensors_file(f)


def iter_tensors(folder: str | Path, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` pairs of a checkpoint one at a time, shard by shard."""
    folder = Path(folder)
    validate_model_folder(folder)
    for f in weight_files(folder):
        with safe_open(str(f), framework="pt", device=device) as sf:
            for k in sf.keys():
                yield k, sf.get_tensor(k)


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block succeeds.

    Raises:
        SurgeryError: ``out`` exists and ``overwrite`` is False (checked before any work).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise SurgeryError(f"output {str(out)!r} already exists", "pass --overwrite to replace it, or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Fail early, before expensive work, when an output exists and may not be replaced."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise SurgeryError(f"output {str(out)!r} already exists", "pass --overwrite to replace it, or choose another path")


def _unique_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates; each tensor contiguous and owning its storage."""
    sd = model.state_dict()
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    tied = set()
    for k in getattr(model, "all_tied_weights_keys", None) or {}:
        tied.add(k)
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen and k in tied | {"lm_head.weight"}:
            continue  # tied to an earlier tensor (e.g. lm_head ↔ embed_tokens): HF re-ties on load
        if ptr is not None:
            seen.setdefault(ptr, k)
        out[k] = v.detach().to("cpu").contiguous().clone()
    return out


def write_safetensors_shards(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Write tensors into HF-named shards plus ``model.safetensors.index.json``.

    Returns:
        The index dict written.
    """
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in state:  # keep model order
        nbytes = state[k].numel() * state[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = state[k]
        size += nbytes
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


def save_checkpoint(
    model,
    tokenizer,
    out: str | Path,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: dict[str, str | bytes] | None = None,
) -> Path:
    """Write ``model`` + ``tokenizer`` as a HF folder, atomically.

    Weights first (sharded safetensors + index), then config, generation config,
    tokenizer files (with chat template) and any ``extra_files`` (name → content).

    Returns:
        The final output folder.
    """
    out = Path(out)
    with atomic_output_dir(out, overwrite) as tmp:
        state = _unique_state_dict(model)
        for k, v in state.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise SurgeryError(f"tensor {k!r} holds NaN or inf values; refusing to write a broken checkpoint",
                                   "check the inputs of the step that produced it (learning rate, data)")
        write_safetensors_shards(state, tmp, max_shard_bytes)
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except Exception as e:  # an invalid generation config must not block the weights
                LOG.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    LOG.info("wrote checkpoint to %s", out)
    return out.resolve()
