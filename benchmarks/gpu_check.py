"""GPU check: the GPU paths of the toolkit in one short run (about 8 minutes on one H200).

Steps, each a ``surgery`` command in a subprocess (only the public CLI: internal refactors do not
break it), one JSON line per step with its exit code, wall time and figures:

1. ``checkpoint``: a synthetic Llama-3.2-1B-shaped bf16 checkpoint (``synthetic_checkpoint.py``);
2. ``transplant-1b``: it into the Gemma-3 tokenizer (262k) with ``tokenadapt``: aux embeddings
   and neighbour search on the GPU, cold aux cache;
3. ``transplant-smollm2``: SmolLM2-135M into the Gemma-3 tokenizer with ``tokenadapt`` on the GPU
   (the model that is healed next);
4. ``heal`` and ``heal-lora``: bf16 heal of that output, without and with LoRA;
5. ``distill``: ``recipes/distill_gemma3_to_smollm2.yaml`` for a few steps in bf16;
6. ``generate-token`` / ``generate-bytes``: token-level against byte-level generation speed.

``--device cpu --quick`` runs the same steps on tiny inputs (a 2-layer random model carrying
SmolLM2's tokenizer, transplanted to Mistral-v1's with ``mean``, 2 training steps) in well under a
minute; a test runs it so the script never rots.

    .venv/bin/python benchmarks/gpu_check.py > benchmarks/results/gpu_check.jsonl
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "artifacts" / "texts"


def surgery_cmd() -> list[str]:
    exe = ROOT / ".venv" / "bin" / "surgery"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "surgery.cli"]


def run_step(name: str, cmd: list[str], timeout: int, results: list, **extra) -> dict:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, err = 124, f"timed out after {timeout} s"
    rec = {"benchmark": "gpu_check", "step": name, "rc": rc, "wall_s": round(time.time() - t0, 2), **extra}
    m = re.search(r"\(([0-9.]+) bytes/s\)", out)
    if m:
        rec["bytes_per_s"] = float(m.group(1))
    if rc:
        rec["error"] = (err or out).strip().splitlines()[-1][-300:] if (err or out).strip() else ""
    results.append(rec)
    print(json.dumps(rec), flush=True)
    return rec


def help_has(sub: str, flag: str) -> bool:
    p = subprocess.run(surgery_cmd() + [sub, "--help"], capture_output=True, text=True, cwd=ROOT)
    return flag in p.stdout


def tiny_base(out: Path, tokenizer: str) -> Path:
    """A random 2-layer Llama (hidden 64) carrying ``tokenizer``, bf16, sharded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.checkpoint import save_checkpoint
    from surgery.loading import load_tokenizer

    tok = load_tokenizer(tokenizer)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return save_checkpoint(model, tok, out, max_shard_bytes=4_000_000)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny inputs (for a CPU smoke test)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temp folder, deleted)")
    ap.add_argument("--budget-s", type=int, default=480, help="skip remaining steps past this (default 480)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))

    t_start = time.time()
    results: list[dict] = []
    S = surgery_cmd()
    dev = ["--device", args.device]
    work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work))
    train = str(TEXTS / "debian-reference.de.train.txt")
    heldout = str(TEXTS / "debian-reference.de.heldout.txt")
    quick = args.quick
    heal_dtype = ["--dtype", "bfloat16"] if help_has("heal", "--dtype") else []
    bf16 = [] if quick else ["--autocast", "bf16"]
    try:
        def left(limit: int) -> int:
            return max(5, min(limit, int(args.budget_s - (time.time() - t_start))))

        if quick:
            base = tiny_base(work / "base", "smollm2-135m")
            healme = work / "t-small"
            run_step("transplant-smollm2", S + ["transplant", str(base), "mistral-v1-tokenizer", str(healme),
                                                "--method", "mean"] + dev, left(120), results)
        else:
            import synthetic_checkpoint as synth

            t0 = time.time()
            info = synth.write("llama-3.2-1b", work / "llama-1b", shard_per_layer=True)
            results.append({"benchmark": "gpu_check", "step": "checkpoint", "rc": 0,
                            "wall_s": round(time.time() - t0, 2), "bytes": info["bytes"]})
            print(json.dumps(results[-1]), flush=True)
            aux = ["--cache-dir", str(work / "aux")]
            run_step("transplant-1b", S + ["transplant", str(work / "llama-1b"), "gemma3-270m", str(work / "t-1b"),
                                           "--method", "tokenadapt"] + aux + dev, left(240), results,
                     model="llama-3.2-1b-shaped", target="gemma3-270m")
            shutil.rmtree(work / "llama-1b", ignore_errors=True)
            shutil.rmtree(work / "t-1b", ignore_errors=True)
            healme = work / "t-small"
            run_step("transplant-smollm2", S + ["transplant", "smollm2-135m", "gemma3-270m", str(healme),
                                                "--method", "tokenadapt"] + aux + dev, left(120), results)
        steps = "2" if quick else "100"
        seq = ["--seq-len", "32", "--batch-size", "1"] if quick else ["--seq-len", "256", "--batch-size", "8"]
        lora = ["--params", "lora"] if help_has("heal", "--params") else ["--lora"]  # CLI spelling of the day
        for name, extra in (("heal", []), ("heal-lora", lora)):
            run_step(name, S + ["heal", str(healme), "--text", train, "--steps", steps, "--out", str(work / name),
                                "--eval-text", heldout] + seq + bf16 + heal_dtype + extra + dev, left(150), results)
        distill = [f"output_dir={work / 'distill'}", f"train.steps={2 if quick else 20}",
                   f"train.device={args.device}", "train.eval_max_bytes=1000", "train.checkpoint_every=0"]
        if quick:
            distill += [f"student.model={healme}", f"teachers.0.model={base}", "train.batch_size=2",
                        "train.micro_batch_size=1", "data.block_chars=200", "data.max_tokens=32", "data.max_blocks=8"]
        else:
            distill += ["train.precision=bf16", "train.threads=8"]
        run_step("distill", S + ["distill", "--config", str(ROOT / "recipes" / "distill_gemma3_to_smollm2.yaml"),
                                 "--overwrite"] + distill, left(150), results)
        model = str(healme) if quick else "smollm2-135m"
        nbytes = "8" if quick else "400"
        for name, extra in (("generate-token", []), ("generate-bytes", ["--bytes"])):
            run_step(name, S + ["generate", model, "--prompt", "Debian ist ein", "--max-bytes", nbytes, "--seed", "0"]
                     + extra + dev, left(120), results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r["step"] for r in results if r.get("rc")]
    print(json.dumps({"benchmark": "gpu_check", "step": "total", "rc": int(bool(failed)), "failed": failed,
                      "wall_s": round(time.time() - t_start, 2), "device": args.device, "quick": quick}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
