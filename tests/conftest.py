"""Pytest fixtures shared by all tests; plain helpers live in tests/helpers.py."""

from __future__ import annotations

import pytest

from helpers import TEXTS  # noqa: F401  (tests/ is on pythonpath, see pyproject)


@pytest.fixture
def text_en() -> str:
    p = TEXTS / "debian-reference.en.heldout.txt"
    if not p.exists():
        pytest.skip("shipped texts missing")
    return p.read_text()
