"""Tensor bytes copied file to file: the kernel path and the read/write fallback give the same bytes."""

import os

import pytest

from surgery.byte_copy import SourceBytes, copy_bytes, write_all
from surgery.errors import SurgeryError


def _copy(tmp_path, src, name):
    out = tmp_path / name
    with open(out, "wb", buffering=0) as f:
        write_all(f.fileno(), b"HEAD")
        copy_bytes(src, f.fileno())
        write_all(f.fileno(), b"TAIL")
    return out.read_bytes()


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_bytes_copies_exactly_the_range(tmp_path, monkeypatch, kernel):
    data = os.urandom(3 * 1024**2 + 17)
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    src = SourceBytes(path, 12345, 2 * 1024**2 + 3, "t")
    assert _copy(tmp_path, src, f"out{kernel}") == b"HEAD" + data[12345:12345 + src.nbytes] + b"TAIL"


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_bytes_from_a_truncated_file_is_one_clear_error(tmp_path, monkeypatch, kernel):
    path = tmp_path / "src.bin"
    path.write_bytes(b"x" * 1000)
    if not kernel:
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    with pytest.raises(SurgeryError, match="truncated.*'layer.w'"):
        _copy(tmp_path, SourceBytes(path, 900, 200, "layer.w"), "out")


def test_reader_source_refuses_a_tensor_not_checked(tmp_path):
    import torch
    from safetensors.torch import save_file

    from surgery.checkpoint import CheckpointReader

    save_file({"a": torch.ones(4), "b": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    r = CheckpointReader(tmp_path)
    with pytest.raises(SurgeryError, match="unchecked"):
        r.source("a")
    r.get("a")
    src = r.source("a")
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert raw[src.offset:src.offset + src.nbytes] == torch.ones(4).numpy().tobytes()
