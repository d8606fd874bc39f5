"""Smoke tests of the transplant recipe and benchmark scripts (argument parsing and imports only;
the full runs load the real models and take minutes: `make demo`, `benchmarks/transplant.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("script", ["recipes/demo.py", "benchmarks/transplant.py"])
def test_script_help(script):
    r = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_demo_header_names_the_exact_command():
    head = (ROOT / "recipes" / "demo.py").read_text().split('"""')[1]
    assert "make demo" in head and ".venv/bin/python recipes/demo.py" in head
