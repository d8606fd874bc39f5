"""Save and load a projection as one self-describing safetensors file.

The file holds the CSR arrays and row kinds; its metadata (``__metadata__``) holds
a JSON document with both tokenizers' content hashes, the method and its
parameters, plus a SHA-256 of the arrays themselves. A JSON copy of the
metadata is written beside it for people (``FILE.json``). Loading checks the file
is complete, the arrays match their hash and shape, the tokenizer hashes (and,
when the caller names them, the parameters) match the ones at hand, and refuses
anything else with one clear error: a saved alignment is never used silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.errors import AlignmentMismatchError, SurgeryError
from surgery.files import check_safetensors_complete
from surgery.vocab.projection import Projection, ProjectionConfig
from surgery.vocab.surfaces import Vocabulary

FORMAT = "tokensurgery-alignment/1"
_ARRAYS = ("indptr", "indices", "data", "kind")
_HINT = "rebuild it with `surgery align A B --out FILE` for these tokenizers"


def _arrays_hash(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in _ARRAYS:
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_alignment_path(path: str | Path, overwrite: bool) -> Path:
    """``path`` as a :class:`Path` if an alignment may be written there (by :func:`save_alignment`): neither it nor
    its ``.json`` metadata file exists unless ``overwrite``, and it is not a folder.

    Raises:
        SurgeryError: one of those.
    """
    path = Path(path)
    for p in (path, Path(str(path) + ".json")):  # the metadata sidecar is an output too
        if p.exists() and not overwrite:
            raise SurgeryError(f"output {str(p)!r} already exists", "pass --overwrite to replace it")
    if path.is_dir():
        raise SurgeryError(f"output {str(path)!r} is a folder", "pass a file path, e.g. w.safetensors")
    return path


def save_alignment(P: Projection, path: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``P`` to ``path`` (atomically) plus ``path + '.json'`` metadata.

    Raises:
        SurgeryError: ``path`` may not be written (:func:`check_alignment_path`).
    """
    path = check_alignment_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    m = P.matrix.tocsr()
    arrays = {"indptr": m.indptr.astype(np.int64), "indices": m.indices.astype(np.int64),
              "data": m.data.astype(np.float32), "kind": P.kind.astype(np.int8)}
    meta = {"format": FORMAT, **P.metadata(), "seconds": round(P.seconds, 3), "arrays_sha256": _arrays_hash(arrays),
            **(extra or {})}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata={"alignment": json.dumps(meta, sort_keys=True)})
        os.chmod(tmp, 0o666 & ~umask)  # an ordinary file under the user's umask, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_alignment_metadata(path: str | Path) -> dict:
    """The metadata of a saved alignment, after checking the file is a complete alignment file.

    Raises:
        SurgeryError: missing, a folder, unreadable, truncated or of another format.
    """
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"alignment file {str(path)!r} does not exist", "create it with `surgery align A B --out FILE`")
    if path.is_dir():
        raise SurgeryError(f"alignment path {str(path)!r} is a folder",
                           "pass the .safetensors file written by `surgery align`")
    try:
        check_safetensors_complete(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["alignment"])
    except Exception as e:
        raise SurgeryError(f"{str(path)!r} is not a readable alignment file ({type(e).__name__}: {e})",
                           "re-create it with `surgery align`") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise SurgeryError(f"{str(path)!r} has format {fmt!r}, expected {FORMAT!r}",
                           "re-create it with `surgery align`")
    return meta


def load_alignment(path: str | Path, va: Vocabulary, vb: Vocabulary,
                   config: ProjectionConfig | None = None) -> Projection:
    """Load a saved projection and check it belongs to ``va`` × ``vb`` (and ``config`` when given).

    Raises:
        AlignmentMismatchError: a tokenizer hash or a parameter differs from the saved one.
        SurgeryError: the file is missing, truncated, corrupt (arrays do not match their hash or shape).
    """
    meta = read_alignment_metadata(path)
    wrong = []
    if meta.get("hash_a") != va.hash:
        wrong.append(f"tokenizer A ({va.name or 'given'}) differs from the one it was built for")
    if meta.get("hash_b") != vb.hash:
        wrong.append(f"tokenizer B ({vb.name or 'given'}) differs from the one it was built for")
    if config is not None:
        saved = meta.get("config") or {}
        for k, v in asdict(config).items():
            if saved.get(k) != v:
                wrong.append(f"parameter {k} is {saved.get(k)!r} in the file, {v!r} asked for")
    if wrong:
        raise AlignmentMismatchError(f"alignment {str(path)!r} does not match: " + "; ".join(wrong), _HINT)
    bad = f"alignment file {str(path)!r} is corrupt"
    try:
        with safe_open(str(path), framework="pt") as f:
            t = {k: f.get_tensor(k).numpy() for k in f.keys()}
        shape = tuple(int(x) for x in meta["shape"])
        cfg = ProjectionConfig(**meta["config"])
    except Exception as e:
        raise SurgeryError(f"{bad} ({type(e).__name__}: {e})", _HINT) from e
    missing = [k for k in _ARRAYS if k not in t]
    if missing:
        raise SurgeryError(f"{bad} (no {', '.join(missing)} array)", _HINT)
    if "arrays_sha256" in meta and _arrays_hash(t) != meta["arrays_sha256"]:
        raise SurgeryError(f"{bad}: its arrays do not match the hash recorded when it was saved", _HINT)
    if len(shape) != 2 or shape != (len(va), len(vb)) or t["indptr"].shape != (shape[0] + 1,) \
            or t["kind"].shape != (shape[0],) or t["indices"].shape != t["data"].shape:
        raise SurgeryError(f"{bad}: arrays of shape {shape} do not fit {len(va)} x {len(vb)} tokens", _HINT)
    try:
        m = sp.csr_matrix((t["data"], t["indices"], t["indptr"]), shape=shape)
        m.check_format(full_check=True)
    except ValueError as e:
        raise SurgeryError(f"{bad} ({e})", _HINT) from e
    return Projection(m, t["kind"], meta["hash_a"], meta["hash_b"], cfg, float(meta.get("seconds", 0.0)))
