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
import glob
import json
import logging
import math
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.byte_copy import SourceBytes
from surgery.errors import SurgeryError
from surgery.files import check_safetensors_complete, pid_alive

LOG = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"


def _check_safetensors_file(path: Path) -> None:
    """Check a safetensors file's header and that its data section is complete."""
    try:
        check_safetensors_complete(path)
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

    The folder gets the permissions of an ordinary ``mkdir`` under the user's umask (0755 under
    umask 022), not the 0700 of a private temporary folder. Its name, ``.OUT.tmp-<pid>-<random>``,
    carries the writer's process id: folders of an interrupted earlier write to the same output
    (their process is gone) are reported and removed first, and a ``.OUT.old-<pid>`` left between
    the two renames of an interrupted replacement is put back when ``out`` itself is missing.

    Raises:
        SurgeryError: ``out`` exists and ``overwrite`` is False (checked before any work).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise SurgeryError(f"output {str(out)!r} already exists", "pass --overwrite to replace it, or choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)

    for kind in ("old", "tmp"):  # stale leftovers of interrupted writes: restore the old output first
        for stale in sorted(out.parent.glob(f".{glob.escape(out.name)}.{kind}-*")):
            m = re.fullmatch(rf"\.{re.escape(out.name)}\.{kind}-(\d+)(?:-.*)?", stale.name)
            if m and pid_alive(int(m.group(1))):
                continue  # another process is writing this output right now
            if kind == "old" and not out.exists():
                LOG.warning("restoring %s: an interrupted replacement left the previous output there", stale)
                os.replace(stale, out)
                continue
            LOG.warning("removing %s, left by an interrupted write to %s", stale, out)
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
    if out.exists() and not overwrite:  # a restored output
        raise SurgeryError(f"output {str(out)!r} already exists",
                           "pass --overwrite to replace it, or choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        for dirpath, _, filenames in os.walk(tmp):  # some writers (safetensors) create 0600 files
            for name in filenames:
                f = os.path.join(dirpath, name)
                if not os.path.islink(f):
                    os.chmod(f, (0o777 if os.stat(f).st_mode & 0o111 else 0o666) & ~umask)
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


def check_output_free(out: str | Path, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """Fail early, before expensive work, when an output may not be written.

    Args:
        out: the output path.
        overwrite: whether an existing ``out`` may be replaced.
        inputs: the command's inputs (:func:`check_not_an_input`).

    Raises:
        SurgeryError: ``out`` exists without ``overwrite``, or overlaps an input.
    """
    out = Path(out).expanduser()
    check_not_an_input(out, inputs)
    if out.exists() and not overwrite:
        raise SurgeryError(f"output {str(out)!r} already exists", "pass --overwrite to replace it, or choose another path")


def check_not_an_input(out: str | Path, inputs, hint: str = "write the output to a new path; inputs are never "
                       "replaced") -> None:
    """Refuse an output path that is one of ``inputs``, lies inside one, or contains one, even with ``--overwrite``
    (replacing the output would delete the input; writing inside it would change it).

    Args:
        out: the output path.
        inputs: local paths or shipped asset names of models, tokenizers, texts (an asset name stands for its folder;
            None, hub ids and paths that do not exist are skipped).
        hint: the way out shown with the error.

    Raises:
        SurgeryError: ``out`` overlaps an input.
    """
    from surgery.assets import resolve

    target = Path(out).expanduser().resolve()
    for inp in inputs:
        if inp is None:
            continue
        p = Path(resolve(str(inp))).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if target == p or p in target.parents or target in p.parents:
            raise SurgeryError(f"output {str(out)!r} overlaps the input {str(inp)!r}", hint)


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


def save_generation_config(gen, folder: Path) -> None:
    """Write ``generation_config.json`` into ``folder`` when there is one; an invalid one only logs a warning
    (it must not block the weights)."""
    if gen is None:
        return
    try:
        gen.save_pretrained(folder)
    except Exception as e:
        LOG.warning("generation config not saved: %s", e)


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
        save_generation_config(getattr(model, "generation_config", None), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)
    LOG.info("wrote checkpoint to %s", out)
    return out.resolve()


# --------------------------------------------------------------------------- streaming
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _ST_DTYPES["F8_E4M3" if "e4m3" in _name else "F8_E5M2"] = getattr(torch, _name)
ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}  # torch dtype -> safetensors dtype name


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise when a floating-point tensor holds NaN or inf values.

    Raises:
        SurgeryError: one line naming the tensor.
    """
    if not tensor.is_floating_point() or not tensor.numel():
        return
    try:  # one pass without temporaries (NaN propagates through min/max): ~20x faster than isfinite().all()
        lo, hi = torch.aminmax(tensor.reshape(-1))
        ok = bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8)
        ok = bool(torch.isfinite(tensor.float()).all())
    if not ok:
        raise SurgeryError(f"tensor {name!r} holds NaN or inf values; the checkpoint is broken",
                           "re-download or re-create the checkpoint (nothing was written)")


def _read_header(path: Path) -> tuple[dict, int]:
    """``(header, data_start)`` of a safetensors file (after :func:`_check_safetensors_file`)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint folder (one file or sharded with an index).

    Only headers are read on construction; every check that can fail (corrupt or truncated shards,
    tensors named in the index but absent from their shard, dtypes) fails here, before any work.
    Tensors come back one at a time and are checked for NaN/inf as they are read.

    Attributes:
        keys: tensor names in storage order (shard by shard, by offset).
        checked: names of the tensors read and found finite so far (:meth:`source` may copy them as bytes).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        validate_model_folder(self.folder)
        self._where: dict[str, tuple[Path, int, int, str, list[int]]] = {}
        self.keys: list[str] = []
        self.checked: set[str] = set()
        files = weight_files(self.folder)
        for f in files:
            header, start = _read_header(f)
            entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                             key=lambda kv: kv[1]["data_offsets"][0])
            for k, v in entries:
                if v["dtype"] not in _ST_DTYPES:
                    raise SurgeryError(f"tensor {k!r} in {f.name} has dtype {v['dtype']}, not supported here",
                                       "convert the checkpoint to bf16/fp16/fp32 safetensors")
                a, b = (int(x) for x in v["data_offsets"])
                self._where[k] = (f, start + a, b - a, v["dtype"], list(v["shape"]))
                self.keys.append(k)
        idx = self.folder / INDEX_NAME
        if idx.exists():
            for k, fname in json.loads(idx.read_text())["weight_map"].items():
                got = self._where.get(k)
                if got is None or got[0].name != fname:
                    raise SurgeryError(f"tensor {k!r} is named in {INDEX_NAME} (shard {fname}) but that shard "
                                       "does not hold it", "re-download or re-create the checkpoint")

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return list(self._where[key][4])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._where[key][3]]

    def nbytes(self, key: str) -> int:
        return self._where[key][2]

    def shard(self, key: str) -> str:
        return self._where[key][0].name

    def get(self, key: str, check: bool = True, mapped: bool = False) -> torch.Tensor:
        """Read one tensor (in its stored dtype, CPU), checked for NaN/inf.

        Args:
            mapped: map the stored bytes (a private copy-on-write ``mmap`` of the file) instead of
                reading them into fresh memory: no copy and no zero-filled pages, the tensor reads the
                page cache itself (an 8B body streamed through a calibration forward: 16 GB neither
                copied nor allocated). For tensors that are used and dropped; writes stay private.
                The file's size is checked right before mapping; a file truncated while the tensor
                is alive would fault on access, so long-lived tensors are read (the default).

        Raises:
            SurgeryError: unknown name, short read or non-finite values.
        """
        if key not in self._where:
            raise SurgeryError(f"checkpoint {str(self.folder)!r} has no tensor {key!r}", "check the checkpoint")
        path, off, n, dt, shape = self._where[key]
        truncated = SurgeryError(f"weights file {str(path)!r} is truncated (tensor {key!r})",
                                 "re-download or re-create the checkpoint")
        with open(path, "rb") as f:
            if mapped and n:
                if os.fstat(f.fileno()).st_size < off + n:
                    raise truncated
                start = off - off % mmap.ALLOCATIONGRANULARITY
                view = mmap.mmap(f.fileno(), off + n - start, access=mmap.ACCESS_COPY, offset=start)
                buf = torch.frombuffer(view, dtype=torch.uint8, count=n, offset=off - start)  # keeps the map alive
            else:
                buf = torch.empty(n, dtype=torch.uint8)  # not zero-filled (a bytearray would write every page again)
                f.seek(off)
                if n and f.readinto(buf.numpy()) != n:
                    raise truncated
        t = buf.view(_ST_DTYPES[dt]).reshape(shape)
        if check:
            check_finite(key, t)
            self.checked.add(key)
        return t

    def source(self, key: str, checked: bool = True) -> SourceBytes:
        """Where ``key``'s stored bytes are, for :func:`surgery.shards.write_shard` to copy them unread.

        Args:
            checked: require that :meth:`get` read and checked ``key`` first (``False``: the caller
                checks it before its output counts).

        Raises:
            SurgeryError: ``key`` was not read and checked first.
        """
        if checked and key not in self.checked:
            raise SurgeryError(f"tensor {key!r} would be copied unchecked", "this is a bug; please report it")
        path, off, n, _, _ = self._where[key]
        return SourceBytes(path, off, n, key)
