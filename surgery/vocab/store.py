"""Save and load a projection as one self-describing safetensors file.

The file holds the CSR arrays and row kinds; its metadata (``__metadata__``) holds
a JSON document with both tokenizers' content hashes, the method and its
parameters. A JSON copy of the metadata is written beside it for people
(``FILE.json``). Loading checks the hashes against the tokenizers at hand and
refuses a mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.errors import AlignmentMismatchError, SurgeryError
from surgery.vocab.projection import Projection, ProjectionConfig
from surgery.vocab.surfaces import Vocabulary

FORMAT = "tokensurgery-alignment/1"


def save_alignment(P: Projection, path: str | Path, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``P`` to ``path`` (atomically) plus ``path + '.json'`` metadata.

    Raises:
        SurgeryError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise SurgeryError(f"output {str(path)!r} already exists", "pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    m = P.matrix.tocsr()
    meta = {"format": FORMAT, **P.metadata(), "seconds": round(P.seconds, 3), **(extra or {})}
    tensors = {
        "indptr": torch.from_numpy(m.indptr.astype(np.int64)),
        "indices": torch.from_numpy(m.indices.astype(np.int64)),
        "data": torch.from_numpy(m.data.astype(np.float32)),
        "kind": torch.from_numpy(P.kind.astype(np.int8)),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"alignment": json.dumps(meta, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_alignment_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise SurgeryError(f"alignment file {str(path)!r} does not exist", "create it with `surgery align A B --out FILE`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["alignment"])
    except Exception as e:
        raise SurgeryError(f"{str(path)!r} is not a readable alignment file ({type(e).__name__})",
                           "re-create it with `surgery align`") from e
    if meta.get("format") != FORMAT:
        raise SurgeryError(f"{str(path)!r} has format {meta.get('format')!r}, expected {FORMAT!r}", "re-create it")
    return meta


def load_alignment(path: str | Path, va: Vocabulary, vb: Vocabulary) -> Projection:
    """Load a saved projection and check it belongs to ``va`` × ``vb``.

    Raises:
        AlignmentMismatchError: a tokenizer hash differs from the saved one.
    """
    meta = read_alignment_metadata(path)
    wrong = []
    if meta["hash_a"] != va.hash:
        wrong.append(f"tokenizer A ({va.name or 'given'}) differs from the one it was built for")
    if meta["hash_b"] != vb.hash:
        wrong.append(f"tokenizer B ({vb.name or 'given'}) differs from the one it was built for")
    if wrong:
        raise AlignmentMismatchError(f"alignment {str(path)!r} does not match: " + "; ".join(wrong),
                                     "rebuild it with `surgery align A B --out FILE` for these tokenizers")
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k).numpy() for k in f.keys()}
    shape = tuple(meta["shape"])
    m = sp.csr_matrix((t["data"], t["indices"], t["indptr"]), shape=shape)
    cfg = ProjectionConfig(**meta["config"])
    return Projection(m, t["kind"], meta["hash_a"], meta["hash_b"], cfg, float(meta.get("seconds", 0.0)))
