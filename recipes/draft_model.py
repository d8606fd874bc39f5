"""A draft model for speculative decoding by tokenizer transplant: SmolLM2-135M with Gemma-3's tokenizer drafts for Gemma-3-270M.

Run (CPU, after `surgery assets`; the transplant takes a few minutes, each healing step tens of seconds on
2 shared cores, the comparison a few minutes):

    flock /tmp/cpu.lock .venv/bin/python recipes/draft_model.py --heal-steps 8

Without healing (the transplant alone), or reusing the drafts already written:

    flock /tmp/cpu.lock .venv/bin/python recipes/draft_model.py --heal-steps 0
    flock /tmp/cpu.lock .venv/bin/python recipes/draft_model.py --skip-build --prompts 4 --max-new-tokens 48

Tiny CPU variant (plumbing only: random two-layer target and drafts, seconds):

    .venv/bin/python recipes/draft_model.py --tiny

Steps:

1. ``surgery transplant smollm2-135m gemma3-270m artifacts/runs/draft/smollm2-gemma3 --method omp --donor
   gemma3-270m``: the draft gets the target's 262k vocabulary (rows by OMP over the donor's embeddings, the
   donor being the target itself), so ``generate(assistant_model=draft)`` takes the plain same-vocabulary path.
2. Optionally heal it with the target as teacher (same tokenizer now, so plain KL): ``surgery distill`` with
   ``recipes/distill_gemma3_to_smollm2.yaml`` and ``student.model=<transplant> loss.name=kl`` on English text,
   ``--heal-steps`` optimizer steps, into ``artifacts/runs/draft/smollm2-gemma3-healed``.
3. Compare on the first paragraphs of the shipped held-out texts, greedy: the target alone; assisted generation
   with each transplanted draft; universal assisted generation (``assistant_model=smollm2,
   tokenizer=gemma_tok, assistant_tokenizer=smollm2_tok``: text re-tokenized between the two at every step) with
   the original SmolLM2, under :func:`universal_cache_fix` (transformers 5.x loses track of the assistant's KV
   cache there and stops with ``cannot reshape tensor of 0 elements``; the fix is applied at call time only). Reported: acceptance rate (accepted / proposed draft tokens, counted in target tokens
   where transformers compares the draft's candidates with the target's choice), target tokens per second, and
   whether every output is identical to the target's own greedy output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "artifacts" / "runs" / "draft"
TEXTS = ROOT / "artifacts" / "texts"
TARGET, DRAFT = "gemma3-270m", "smollm2-135m"


def surgery(*args: str) -> None:
    """Run a `surgery` CLI command in a subprocess (the commands are the stable interface)."""
    cmd = [sys.executable, "-m", "surgery.cli", *args]
    print("$ surgery " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def build(heal_steps: int, overwrite: bool) -> list[tuple[str, Path]]:
    """Transplant (and optionally heal) the draft; returns ``[(label, folder)]``."""
    plain = RUNS / "smollm2-gemma3"
    if overwrite or not (plain / "config.json").is_file():
        surgery("transplant", DRAFT, TARGET, str(plain), "--method", "omp", "--donor", TARGET, "--overwrite")
    out = [("transplanted (omp)", plain)]
    if heal_steps > 0:
        run_dir = RUNS / "smollm2-gemma3-healed"
        if overwrite or not (run_dir / "final" / "config.json").is_file():
            surgery("distill", "--config", "recipes/distill_gemma3_to_smollm2.yaml", "--overwrite",
                    f"output_dir={run_dir}", f"student.model={plain}", f"teachers.0.model={TARGET}", "loss.name=kl",
                    f"data.train={TEXTS / 'debian-reference.en.train.txt'}",
                    f"data.heldout={TEXTS / 'debian-reference.en.heldout.txt'}", f"train.steps={heal_steps}",
                    "train.warmup_steps=1", f"train.eval_every={heal_steps}", f"train.checkpoint_every={heal_steps}",
                    "train.eval_max_bytes=4000")
        out.append((f"transplanted (omp) + {heal_steps} steps KL from the target", run_dir / "final"))
    return out


def heal_label(run_dir: Path) -> str:
    """Label of a healed draft from its run's metrics: steps and held-out bits/byte before and after."""
    steps, bpb = 0, []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("event") == "train":
                steps = max(steps, int(row["step"]))
            elif row.get("event") == "eval" and "heldout_bpb" in row:
                bpb.append(float(row["heldout_bpb"]))
    label = f"transplanted (omp) + {steps} steps KL from the target"
    if len(bpb) >= 2:
        label += f" (held-out bits/byte {bpb[0]:.4f} -> {bpb[-1]:.4f})"
    return label


def prompts(n: int, chars: int = 240) -> list[str]:
    """The first ``chars`` characters of the first prose paragraphs of the English and German held-out texts."""
    out = []
    for lang in ("en", "de"):
        text = (TEXTS / f"debian-reference.{lang}.heldout.txt").read_text(encoding="utf-8")
        paras = [p.replace("\n", " ") for p in text.split("\n\n") if len(p) > chars and not p.startswith(" ")]
        out += [p[:chars].rsplit(" ", 1)[0] for p in paras[: (n + 1) // 2]]
    return out[:n]


@contextlib.contextmanager
def count_acceptance():
    """Count proposed / accepted draft tokens in transformers' assisted generation.

    Every verification round calls ``update_candidate_strategy(input_ids, scores, num_matches)`` on the
    candidate generator with ``scores`` of shape ``(1, candidate_length + 1, V)`` (the target's logits over
    the candidates, in target tokens) and ``num_matches`` accepted candidates; universal assisted generation
    inherits the same call.
    """
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    stats = {"proposed": 0, "accepted": 0, "rounds": 0}
    orig = AssistedCandidateGenerator.update_candidate_strategy

    def wrapped(self, input_ids, scores, num_matches):
        stats["proposed"] += int(scores.shape[1]) - 1
        stats["accepted"] += int(num_matches)
        stats["rounds"] += 1
        return orig(self, input_ids, scores, num_matches)

    AssistedCandidateGenerator.update_candidate_strategy = wrapped
    try:
        yield stats
    finally:
        AssistedCandidateGenerator.update_candidate_strategy = orig


@contextlib.contextmanager
def universal_cache_fix():
    """Keep the assistant's KV cache consistent in universal assisted generation (transformers 5.x).

    ``AssistedCandidateGeneratorDifferentTokenizers.get_candidates`` records ``_last_ids_length`` in *target*
    tokens, and ``_update_past_and_masks`` subtracts the *assistant's* input length from it to decide how much of
    the assistant's cache to crop. After a round whose draft re-tokenizes to no new target token (``get_candidates``
    then returns the target's ids unchanged) the cache still holds the rejected draft tokens while the crop count is
    zero or negative, so the cache grows longer than the assistant's ids and the next ``generate`` of the assistant
    has no token left to run: ``cannot reshape tensor of 0 elements`` inside its prefill. (Seen with Gemma-3-270M
    as target and SmolLM2-135M as assistant on a six-token prompt, third round; reproduced by
    ``tests/surgery/bytelevel/test_draft_recipe.py`` with a tiny draft that always proposes one token.)

    While active, the cache is cropped to the longest common prefix of the token ids it holds (the assistant's
    previous sequence, remembered per generator) and the new assistant ids, keeping at least one id to run. Only
    cached work is dropped, never reused wrongly, so greedy outputs stay the target's; site-packages is untouched
    and both methods are restored on exit.
    """
    from transformers.generation.candidate_generator import AssistedCandidateGeneratorDifferentTokenizers as UAG

    orig_get, orig_update = UAG.get_candidates, UAG._update_past_and_masks

    def get_candidates(self, input_ids, **kwargs):
        out = orig_get(self, input_ids, **kwargs)
        if self.prev_assistant_ids is not None:  # the assistant's last sequence: what its cache holds a prefix of
            self._cached_assistant_ids = self.prev_assistant_ids[0].clone()  # copy: the next round edits it in place
        return out

    def update_past_and_masks(self, assistant_input_ids, num_extra_tokens_to_remove: int = 0) -> bool:
        cache = self.assistant_kwargs.get("cache")
        if cache is None:
            return False
        held_len = cache.get_seq_length()
        held = self._cached_assistant_ids[:held_len]
        new = assistant_input_ids[0]
        m = min(len(held), len(new))
        diff = (held[:m] != new[:m].to(held.device)).nonzero()
        keep = min(int(diff[0]) if len(diff) else m, len(new) - 1)  # at least one id left to run
        if keep < held_len:
            cache.crop(keep - held_len)  # a negative count removes that many positions
        return True

    UAG.get_candidates, UAG._update_past_and_masks = get_candidates, update_past_and_masks
    try:
        yield
    finally:
        UAG.get_candidates, UAG._update_past_and_masks = orig_get, orig_update


@torch.no_grad()
def measure(target, tok, texts: list[str], max_new: int, **assist) -> dict:
    """Greedy generation of every prompt; returns the outputs, timing and acceptance counts."""
    outs, seconds, new = [], 0.0, 0
    fix = universal_cache_fix() if "assistant_tokenizer" in assist else contextlib.nullcontext()
    with fix, count_acceptance() as stats:
        for text in texts:
            ids = tok(text, return_tensors="pt")
            t0 = time.perf_counter()
            got = target.generate(**ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                  **assist)
            seconds += time.perf_counter() - t0
            outs.append(got[0, ids["input_ids"].shape[1]:].tolist())
            new += len(outs[-1])
    return {"outputs": outs, "seconds": seconds, "new_tokens": new, **stats}


def compare(target, tok, drafts: list[tuple[str, object, object]], texts: list[str], max_new: int) -> list[dict]:
    """Rows for the target alone and for each draft ``(label, model, tokenizer or None)``."""
    measure(target, tok, texts[:1], 4)  # warm-up
    base = measure(target, tok, texts, max_new)
    rows = [{"system": "target alone (greedy)", "tokens_per_s": base["new_tokens"] / base["seconds"],
             "acceptance": None, "identical": True, **{k: base[k] for k in ("new_tokens", "seconds")}}]
    for label, draft, draft_tok in drafts:
        assist = {"assistant_model": draft}
        if draft_tok is not None:
            assist.update(tokenizer=tok, assistant_tokenizer=draft_tok)
        try:
            measure(target, tok, texts[:1], 4, **assist)
            r = measure(target, tok, texts, max_new, **assist)
        except RuntimeError as e:  # recorded, so that the other drafts' figures survive
            rows.append({"system": label, "tokens_per_s": None, "acceptance": None, "identical": None,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            continue
        rows.append({"system": label, "tokens_per_s": r["new_tokens"] / r["seconds"],
                     "acceptance": r["accepted"] / max(r["proposed"], 1), "proposed": r["proposed"],
                     "accepted": r["accepted"], "rounds": r["rounds"],
                     "identical": r["outputs"] == base["outputs"],
                     "identical_prompts": sum(a == b for a, b in zip(r["outputs"], base["outputs"])),
                     **{k: r[k] for k in ("new_tokens", "seconds")}})
    for row in rows:
        row.update(prompts=len(texts), max_new_tokens=max_new,
                   speedup=row["tokens_per_s"] / rows[0]["tokens_per_s"] if "error" not in row else None,
                   machine="shared 2-core CPU, float32 (timings indicative only)")
        for k in ("tokens_per_s", "acceptance", "seconds", "speedup"):
            if isinstance(row.get(k), float):
                row[k] = round(row[k], 4 if k == "acceptance" else 2)
    return rows


def tiny_setup():
    sys.path.append(str(ROOT / "tests"))
    from helpers import tiny_llama, tokenizer

    tok, dtok = tokenizer(TARGET), tokenizer(DRAFT)
    target = tiny_llama(len(tok), seed=0)
    same = tiny_llama(len(tok), seed=1)
    same.load_state_dict(target.state_dict())  # a draft identical to the target: accepts everything
    return target, tok, [("copy of the target (same vocabulary)", same, None),
                         ("other tokenizer (universal assisted)", tiny_llama(len(dtok), seed=2), dtok)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heal-steps", type=int, default=0, help="distillation steps with the target as teacher (0 = none)")
    ap.add_argument("--skip-build", action="store_true", help="use the drafts already under artifacts/runs/draft")
    ap.add_argument("--overwrite", action="store_true", help="rebuild the drafts even if they exist")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--build-only", action="store_true", help="transplant (and heal) the drafts, then stop")
    ap.add_argument("--tiny", action="store_true", help="random tiny models (plumbing check, seconds)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per row instead of a table")
    args = ap.parse_args()
    if args.heal_steps < 0 or args.prompts < 1 or args.max_new_tokens < 1:
        ap.error("--heal-steps must be >= 0, --prompts and --max-new-tokens >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    from surgery.loading import load_model, load_tokenizer

    if args.tiny:
        target, tok, drafts = tiny_setup()
    else:
        if args.skip_build:
            built = [("transplanted (omp)", RUNS / "smollm2-gemma3")]
            healed = sorted(RUNS.glob("smollm2-gemma3-healed/final/config.json"))
            built += [(heal_label(p.parent.parent), p.parent) for p in healed]
        else:
            built = build(args.heal_steps, args.overwrite)
            if args.build_only:
                return 0
        target, tok = load_model(TARGET), load_tokenizer(TARGET)
        drafts = [(f"assisted: SmolLM2-135M {label}", load_model(str(path)), None) for label, path in built]
        drafts.append(("universal assisted: original SmolLM2-135M", load_model(DRAFT), load_tokenizer(DRAFT)))
    rows = compare(target, tok, drafts, prompts(args.prompts), args.max_new_tokens)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        return 0
    print(f"\n{'system':<62} {'accept':>7} {'tok/s':>7} {'speedup':>7}  identical")
    for r in rows:
        if "error" in r:
            print(f"{r['system']:<62} failed: {r['error']}")
            continue
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"{r['system']:<62} {acc:>7} {r['tokens_per_s']:>7.2f} {r['speedup']:>6.2f}x  {r['identical']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
