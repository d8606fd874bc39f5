"""lm-evaluation-harness parity: `surgery lm-eval` against lm-eval's own `hf` model, and an ensemble against its members.

Runs the local task ``nextsent_en`` (artifacts/tasks/nextsent, built by artifacts/tasks/make_tasks.py) on the
first ``--limit`` documents (four requests each), in process through lm-eval's ``simple_evaluate`` with
per-sample logs, and prints one JSON object per line:

- SmolLM2-135M three ways: byte level (what ``surgery lm-eval --model smollm2-135m`` runs: canonical
  ByteLM), token level (``--token-level``: conditioned on the document-start token like the byte level) and
  lm-eval's own ``--model hf pretrained=artifacts/cache/smollm2-135m``, once as it runs by default (no start token:
  the SmolLM2 tokenizer adds none) and once with the tokenizer set to add BOS (the byte level's conditioning):
  ``acc``, ``acc_norm`` per system; per pair the mean relative difference of the per-request log-likelihoods
  (``mean |a-b| / |b|``), the mean absolute and signed differences in nats, and how many documents get the
  same answer.
- Gemma-3-270M at byte level, and the byte-level ``mix`` of SmolLM2-135M + Gemma-3-270M (weights 0.5/0.5, what
  ``surgery lm-eval --model smollm2-135m --model gemma3-270m`` runs) with ``beats_best_member`` (accuracy) and,
  finer, the bits per byte every system gives the true continuations (``gold_bits_per_byte``).
- Context reuse (first document, SmolLM2 at byte level): each request scored the slow way (every byte of
  ``context + continuation``, the continuation's summed) and the way the harness does it (``score(...,
  start=len(context))``: nothing built for the context's prefixes): seconds of each and the largest difference.

Every system runs through the real harness classes; each member's byte-level scores of a text are computed once
and reused by the ensemble (the ``mix`` of normalized per-byte distributions needs only the actual bytes'
probabilities), which keeps the run under ten minutes on 2 shared cores::

    flock /tmp/cpu.lock .venv/bin/python benchmarks/lm_eval_parity.py --limit 30 > benchmarks/results/lm_eval.jsonl
    flock /tmp/cpu.lock .venv/bin/python benchmarks/lm_eval_parity.py --task nextsent_de --limit 30 \
        >> benchmarks/results/lm_eval.jsonl

Tiny CPU variant (random two-layer models with the real tokenizers; checks the plumbing only)::

    .venv/bin/python benchmarks/lm_eval_parity.py --limit 2 --tiny
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "artifacts" / "tasks" / "nextsent"
CACHE = ROOT / "artifacts" / "cache"


def per_request(res: dict, task: str) -> tuple[list[float], list[int]]:
    """Log-likelihood of every (document, choice) request in document order, and each document's choice."""
    lls, picks = [], []
    for s in sorted(res["samples"][task], key=lambda s: s["doc_id"]):
        row = [float(r[0]) for r in s["filtered_resps"]]
        lls += row
        picks.append(int(np.argmax(row)))
    return lls, picks


def summary(name: str, res: dict, task: str, seconds: float, **extra) -> dict:
    r = res["results"][task]
    n_req = sum(len(s["filtered_resps"]) for s in res["samples"][task])
    return {"system": name, "task": task, "n_docs": len(res["samples"][task]), "acc": round(r["acc,none"], 4),
            "acc_norm": round(r["acc_norm,none"], 4), "gold_bits_per_byte": round(gold_bpb(res, task), 4),
            "seconds": round(seconds, 1), "seconds_per_request": round(seconds / max(n_req, 1), 2), **extra}


def gold_bpb(res: dict, task: str) -> float:
    """Bits per UTF-8 byte of the true continuations given their contexts (comparable across tokenizers)."""
    bits = n = 0.0
    for s in res["samples"][task]:
        t = int(s["target"])
        bits += -float(s["filtered_resps"][t][0]) / math.log(2)
        n += len(s["arguments"][t][1].encode("utf-8"))
    return bits / n


def compare(a: str, b: str, ra: dict, rb: dict, task: str) -> dict:
    la, pa = per_request(ra, task)
    lb, pb = per_request(rb, task)
    la, lb = np.array(la), np.array(lb)
    return {"compare": f"{a} vs {b}", "task": task, "n_requests": len(la),
            "mean_rel_diff": round(float(np.mean(np.abs(la - lb) / np.abs(lb))), 5),
            "mean_abs_diff_nats": round(float(np.mean(np.abs(la - lb))), 4),
            "mean_diff_nats": round(float(np.mean(la - lb)), 4),
            "same_answer": f"{sum(x == y for x, y in zip(pa, pb))}/{len(pa)}"}


def context_reuse(blm, res: dict, task: str, score) -> dict:
    """The first document's requests scored whole (slow path) and with ``start=len(context)`` (the harness)."""
    doc = min(res["samples"][task], key=lambda s: s["doc_id"])
    pairs = [tuple(a) for a in doc["arguments"]] if isinstance(doc["arguments"][0], (list, tuple)) else [
        tuple(a.values()) for a in doc["arguments"]]
    slow = fast = 0.0
    diffs = []
    for ctx, cont in pairs:
        c, x = ctx.encode("utf-8"), cont.encode("utf-8")
        t0 = time.time()
        whole = float(score(blm, c + x).byte_logprobs[len(c):].sum())
        t1 = time.time()
        part = score(blm, c + x, start=len(c)).logprob
        t2 = time.time()
        slow, fast = slow + t1 - t0, fast + t2 - t1
        diffs.append(abs(whole - part))
    return {"compare": "context reuse: score(ctx+cont, start=len(ctx)) vs whole text", "task": task,
            "n_requests": len(pairs), "max_abs_diff_nats": float(max(diffs)),
            "seconds_whole_text": round(slow, 1), "seconds_start": round(fast, 1),
            "speedup": round(slow / max(fast, 1e-9), 2), "machine": "shared 2-core CPU (timings indicative only)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="nextsent_en")
    ap.add_argument("--limit", type=int, default=30, help="documents (each has four requests)")
    ap.add_argument("--tiny", action="store_true", help="random tiny models with the real tokenizers (plumbing check)")
    ap.add_argument("--skip-ensemble", action="store_true", help="SmolLM2 parity only")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from lm_eval import simple_evaluate

    import surgery.bytelevel.harness as harness
    from surgery.bytelevel import ByteLM
    from surgery.bytelevel.ensemble import ByteEnsemble
    from surgery.loading import load_model, load_tokenizer

    torch.set_num_threads(2)
    tm, _ = harness.task_manager([args.task], str(TASKS))
    common = {"limit": args.limit, "machine": "shared 2-core CPU (timings indicative only)"}
    target = 0.01  # byte level vs lm-eval hf: mean relative difference per request
    scored = {}
    plain_score = harness.score

    def memo_score(blm, data, *a, **kw):  # a member's scores of a text, computed once
        key = (id(blm), bytes(data), a, tuple(sorted(kw.items())))
        if key not in scored:
            scored[key] = plain_score(blm, data, *a, **kw)
        return scored[key]

    harness.score = memo_score

    def run(lm):
        t0 = time.time()
        res = harness.run_tasks(lm, [args.task], str(TASKS), args.limit, manager=tm, log_samples=True)
        return res, time.time() - t0

    def load(name):
        if args.tiny:
            sys.path.append(str(ROOT / "tests"))
            from helpers import tiny_llama

            tok = load_tokenizer(name)
            return tiny_llama(len(tok), seed=0), tok
        return load_model(name), load_tokenizer(name)

    def emit(row):
        print(json.dumps(row), flush=True)

    name = "smollm2-135m"
    model, tok = load(name)
    smol = ByteLM(model, tok)
    rb, sb = run(harness.ByteLevelLM(smol, greedy=False))
    emit(summary(f"surgery lm-eval --model {name} (byte level)", rb, args.task, sb, **common))
    rt, st = run(harness.TokenLevelLM([model], [tok]))
    emit(summary(f"surgery lm-eval --model {name} --token-level", rt, args.task, st, **common))
    pretrained = model if args.tiny else str(CACHE / name)

    def hf(tokenizer):
        t0 = time.time()
        res = simple_evaluate(model="hf", model_args={"pretrained": pretrained, "tokenizer": tokenizer,
                                                       "dtype": "float32", "device": "cpu", "batch_size": 8},
                              tasks=[args.task], task_manager=tm, limit=args.limit, log_samples=True)
        return res, time.time() - t0

    rh, sh = hf(copy.deepcopy(tok))  # lm-eval sets a pad token on the tokenizer it is given
    emit(summary(f"lm_eval --model hf pretrained=artifacts/cache/{name}", rh, args.task, sh,
                 conditioning="none (lm-eval's default: the SmolLM2 tokenizer adds no BOS)", **common))
    bos_tok = copy.deepcopy(tok)
    bos_tok.add_bos_token = True  # the tokenizer now prepends BOS: the document start the byte level conditions on
    rhb, shb = hf(bos_tok)
    emit(summary(f"lm_eval --model hf pretrained=artifacts/cache/{name} (tokenizer adding BOS)", rhb, args.task,
                 shb, conditioning=f"BOS id {bos_tok.bos_token_id}, as surgery lm-eval", **common))
    emit(compare("byte level", "token level", rb, rt, args.task))
    for label, ref in (("lm-eval hf + BOS", rhb), ("lm-eval hf", rh)):
        row = compare("byte level", label, rb, ref, args.task)
        emit({**row, "target_mean_rel_diff": target, "meets_target": row["mean_rel_diff"] < target})
    emit(compare("token level", "lm-eval hf + BOS", rt, rhb, args.task))
    emit(context_reuse(smol, rb, args.task, plain_score))
    if args.skip_ensemble:
        return 0
    gmodel, gtok = load("gemma3-270m")
    gemma = ByteLM(gmodel, gtok)
    rg, sg = run(harness.ByteLevelLM(gemma, greedy=False))
    emit(summary("surgery lm-eval --model gemma3-270m (byte level)", rg, args.task, sg, **common))
    re_, se = run(harness.ByteLevelLM(ByteEnsemble([smol, gemma], [0.5, 0.5], "mix"), greedy=False))
    best_acc, best = max((rb["results"][args.task]["acc,none"], name), (rg["results"][args.task]["acc,none"],
                                                                         "gemma3-270m"))
    acc = re_["results"][args.task]["acc,none"]
    best_bpb = min(gold_bpb(rb, args.task), gold_bpb(rg, args.task))
    emit(summary("surgery lm-eval --model smollm2-135m --model gemma3-270m --mode mix (byte level)", re_, args.task,
                 se, best_member=best, best_member_acc=round(best_acc, 4), beats_best_member=acc > best_acc,
                 best_member_gold_bits_per_byte=round(best_bpb, 4),
                 lower_gold_bits_per_byte_than_best_member=gold_bpb(re_, args.task) < best_bpb,
                 note="member scores reused: seconds exclude them", **common))
    emit(compare("ensemble", f"best member ({best})", re_, rb if best == name else rg, args.task))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
