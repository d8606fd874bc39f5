"""Sizes read without loading: a checkpoint's weights at a dtype, a device's free memory."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_llama
from surgery.memory import free_memory, module_nbytes, weights_nbytes


@pytest.fixture
def tiny_model_folder(tmp_path):
    """A tiny untied Llama saved in bfloat16 (its config.json and model.safetensors)."""
    tiny_llama(300, tie=False).to(torch.bfloat16).save_pretrained(str(tmp_path))
    return tmp_path


def test_weights_nbytes_is_the_loaded_tensors_size(tiny_model_folder):
    """Against a slow reference: every tensor of the safetensors files loaded, at its own dtype or cast."""
    from safetensors.torch import load_file

    tensors = {k: v for f in sorted(tiny_model_folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    for dtype in (None, torch.bfloat16, torch.float32):
        want = sum(t.numel() * (t.to(dtype) if dtype is not None and t.is_floating_point() else t).element_size()
                   for t in tensors.values())
        assert weights_nbytes(str(tiny_model_folder), dtype) == want


def test_weights_nbytes_of_what_is_not_a_local_folder_is_unknown(tmp_path):
    assert weights_nbytes("some-org/some-model-on-the-hub") is None
    assert weights_nbytes(tmp_path / "missing") is None


def test_free_memory_and_module_nbytes():
    free = free_memory("cpu")
    assert free is None or free > 0
    m = torch.nn.Linear(3, 4)
    assert module_nbytes(m) == (12 + 4) * 4 and module_nbytes(m, "cpu") == 0
