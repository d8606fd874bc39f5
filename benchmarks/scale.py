"""Benchmark: streaming transplants of 1B-8B-shaped checkpoints: wall time, peak memory, output size.

For each synthetic checkpoint (``benchmarks/synthetic_checkpoint.py``: random bf16 weights with the
exact shapes of a real model and its tokenizer) and each new tokenizer, one case per tool:

- ``cp``: ``cp -r`` of the checkpoint folder (the I/O floor: a transplant must at least copy it);
- ``surgery`` with ``--method mean`` and ``--method tokenadapt`` (aux embeddings cached: the cache
  is first filled, unmeasured, for every token of both tokenizers unless ``--cold``); tokenadapt runs
  once with its neighbour search computed and once answered from the search cache
  (``tokenadapt-search-cached``: a second model of the same family; ``--search-cache``);
- ``mergekit``: ``mergekit-tokensurgeon BASE DONOR OUT -a subword --allow-crimes`` (its own virtualenv,
  see ``benchmarks/mergekit_subword.py``), the donor being the shipped model that carries the tokenizer.

Each case runs as a child of a fresh measuring process (peak RSS = ``ru_maxrss`` of its children),
under ``flock LOCK`` when ``--lock`` is given (the wait is not timed), and its output is deleted
right after. ``--verify`` checks the first surgery output of each checkpoint: every body tensor
bit-identical and in its input dtype, index consistent, and the output loads with plain
``AutoModelForCausalLM`` (fully for models under 3 GB, else on the ``meta`` device with a key check).
One JSON line per case (``kind``: ``checkpoint``, ``case``, ``verify``).
``scale.py --plot [RESULTS.jsonl] OUT.png`` draws time and memory against checkpoint size (the latest run of each
case; rows with ``"quiet": false``, measured beside other work, are left out)
(default results: ``benchmarks/results/scale.jsonl``).

    .venv/bin/python benchmarks/scale.py --models llama-3.2-3b --targets smollm2-135m --methods mean \\
        --work /tmp/scale --lock /tmp/cpu.lock --verify >> benchmarks/results/scale.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
SURGERY = str(ROOT / ".venv" / "bin" / "surgery")


def emit(d: dict) -> None:
    print(json.dumps(d), flush=True)


def measure(cmd: list[str], lock: str | None, timeout: int) -> dict:
    """Run ``cmd`` in a fresh measuring child (under ``flock lock``): wall seconds, peak RSS, exit code."""
    inner = [sys.executable, str(Path(__file__).resolve()), "--measure", str(timeout), "--", *cmd]
    full = (["flock", lock] if lock else []) + inner
    p = subprocess.run(full, capture_output=True, text=True)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"rc": p.returncode, "error": p.stderr[-500:]}


def _measure_main(timeout: int, cmd: list[str]) -> int:
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, (p.stderr[-400:] if p.returncode else "")
    except subprocess.TimeoutExpired:
        rc, err = 124, f"timed out after {timeout} s"
    wall = time.time() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    print(json.dumps({"rc": rc, "wall_s": round(wall, 2), "peak_rss_gib": round(rss / 1024**2, 3),
                      **({"error": err} if err else {})}))
    return 0


def warm_aux_cache(base_tokenizer: str, target: str) -> dict:
    """Fill the aux embedding cache for every token with bytes of both tokenizers (what a transplant reads)."""
    from surgery.loading import load_tokenizer
    from surgery.transplant.aux_embeddings import AuxEmbedder, vocab_embeddings
    from surgery.transplant.config import TransplantConfig
    from surgery.vocab.surfaces import canonical_vocabulary

    cfg = TransplantConfig(method="tokenadapt")
    aux = AuxEmbedder(cfg.aux_model, device="cpu", batch_size=cfg.aux_batch_size,
                      max_seq_length=cfg.aux_max_seq_length, dtype=cfg.aux_dtype)
    out = {}
    for name in (base_tokenizer, target):
        v = canonical_vocabulary(load_tokenizer(name))
        ids = [i for i, b in enumerate(v.surfaces) if b is not None]
        out[name] = vocab_embeddings(aux, v, ids, cfg.cache_dir)[1]["computed"]
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def verify(base: Path, out: Path) -> dict:
    """Body tensors bit-identical and same dtype; index consistent; loads with AutoModelForCausalLM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from surgery.checkpoint import CheckpointReader
    from surgery.transplant.streaming import embedding_keys, model_skeleton

    a, b = CheckpointReader(base), CheckpointReader(out)
    skel = model_skeleton(AutoConfig.from_pretrained(base))
    emb, head, _, _ = embedding_keys(skel, a)
    body = [k for k in a.keys if k not in (emb, head)]
    same = all(k in b and a.dtype(k) == b.dtype(k) and a.shape(k) == b.shape(k) for k in body)
    identical = 0
    for k in body:  # one tensor pair in memory at a time
        x, y = a.get(k, check=False), b.get(k, check=False)
        if same and bytes(x.view(torch.uint8).numpy()) == bytes(y.view(torch.uint8).numpy()):
            identical += 1
    res = {"kind": "verify", "body_tensors": len(body), "bit_identical": identical, "dtypes_kept": same,
           "dtype": str(a.dtype(body[0])).replace("torch.", "")}
    size = sum(b.nbytes(k) for k in b.keys)
    if size < 3e9:
        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
        res["load"] = "full"
        res["forward_finite"] = bool(torch.isfinite(logits).all())
        del m
    else:
        skel2 = model_skeleton(AutoConfig.from_pretrained(out))
        want = {n for n, _ in skel2.named_parameters()}
        res["load"] = "meta"
        res["keys_match"] = want == set(b.keys)
    return res


def plot(results: Path, png: Path) -> None:
    """Wall time and peak RSS against checkpoint size, one line per tool and tokenizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r.get("kind") == "case" and r.get("rc") == 0 and not r["model"].startswith("tiny")
            and r.get("quiet", True)]  # runs marked as measured beside other work stay in the file, not in the plot
    rows = list({(r["model"], r["tool"], r["target"]): r for r in rows}.values())  # the latest run of each case
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (tool, target) in sorted({(r["tool"], r["target"]) for r in rows}):
        pts = sorted((r["checkpoint_bytes"] / 1e9, r["wall_s"], r["peak_rss_gib"]) for r in rows
                     if r["tool"] == tool and r["target"] == target)
        label = f"{tool} → {target.split('-')[0]}"
        style = "--" if tool in ("cp", "mergekit-subword") else "-"
        a.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        b.plot([p[0] for p in pts], [p[2] for p in pts], style, marker="o", label=label)
    a.set_xlabel("checkpoint size (GB, bf16)")
    a.set_ylabel("wall time (s)")
    b.set_xlabel("checkpoint size (GB, bf16)")
    b.set_ylabel("peak RSS (GiB)")
    a.set_title("time (shared 2-core machine)")
    b.set_title("memory")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    import synthetic_checkpoint as synth

    if argv is None and len(sys.argv) in (3, 4) and sys.argv[1] == "--plot":  # [RESULTS.jsonl] OUT.png
        results = Path(sys.argv[2]) if len(sys.argv) == 4 else ROOT / "benchmarks" / "results" / "scale.jsonl"
        plot(results, Path(sys.argv[-1]))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=synth.REAL, choices=sorted(synth.MODELS))
    ap.add_argument("--targets", nargs="+", default=["smollm2-135m", "gemma3-270m"], help="new tokenizers (assets)")
    ap.add_argument("--methods", nargs="*", default=["mean", "tokenadapt"])
    ap.add_argument("--baselines", nargs="*", default=["cp", "mergekit"], choices=["cp", "mergekit"])
    ap.add_argument("--mergekit", default="/work/mkvenv/bin/mergekit-tokensurgeon")
    ap.add_argument("--work", required=True, help="scratch folder (checkpoints and outputs; cleaned up)")
    ap.add_argument("--lock", default=None, help="run each case under `flock LOCK`")
    ap.add_argument("--timeout", type=int, default=570, help="seconds per case (default 570)")
    ap.add_argument("--shard-per-layer", action="store_true", default=True)
    ap.add_argument("--cold", action="store_true", help="do not warm the aux cache before tokenadapt")
    ap.add_argument("--search-cache", choices=["cold", "warm", "both"], default="both",
                    help="tokenadapt: run with the neighbour search computed (cold), answered from its cache as for a "
                         "second model of the same family (warm), or both cases (default)")
    ap.add_argument("--verify", action="store_true", help="verify the first surgery output of each checkpoint")
    ap.add_argument("--keep-checkpoint", action="store_true", help="keep the synthetic checkpoint at the end")
    args = ap.parse_args(argv)

    from surgery.assets import asset_path

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        ck = work / name
        if not (ck / "model.safetensors.index.json").exists():
            cmd = [sys.executable, str(ROOT / "benchmarks" / "synthetic_checkpoint.py"), name, str(ck)]
            cmd += ["--shard-per-layer"] if args.shard_per_layer else []
            r = measure(cmd, args.lock, args.timeout)
            emit({"benchmark": "scale", "kind": "checkpoint", "model": name, **r, "bytes": du(ck)})
        size = du(ck)
        verified = not args.verify
        for target in args.targets:
            tok = str(asset_path(target))
            cases = [("cp", ["cp", "-r", str(ck), "{out}"])] if "cp" in args.baselines else []
            for m in args.methods:
                cmd = [SURGERY, "transplant", str(ck), tok, "{out}", "--method", m]
                if m.startswith("tokenadapt") and args.search_cache in ("cold", "both"):
                    cases.append((m, cmd))  # the neighbour search computed (its cache emptied first)
                if m.startswith("tokenadapt") and args.search_cache in ("warm", "both"):
                    cases.append((f"{m}-search-cached", cmd))  # a second model of the family: search cached
                if not m.startswith("tokenadapt"):
                    cases.append((m, cmd))
            if "mergekit" in args.baselines and Path(args.mergekit).exists():
                cases.append(("mergekit-subword", [args.mergekit, str(ck), tok, "{out}", "-a", "subword",
                                                   "--allow-crimes"]))
            for label, cmd in cases:
                out = work / f"out-{name}-{target}-{label}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = [c.replace("{out}", str(out)) for c in cmd]
                if label.startswith("tokenadapt") and not args.cold:  # warm the aux cache (not measured)
                    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--warm", synth.MODELS[name][2],
                                    target], check=True)
                if label.startswith("tokenadapt") and not label.endswith("-search-cached"):
                    for f in (ROOT / "artifacts" / "cache" / "aux").glob("*/neighbours-*.npz"):
                        f.unlink()  # the search runs in this case
                r = measure(cmd, args.lock, args.timeout)
                rec = {"benchmark": "scale", "kind": "case", "model": name, "checkpoint_bytes": size,
                       "target": target, "tool": label, **r, "output_bytes": du(out)}
                if label not in ("cp", "mergekit-subword") and (out / "transplant_report.json").exists():
                    rep = json.loads((out / "transplant_report.json").read_text())
                    rec["timings_s"] = rep.get("timings_s")
                    rec["stream"] = rep.get("stream")
                    stats = rep.get("method_stats", {})
                    if stats.get("bias_direction"):
                        rec["bias_direction"] = stats["bias_direction"]
                    aux = {k: v for k, v in stats.items() if "aux" in k or "cache" in k}
                    if aux:
                        rec["aux"] = aux
                emit(rec)
                if not verified and label not in ("cp", "mergekit-subword") and r.get("rc") == 0:
                    emit({"benchmark": "scale", "model": name, "target": target, "tool": label, **verify(ck, out)})
                    verified = True
                shutil.rmtree(out, ignore_errors=True)
        if not args.keep_checkpoint:
            shutil.rmtree(ck, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--warm":  # in a child: its memory is gone before the cases run
        sys.path.insert(0, str(ROOT))
        print(json.dumps({"aux_computed": warm_aux_cache(sys.argv[2], sys.argv[3])}), file=sys.stderr)
        sys.exit(0)
    if len(sys.argv) > 3 and sys.argv[1] == "--measure":
        sys.exit(_measure_main(int(sys.argv[2]), sys.argv[4:]))
    sys.exit(main())
