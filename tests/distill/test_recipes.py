"""Smoke tests of the distillation recipes: the CLI on the shipped real models (integration) and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import asset_dir

ROOT = Path(__file__).resolve().parents[2]
SURGERY = str(Path(sys.executable).parent / "surgery")


def run_cli(*args, timeout=900):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([SURGERY, "distill", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_cli_reports_config_errors_in_one_line():
    r = run_cli("--config", "recipes/distill_gemma3_to_smollm2.yaml", "trian.steps=3", "loss.name=xkl",
                "train.lr=fast")
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: invalid config:")
    assert "did you mean 'train'" in line and "'xkl' is not a registered loss" in line and "train.lr" in line


def test_cli_help_config_and_dry_run():
    r = run_cli("--help-config")
    assert r.returncode == 0 and "loss.top_k (int, 8192)" in r.stdout
    r = run_cli("--config", "recipes/distill_qwen3_to_llama32_gpu.yaml", "--dry-run", "train.steps=500")
    assert r.returncode == 0 and "steps: 500" in r.stdout


@pytest.mark.integration
def test_cpu_recipe_tiny_variant_runs_end_to_end(tmp_path):
    """The header's tiny CPU variant on the real Gemma-3-270M → SmolLM2-135M (about 2-3 minutes on 2 cores)."""
    asset_dir("gemma3-270m"), asset_dir("smollm2-135m")
    out = tmp_path / "run"
    r = run_cli("--config", "recipes/distill_gemma3_to_smollm2.yaml", "--overwrite", f"output_dir={out}",
                "train.steps=2", "train.batch_size=2", "train.micro_batch_size=1", "data.block_chars=200",
                "data.max_tokens=64", "train.eval_max_bytes=1000", "train.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Held-out student bits/byte" in r.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if x["event"] == "train"] == [1, 2]
    assert (out / "final" / "model.safetensors.index.json").exists() and (out / "metrics.png").exists()
