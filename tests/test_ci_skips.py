"""Under CI (CI=true) a test that lacks a built asset fails instead of skipping, wherever the cache points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = '''
import pytest
from helpers import asset_dir

def test_needs_an_asset():
    asset_dir("smollm2-135m")

def test_skips_for_an_asset_elsewhere():
    pytest.skip("tekken is not built; run `surgery assets`")

def test_skips_for_another_reason():
    pytest.skip("needs a GPU")
'''


@pytest.mark.parametrize("ci,want", [("true", {"failed": 2, "skipped": 1}), ("false", {"skipped": 3})])
def test_missing_assets_fail_under_ci(tmp_path, ci, want):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = dict(os.environ, CI=ci, SURGERY_CACHE=str(tmp_path / "empty-cache"),
               PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                        "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    last = r.stdout.strip().splitlines()[-1]
    got = {k: int(n) for n, k in (part.split()[:2] for part in last.split(" in ")[0].split(", "))}
    assert got == want, r.stdout[-2000:]
