"""benchmarks/gpu_check.py keeps working: its CPU quick mode runs every step on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT, asset_dir


@pytest.mark.integration
def test_gpu_check_quick_on_cpu(tmp_path):
    for name in ("smollm2-135m", "mistral-v1-tokenizer", "gemma3-270m"):
        asset_dir(name)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick",
                        "--work", str(tmp_path)], capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    steps = {r["step"]: r for r in rows}
    assert {"transplant-smollm2", "heal", "heal-lora", "distill", "generate-token", "generate-bytes",
            "total"} <= set(steps), p.stderr[-2000:]
    assert steps["total"]["failed"] == [], rows
    assert steps["generate-bytes"]["bytes_per_s"] > 0 and p.returncode == 0
    assert not any(tmp_path.iterdir())  # scratch removed
