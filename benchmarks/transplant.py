"""Benchmark: tokenizer transplantation into SmolLM2-135M, every method, bits/byte before and after heal.

Run (after `surgery assets`; about 1-2 h on 2 CPU cores with a cold aux cache):

    .venv/bin/python benchmarks/transplant.py

Tiny variant (one pair, two methods, short texts, no heal; a few minutes):

    .venv/bin/python benchmarks/transplant.py --pairs llama3-tokenizer --methods mean tokenadapt \\
        --langs en --max-bytes 3000 --heal-minutes 0

Gemma-3-270M as the base (a SentencePiece vocabulary with byte-fallback twins), into three tokenizers
(``omp`` runs only for SmolLM2's, the one pair with a donor model); split per pair to keep each run short:

    flock /tmp/cpu.lock .venv/bin/python benchmarks/transplant.py --base gemma3-270m \
        --pairs llama3-tokenizer --methods mean tokenadapt omp --heal-minutes 0 \
        >> benchmarks/results/transplant_gemma3_base.jsonl
    # then --pairs qwen2-tokenizer / smollm2-135m with --skip-original

The heal grid (``--heal-params`` × ``--heal-teachers``, ``--heal-minutes`` each) on the best method, e.g. CE
against the base model as teacher for new rows, LoRA and all parameters:

    flock /tmp/cpu.lock .venv/bin/python benchmarks/transplant.py --pairs llama3-tokenizer \
        --methods tokenadapt-untie --heal-params new-rows lora all --heal-teachers none auto

Per-step quality (teacher against CE at the same number of steps rather than the same minutes):
``--heal-steps 63 --heal-cells all:none all:auto``.

An early teacher (the base teaches the first 30% of the 5 minutes, then CE alone; ``--heal-teacher-decay linear``
fades its weight to 0 over that window):

    flock /tmp/cpu.lock .venv/bin/python benchmarks/transplant.py --pairs llama3-tokenizer \
        --methods tokenadapt-untie --heal-cells all:auto --heal-autocast bf16 \
        --heal-teacher-fraction 0.3

Prints one JSON object per line: the original model per language (``kind: original``), each
method × tokenizer × language (``kind: zero_shot``, with the ratio to the original and the
transplant wall time), then the best method of each pair after a short CPU heal on the shipped
*train* texts (``kind: healed``). Evaluation is on the shipped *held-out* texts
(``artifacts/texts/debian-reference.LL.heldout.txt``; ``code.heldout.txt`` for ``--langs code``), the first ``--max-bytes`` bytes, windows of
1024 tokens with stride ``--stride``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TEXTS = ROOT / "artifacts" / "texts"

# method name → TransplantConfig overrides
METHODS = {
    "random": {"method": "random"},
    "mean": {"method": "mean"},
    "tokenadapt-published": {"method": "tokenadapt-published"},
    "tokenadapt": {"method": "tokenadapt"},
    "tokenadapt-untie": {"method": "tokenadapt", "untie": True},
    "omp": {"method": "omp"},  # k from --omp-k; the donor is the model of the new tokenizer
}
# omp needs a donor that speaks the new tokenizer: it runs only where the new tokenizer is a shipped model's
DONOR_MODELS = ("gemma3-270m", "smollm2-135m")
HEAL_LR = 2e-3
HEAL_NEGATIVES = 1024


def emit(d: dict) -> None:
    print(json.dumps(d), flush=True)


def ratio(v: float, original: float | None) -> float | None:
    return round(v / original, 4) if original else None


def text_path(lang: str, split: str) -> Path:
    """The shipped text of ``lang`` (a Debian Reference language, or ``code``: Python source) and ``split``."""
    return TEXTS / (f"code.{split}.txt" if lang == "code" else f"debian-reference.{lang}.{split}.txt")


def heldout(lang: str, max_bytes: int) -> str:
    t = text_path(lang, "heldout").read_text()
    b = t.encode()[:max_bytes]
    return b.decode("utf-8", errors="ignore")


def evaluate(model, tok, texts: dict, stride: int) -> dict:
    from surgery.evaluate import bits_per_byte

    return {lang: bits_per_byte(model, tok, text, max_length=1024, stride=stride, progress=False).bits_per_byte
            for lang, text in texts.items()}


@contextlib.contextmanager
def held(lock: str | None):
    """An exclusive ``flock`` on ``lock`` for the duration (nothing without one)."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cut_texts(paths: list[str], max_chars: int, folder: Path) -> list[str]:
    """The first ``max_chars`` characters of each text in ``paths``, written under ``folder`` (new paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(paths):
        q = folder / f"{i}-{Path(p).name}"  # two texts of the same name in different folders stay apart
        q.write_text(Path(p).read_text(encoding="utf-8")[:max_chars], encoding="utf-8")
        out.append(str(q))
    return out


def heal_one(args, pair, method, src, zero_shot, orig, texts, heal_texts, params, teacher, out) -> None:
    """Heal ``src`` for ``--heal-minutes`` under one parameter policy and teacher; prints one row per language."""
    from surgery.commands.heal import heal_checkpoint
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant import HealConfig

    budget = {"steps": args.heal_steps} if args.heal_steps else {"minutes": args.heal_minutes}
    schedule = {} if teacher == "none" else {"teacher_fraction": args.heal_teacher_fraction,
                                             "teacher_decay": args.heal_teacher_decay,
                                             "teacher_on": args.heal_teacher_on}
    device = None if args.heal_device == "auto" else args.heal_device
    cfg = HealConfig(**budget, device=device, seq_len=256, batch_size=2, lr=args.heal_lr,
                     warmup=3, checkpoint_every=100000, params=params, negatives=args.heal_negatives,
                     teacher=teacher, loss=args.heal_loss, autocast=args.heal_autocast, seed=args.heal_seed,
                     **schedule)
    t3 = time.time()
    s = heal_checkpoint(str(src), heal_texts, str(out), cfg, overwrite=True, progress=False)
    model = load_model(out)
    bpb = evaluate(model, load_tokenizer(out), texts, args.stride)
    del model
    for lang, v in bpb.items():
        emit({"kind": "healed", "base": args.base, "tokenizer": pair, "method": method, "lang": lang,
              "params": params, "teacher": teacher, **({"loss": args.heal_loss} if teacher != "none" else {}),
              "bits_per_byte": round(v, 4), "ratio": ratio(v, orig[lang]),
              "zero_shot_bits_per_byte": round(zero_shot[lang], 4),
              "heal_budget": budget, "heal_steps": s["steps"], "heal_teacher_steps": s.get("teacher_steps"),
              **({"heal_teacher_memo_hits": s["teacher_memo_hits"]} if s.get("teacher_memo_hits") is not None else {}),
              **({"heal_teacher_blocks": s["teacher_blocks"]} if s.get("teacher_blocks") is not None else {}),
              **({"heal_max_chars": args.heal_max_chars} if args.heal_max_chars else {}),
              "heal_train_tokens": s.get("train_tokens_available"),
              "heal_s": round(time.time() - t3, 1),
              "heal_train_s": s["seconds"], "heal_step_s_median": s["step_s_median"],
              "heal_tokens": s["tokens_seen"], "heal_rows_trained": s.get("rows_trained"),
              **({"heal_device": s["device"]} if s["device"] != "cpu" else {}),
              "heal_config": {k: s["config"][k] for k in ("lr", "seq_len", "batch_size", "negatives", "all_lr",
                                                          "lora_lr", "teacher_balance", "autocast", "teacher_dtype",
                                                          "teacher_fraction", "teacher_decay", "teacher_on",
                                                          "seed")
                                if k in s["config"]}, "bf16_autocast": s.get("bf16_autocast")})
    shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    from surgery.transplant import TransplantConfig
    from surgery.transplant.config import AUTOCAST, PARAMS, TEACHER_DECAY, TEACHER_ON

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--pairs", nargs="+", default=["llama3-tokenizer", "gemma3-270m"], help="new tokenizers")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--omp-k", type=int, default=TransplantConfig.omp_k, help="omp: non-zero coefficients per token")
    ap.add_argument("--langs", nargs="+", default=["en", "de", "zh", "ja"],
                    help="held-out (and heal) texts: Debian Reference languages (en de zh ja es fr) or code (Python)")
    ap.add_argument("--max-bytes", type=int, default=8000, help="bytes of each held-out text scored")
    ap.add_argument("--skip-original", action="store_true",
                    help="do not score the base model itself (already printed by an earlier run)")
    ap.add_argument("--stride", type=int, default=1024, help="evaluation stride (1024 = no overlap)")
    ap.add_argument("--heal-minutes", type=float, default=5.0, help="CPU heal of the best method (0 = skip)")
    ap.add_argument("--heal-steps", type=int, default=None,
                    help="heal for this many optimizer steps instead of --heal-minutes (per-step comparisons)")
    ap.add_argument("--heal-texts", nargs="+", default=None, help="default: shipped train texts of --langs")
    ap.add_argument("--heal-max-chars", type=int, default=None,
                    help="heal on the first N characters of each heal text only (the data-limited regime: a small "
                         "corpus read for several epochs)")
    ap.add_argument("--heal-method", default=None, help="method to heal (default: the best zero-shot of this run)")
    ap.add_argument("--heal-lr", type=float, default=HEAL_LR, help="learning rate of the healed rows")
    ap.add_argument("--heal-negatives", type=int, default=HEAL_NEGATIVES,
                    help="head rows of the most-favoured wrong tokens trained per step (0 = batch tokens only)")
    ap.add_argument("--heal-params", nargs="+", default=["head"], choices=list(PARAMS),
                    help="parameter policies healed, one heal each (head: head rows only, the body runs forward; "
                         "new-rows: input and head rows; lora: new rows + LoRA; all: every parameter)")
    ap.add_argument("--heal-teachers", nargs="+", default=["none"], choices=["none", "auto"],
                    help="none: next-token CE; auto: the base model teaches through --heal-loss; one heal each")
    ap.add_argument("--heal-cells", nargs="+", default=None, metavar="PARAMS:TEACHER",
                    help="heal exactly these cells in this order (e.g. all:none all:auto head:none) instead of the "
                         "product of --heal-params and --heal-teachers")
    ap.add_argument("--heal-autocast", default="auto", choices=list(AUTOCAST),
                    help="mixed precision of the heal (auto: bf16 on CUDA, float32 on CPU)")
    ap.add_argument("--heal-loss", default="alm", help="the teacher's cross-vocabulary loss (with --heal-teachers auto)")
    ap.add_argument("--heal-teacher-fraction", type=float, default=1.0,
                    help="teacher cells: the teacher teaches the first F of the budget, then CE alone")
    ap.add_argument("--heal-teacher-decay", default="none", choices=list(TEACHER_DECAY),
                    help="teacher cells: the teacher's weight over its fraction (linear: 1 down to 0)")
    ap.add_argument("--heal-teacher-on", default="every", choices=list(TEACHER_ON),
                    help="teacher cells: every step, repeats (only steps whose blocks were all drawn before) or "
                         "repeated-blocks (in each step, the blocks drawn before)")
    ap.add_argument("--heal-device", default="cpu", choices=["cpu", "cuda", "auto"],
                    help="where the heal runs: cpu (the README's CPU-minute figures), cuda, or auto (cuda if present); "
                         "rows healed off the CPU carry heal_device")
    ap.add_argument("--heal-seed", type=int, default=0, help="seed of the heal's block order and LoRA init")
    ap.add_argument("--lock", default=None,
                    help="hold this file's flock during each transplant + evaluation and each heal (lets other jobs "
                         "that share the lock run in between, never during a timed heal)")
    ap.add_argument("--work", default=None, help="folder for transplanted checkpoints (default: a temp folder)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    for c in args.heal_cells or []:
        p, _, t = c.partition(":")
        if p not in PARAMS or t not in ("none", "auto"):
            ap.error(f"--heal-cells: {c!r} is not PARAMS:TEACHER ({'|'.join(PARAMS)} : none|auto)")
    if not 0 < args.heal_teacher_fraction <= 1:
        ap.error(f"--heal-teacher-fraction must be in (0, 1], got {args.heal_teacher_fraction}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)

    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant import TransplantConfig, transplant_checkpoint
    from surgery.transplant.aux_embeddings import default_cache_dir

    texts = {lang: heldout(lang, args.max_bytes) for lang in args.langs}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-transplant-"))
    t0 = time.time()
    orig = {lang: None for lang in texts}
    if not args.skip_original:
        with held(args.lock):
            model = load_model(args.base)
            orig = evaluate(model, load_tokenizer(args.base), texts, args.stride)
            del model
    for lang, v in ({} if args.skip_original else orig).items():
        emit({"kind": "original", "model": args.base, "lang": lang, "bits_per_byte": round(v, 4),
              "bytes": len(texts[lang].encode()), "eval_s": round(time.time() - t0, 1)})

    for pair in args.pairs:
        results = {}
        for name in args.methods:
            over = METHODS[name]
            if name == "omp":
                if pair not in DONOR_MODELS:
                    continue
                over = {**over, "omp_k": args.omp_k, "donor": pair}
            cfg = TransplantConfig(**over, cache_dir=str(default_cache_dir()))
            out = work / f"{pair}-{name}"
            with held(args.lock):
                t1 = time.time()
                rep = transplant_checkpoint(args.base, pair, str(out), cfg, overwrite=True, progress=False)
                t_tr = time.time() - t1
                model = load_model(out)
                tok = load_tokenizer(out)
                t2 = time.time()
                bpb = evaluate(model, tok, texts, args.stride)
                del model
            results[name] = (bpb, out)
            for lang, v in bpb.items():
                emit({"kind": "zero_shot", "base": args.base, "tokenizer": pair, "method": name, "lang": lang,
                      "bits_per_byte": round(v, 4), "ratio": ratio(v, orig[lang]),
                      **({"omp_k": args.omp_k} if name == "omp" else {}),
                      "transplant_s": round(t_tr, 1), "eval_s": round(time.time() - t2, 1),
                      "counts": rep["counts"], "timings_s": rep["timings_s"],
                      "aux": {k: v for k, v in rep["method_stats"].items() if k.startswith(("aux_", "seconds"))}})
        if (args.heal_minutes > 0 or args.heal_steps) and results:
            best = args.heal_method or min(results, key=lambda n: sum(results[n][0].values()) / len(results[n][0]))
            if best not in results:
                print(f"--heal-method {best!r} was not run for {pair}; skipping the heal", file=sys.stderr)
                continue
            src = results[best][1]
            heal_texts = args.heal_texts or [str(text_path(lang, "train")) for lang in args.langs]
            if args.heal_max_chars:
                heal_texts = cut_texts(heal_texts, args.heal_max_chars, work / "heal-texts")
            cells = ([tuple(c.split(":", 1)) for c in args.heal_cells] if args.heal_cells else
                     [(p, t) for p in args.heal_params for t in args.heal_teachers])
            for params, teacher in cells:
                with held(args.lock):
                    heal_one(args, pair, best, src, results[best][0], orig, texts, heal_texts, params, teacher,
                             work / f"{pair}-{best}-healed-{params}-{teacher}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
