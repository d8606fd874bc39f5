"""Benchmark: cross-tokenizer distillation losses — cost at real vocabulary sizes, and quality at a fixed budget.

(a) ``--part cost``: time and peak memory of every loss's own forward + backward at
    V_t = 262,144 (Gemma-3), V_s = 49,152 (SmolLM2), 4,096 positions per step (eight
    micro-batches of 512, so that no process passes ~6 GiB), with random logits and the real
    Gemma-3/SmolLM2 projection; ``kl`` runs on a single vocabulary of the teacher's size
    (V = 262,144 for both sides), the step-time reference. ``uld-exact`` is ULD with an exact
    full sort of all 262,144 teacher (and 49,152 student) probabilities — the reference of the
    "≤ 1/5 of a sorted-ULD term" target (timed on one micro-batch, scaled). Also ``pkl`` at several
    ``top_k`` (memory grows with top-k). Each measurement runs in its own subprocess
    (peak RSS is its own). One torch thread. Split into several locked runs with ``--cases``
    (``--reference`` reads the kl / uld-exact rows of an earlier run for the ratios).
(b) ``--part budget``: Gemma-3-270M → SmolLM2-135M on the shipped German text with the CPU
    recipe (recipes/distill_gemma3_to_smollm2.yaml), the same steps, data order and seed for
    ``ce``, ``uld``, ``gold``, ``pkl``, ``hkl``, ``tkl``; held-out student bits/byte at the end (and
    once at the start). One torch thread.

(c) ``--part signal``: the teacher's and the student's bits/byte on the training blocks as the trainer feeds
    them, and at chunk starts the student's and the projected teacher's cross-entropy on the student's actual
    next token (is the teacher's signal worth having?).

(d) ``--part coverage|diagnose|teacher``: the teacher's signal itself, in ``benchmarks/teacher_signal.py``.

Run: ``.venv/bin/python benchmarks/distillation.py [--part cost|budget|all|signal] [--steps N]``. One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from teacher_signal import run_coverage, run_diagnose, run_teacher  # noqa: E402  (--part coverage|diagnose|teacher)
VS, VT = 49152, 262144

COST_CHILD = r"""
import json, resource, sys, time, warnings
import numpy as np, torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from distill.losses import ChunkedBatch, LossContext, LossConfig, ProjectionOperator, make_loss
from distill.teacher_dist import TeacherDist
name, top_k, uld_topk, n_pos, micro, align_path, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], int(sys.argv[7])
VS, VT = 49152, 262144
vs = VT if name == "kl" else VS
ctx = LossContext(vs, VT)
if name in ("pkl", "pkl-t2s", "hkl", "gold", "tkl"):
    import scipy.sparse as sp
    d = np.load(align_path)
    W = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
    if name == "tkl":
        Wts = sp.csr_matrix((d["r_data"], d["r_indices"], d["r_indptr"]), shape=tuple(d["r_shape"]))
        ctx = LossContext(VS, VT, projection=ProjectionOperator.rows_of(Wts))
    elif name in ("pkl", "pkl-t2s"):
        ctx = LossContext(VS, VT, projection=ProjectionOperator(W))
    else:
        ctx = LossContext.with_pairs(VS, VT, d["pairs_s"] if name == "hkl" else d["exact_s"],
                                     d["pairs_t"] if name == "hkl" else d["exact_t"], "cpu")
project = "student_to_teacher"
if name == "pkl-t2s":  # pkl with the teacher projected onto first student pieces (auto on Gemma-3 -> SmolLM2)
    import scipy.sparse as sp
    d = np.load(align_path)
    F = sp.csr_matrix((d["f_data"], d["f_indices"], d["f_indptr"]), shape=tuple(d["f_shape"]))
    ctx.down_projection = ProjectionOperator.rows_of(F)
    name, project = "pkl", "teacher_to_student"
loss = make_loss(name, LossConfig(top_k=top_k, uld_topk=uld_topk, project=project), ctx)
g = torch.Generator().manual_seed(0)
def batch():
    if name == "kl":  # one tokenizer: every chunk is one position on each side
        zs = (torch.randn(micro, vs, generator=g) * 3).requires_grad_()
        zt = torch.randn(micro, VT, generator=g) * 3
        idx = torch.arange(micro)
        return ChunkedBatch(zs, idx, TeacherDist(VT, logits=zt), idx, micro)
    # one chunk per 1.25 positions on average: most chunks 1:1, some 2:1 / 1:2
    rng = np.random.default_rng(0)
    sizes_s = rng.choice([1, 1, 1, 2], size=micro); sizes_t = rng.choice([1, 1, 1, 2], size=micro)
    C = micro
    cs = np.repeat(np.arange(C), sizes_s)[:micro]; ct = np.repeat(np.arange(C), sizes_t)[:micro]
    C = int(min(cs.max(), ct.max())) + 1
    cs = np.where(cs < C, cs, C - 1); ct = np.where(ct < C, ct, C - 1)
    zs = (torch.randn(micro, vs, generator=g) * 3).requires_grad_()
    zt = torch.randn(micro, VT, generator=g) * 3
    return ChunkedBatch(zs, torch.from_numpy(cs), TeacherDist(VT, logits=zt), torch.from_numpy(ct), C)
b = batch()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # process + inputs of one micro-batch
out = loss(b); out.backward()  # warm-up
times = []
for _ in range(reps):
    steps = 0.0
    for m in range(n_pos // micro):
        b = batch()
        t0 = time.perf_counter()
        out = loss(b); out.backward()
        steps += time.perf_counter() - t0
    times.append(steps)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": min(times), "peak_rss_gib": round(peak / 1024**2, 3), "inputs_rss_gib": round(base / 1024**2, 3),
                  "loss_extra_rss_gib": round((peak - base) / 1024**2, 3),
                  "value": float(out)}))
"""


def save_alignment_arrays(path: Path) -> None:
    """Real Gemma-3/SmolLM2 projection (student rows) plus H-KL and exact pairs, as one .npz."""
    import numpy as np

    from surgery.loading import load_tokenizer
    from surgery.vocab.projection import build_projection, exact_pairs, hkl_pairs
    from surgery.vocab.surfaces import canonical_vocabulary

    sv = canonical_vocabulary(load_tokenizer("smollm2-135m"))
    tv = canonical_vocabulary(load_tokenizer("gemma3-270m"))
    P = build_projection(sv, tv)
    ps, pt = hkl_pairs(P)
    es, et = exact_pairs(sv, tv)
    W = P.matrix.tocsr()
    R = build_projection(tv, sv).matrix.tocsr()  # teacher rows, for tkl
    from distill.losses import first_piece_projection

    Fp = first_piece_projection(tv, sv).matrix.tocsr()  # teacher rows, first pieces: pkl teacher→student
    np.savez(path, data=W.data, indices=W.indices, indptr=W.indptr, shape=np.array(W.shape), pairs_s=ps, pairs_t=pt,
             exact_s=es, exact_t=et, r_data=R.data, r_indices=R.indices, r_indptr=R.indptr, r_shape=np.array(R.shape),
             f_data=Fp.data, f_indices=Fp.indices, f_indptr=Fp.indptr, f_shape=np.array(Fp.shape))
    print(json.dumps({"benchmark": "distill_projection", "V_s": W.shape[0], "V_t": W.shape[1], "nnz": int(W.nnz),
                      "hkl_pairs": int(len(ps)), "exact_pairs": int(len(es))}), flush=True)


COST_CASES = [("kl", 8192, 0), ("uld-exact", 0, 0), ("pkl", 8192, 0), ("pkl-t2s", 8192, 0), ("tkl", 8192, 0),
              ("hkl", 0, 8192),
              ("gold", 0, 8192), ("uld", 0, 8192), ("pkl", 1024, 0), ("pkl", 32768, 0)]


def _reference_seconds(path: str | None) -> dict[str, float]:
    """``{"kl": s, "uld-exact": s}`` from an earlier ``--part cost`` JSONL (to split runs across locked slots)."""
    out: dict[str, float] = {}
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("benchmark") == "distill_loss_cost" and row.get("loss") in ("kl", "uld-exact"):
                out[row["loss"]] = row["seconds_per_step"]
    return out


def run_cost(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        align = Path(tmp) / "align.npz"
        cases = [c for c in COST_CASES if not (args.skip_exact_uld and c[0] == "uld-exact")]
        if args.cases:  # "pkl" = every pkl case, "pkl@8192" = that top_k only
            cases = [c for c in cases if c[0] in args.cases or f"{c[0]}@{c[1] or c[2]}" in args.cases]
        if any(c[0] in ("pkl", "pkl-t2s", "tkl", "hkl", "gold") for c in cases):
            save_alignment_arrays(align)
        ref = _reference_seconds(args.reference)
        for label, k, uk in cases:
            name = "uld" if label == "uld-exact" else label  # pkl-t2s: the child switches to pkl
            exact = label == "uld-exact"
            n_pos = args.micro if exact else args.positions  # the exact sort is slow: one micro-batch, scaled
            reps = 1 if exact else args.reps
            env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
            r = subprocess.run([sys.executable, "-c", COST_CHILD, name, str(k), str(uk), str(n_pos), str(args.micro),
                                str(align), str(reps)], capture_output=True, text=True, env=env, cwd=ROOT)
            if r.returncode:
                print(json.dumps({"benchmark": "distill_loss_cost", "loss": label, "error": r.stderr[-500:]}), flush=True)
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            secs = d["seconds"] * (args.positions / n_pos)
            row = {"benchmark": "distill_loss_cost", "loss": label,
                   "V_s": VT if name == "kl" else VS, "V_t": VT, "positions": args.positions, "micro_batch": args.micro,
                   "top_k": k if name in ("pkl", "pkl-t2s", "tkl") else None, "uld_topk": uk if name in ("uld", "hkl", "gold") else None,
                   "seconds_per_step": round(secs, 3), "peak_rss_gib": d["peak_rss_gib"],
                   "loss_extra_rss_gib": d["loss_extra_rss_gib"],
                   "extrapolated_from_positions": n_pos if n_pos != args.positions else None, "threads": 1}
            if label in ("kl", "uld-exact"):
                ref[label] = secs
            if "kl" in ref:
                row["relative_to_kl"] = round(secs / ref["kl"], 3)
            if "uld-exact" in ref:
                row["relative_to_exact_uld"] = round(secs / ref["uld-exact"], 3)
            print(json.dumps(row), flush=True)


def run_signal(args) -> None:
    """Is the teacher's signal worth having? Measured on the training blocks exactly as the trainer feeds them.

    Prints (a) each model's bits/byte on the first ``--signal-blocks`` blocks of the training order
    (start token + ``max_tokens`` tokens, the bytes each side actually covers), and (b) at the student
    positions that start a chunk (where ``pkl`` teacher → student applies), the cross-entropy of the
    student's actual next token under the student itself and under the projected teacher target
    (first-piece projection, the batch's top-k teacher columns, renormalized).
    """
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from distill.chunks import align_chunks, position_chunks
    from distill.data import BlockOrder, encode_blocks, load_documents, make_blocks
    from distill.losses import build_context, normalize_rows, projected_teacher_target
    from distill.teacher_dist import TeacherDist
    from distill.trainer.distill_task import keep_positions
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    docs = load_documents(str(ROOT / "artifacts" / "texts" / "debian-reference.de.train.txt"))
    blocks = make_blocks(docs, args.block_chars, False)
    texts = [blocks[i] for i in BlockOrder(len(blocks), 0, True).take(0, args.signal_blocks)]
    names = {"student": "smollm2-135m", "teacher": "gemma3-270m"}
    toks = {k: load_tokenizer(v) for k, v in names.items()}
    vocabs = {k: canonical_vocabulary(toks[k], v) for k, v in names.items()}
    models = {k: load_model(v).eval() for k, v in names.items()}
    P = build_context("pkl", vocabs["student"], vocabs["teacher"], "cpu").down_projection
    bits = {k: 0.0 for k in names}
    covered = {k: 0 for k in names}
    ce_student, ce_target = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 4):
            tx = texts[i:i + 4]
            enc = {k: encode_blocks(tx, toks[k], vocabs[k], args.max_tokens) for k in names}
            logits = {}
            for k in names:
                lg = models[k](input_ids=enc[k].input_ids, attention_mask=enc[k].attention_mask).logits.float()
                logits[k] = lg[..., :len(vocabs[k])]
                ce = F.cross_entropy(logits[k].reshape(-1, logits[k].shape[-1]), enc[k].labels.reshape(-1),
                                     ignore_index=-100, reduction="sum")
                bits[k] += float(ce) / math.log(2)
                covered[k] += int(enc[k].ends.max(1).sum())
            se, te = enc["student"], enc["teacher"]
            al = align_chunks(se.ends, se.valid, te.ends, te.valid)
            ps = keep_positions(position_chunks(al.chunk_a), "first").reshape(-1)
            pt = keep_positions(position_chunks(al.chunk_b), "first").reshape(-1)
            t_of = {int(pt[j]): j for j in np.flatnonzero(pt >= 0)}
            pairs = [(j, t_of[int(ps[j])]) for j in np.flatnonzero(ps >= 0) if int(ps[j]) in t_of]
            sj = torch.tensor([a for a, _ in pairs]); tj = torch.tensor([b for _, b in pairs])
            labels = se.labels.reshape(-1)[sj]
            ok = labels >= 0
            sj, tj, labels = sj[ok], tj[ok], labels[ok]
            logq = torch.log_softmax(logits["student"].reshape(-1, len(vocabs["student"]))[sj], -1)
            tdist = TeacherDist(len(vocabs["teacher"]), logits=logits["teacher"].reshape(-1, len(vocabs["teacher"]))[tj])
            tgt, _ = normalize_rows(projected_teacher_target(tdist, P, 8192))  # one row per chunk (first positions)
            ce_student += (-logq.gather(1, labels[:, None])[:, 0]).tolist()
            ce_target += (-torch.log(tgt.gather(1, labels[:, None])[:, 0].clamp_min(1e-12))).tolist()
    row = {"benchmark": "distill_signal", "text": "debian-reference.de (training blocks)", "blocks": len(texts),
           "max_tokens": args.max_tokens}
    for k, v in names.items():
        print(json.dumps({**row, "model": v, "role": k, "bits_per_byte": round(bits[k] / covered[k], 4),
                          "bytes_covered_per_block": round(covered[k] / len(texts), 1)}), flush=True)
    print(json.dumps({**row, "positions": len(ce_student), "where": "chunk starts (pkl teacher->student)",
                      "student_nats_on_actual_next_token": round(float(np.mean(ce_student)), 3),
                      "projected_teacher_nats_on_actual_next_token": round(float(np.mean(ce_target)), 3)}), flush=True)


def run_budget(args) -> None:
    from surgery.config import load_config

    from distill.config import DistillConfig
    from distill.trainer import train

    out_root = ROOT / "artifacts" / "runs" / "bench-distill"
    t_all = time.time()
    start = None
    for i, name in enumerate(args.losses):
        overrides = [f"output_dir={out_root / (name + args.tag)}", f"loss.name={name}", f"train.steps={args.steps}",
                     f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch}",
                     f"data.block_chars={args.block_chars}", f"data.max_tokens={args.max_tokens}", f"train.lr={args.lr}",
                     f"train.warmup_steps={args.warmup}", f"train.eval_every={args.eval_every}", f"train.eval_max_bytes={args.eval_bytes}",
                     *([f"data.max_blocks={args.max_blocks}"] if args.max_blocks else []),
                     "train.checkpoint_every=0", "train.threads=1", "train.seed=0", "train.progress=false",
                     f"train.eval_at_start={'true' if i == 0 else 'false'}", *args.set]
        cfg = load_config(DistillConfig, ROOT / "recipes" / "distill_gemma3_to_smollm2.yaml", overrides)
        t0 = time.time()
        r = train(cfg, overwrite=True)
        if r.heldout_bpb_start is not None:
            start = r.heldout_bpb_start
        rows = [json.loads(l) for l in (r.output_dir / "metrics.jsonl").read_text().splitlines()]
        tr = [x for x in rows if x.get("event") == "train"]
        print(json.dumps({"benchmark": "distill_fixed_budget", "teacher": "gemma3-270m", "student": "smollm2-135m",
                          "text": "debian-reference.de", "loss": name + args.tag, "steps": args.steps,
                          "blocks_per_step": args.batch, "corpus_blocks": args.max_blocks, "max_tokens": args.max_tokens, "lr": args.lr,
                          "heldout_bytes": args.eval_bytes, "overrides": args.set, "heldout_bpb_start": start,
                          "heldout_bpb_end": r.heldout_bpb_end, "final_train_ce": tr[-1]["ce"] if tr else None,
                          "seconds": round(time.time() - t0, 1), "threads": 1}), flush=True)
    print(json.dumps({"benchmark": "distill_fixed_budget_total", "seconds": round(time.time() - t_all, 1)}), flush=True)
    if args.plot:
        plot_budget(out_root, [n + args.tag for n in args.losses], Path(args.plot))


def plot_budget(out_root: Path, losses: list[str], png: Path) -> Path | None:
    """One PNG for the whole comparison: student CE (left) and held-out bits/byte (right) per loss, over steps.

    Reads each run's ``metrics.jsonl`` (the trainer's own log, the same rows its per-run ``metrics.png`` shows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    start = None
    for name in losses:
        path = out_root / name / "metrics.jsonl"  # name may carry a --tag suffix
        if not path.exists():
            continue
        rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
        tr = [r for r in rows if r.get("event") == "train"]
        ev = [r for r in rows if r.get("event") == "eval"]
        start = next((r["heldout_bpb"] for r in ev if r["step"] == 0), start)
        if start is not None and not any(r["step"] == 0 for r in ev):
            ev = [{"step": 0, "heldout_bpb": start}] + ev
        axes[0].plot([r["step"] for r in tr], [r["ce"] for r in tr], label=name, lw=1.2)
        axes[1].plot([r["step"] for r in ev], [r["heldout_bpb"] for r in ev], marker="o", ms=3, label=name, lw=1.2)
    axes[0].set_xlabel("step"); axes[0].set_ylabel("student CE (nats/token)"); axes[0].set_title("training batch CE")
    axes[1].set_xlabel("step"); axes[1].set_ylabel("bits/byte"); axes[1].set_title("held-out bits/byte (student)")
    axes[1].legend(fontsize=7)
    fig.suptitle("Gemma-3-270M → SmolLM2-135M, German, fixed budget", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["cost", "budget", "all", "plot", "signal", "diagnose", "teacher", "coverage"], default="all",
                   help="plot: only redraw --plot from the run folders of --losses (with their --tag)")
    p.add_argument("--positions", type=int, default=4096)
    p.add_argument("--micro", type=int, default=512)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--skip-exact-uld", action="store_true")
    p.add_argument("--cases", nargs="*", default=None,
                   help="--part cost: only these cases (kl, uld-exact, pkl, tkl, hkl, gold, uld); split long runs")
    p.add_argument("--reference", default=None, metavar="JSONL",
                   help="--part cost: earlier output holding the kl / uld-exact rows, for the ratios of a split run")
    p.add_argument("--losses", nargs="+", default=["ce", "uld", "gold", "pkl", "hkl", "tkl"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--signal-blocks", type=int, default=48, help="--part signal: training blocks measured")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--block-chars", type=int, default=400)
    p.add_argument("--max-blocks", type=int, default=None,
                   help="train on only the first N blocks of the German text, repeated over epochs (data-limited)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eval-bytes", type=int, default=8000)
    p.add_argument("--tag", default="", help="--part budget: suffix of the run folders and loss labels (variants)")
    p.add_argument("--eval-every", type=int, default=4, help="held-out bits/byte every N steps (for the plot)")
    p.add_argument("--plot", default=None, metavar="PNG", help="--part budget: write the comparison plot here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides for every run of --part budget (e.g. loss.ce_weight=1.0)")
    p.add_argument("--seed", type=int, default=0, help="--part teacher: seed of the data order (train.seed)")
    p.add_argument("--self-student", default=None, metavar="DIR",
                   help="--part diagnose/budget: SmolLM2-135M transplanted to the Llama-3 tokenizer "
                        "(surgery transplant smollm2-135m llama3-tokenizer DIR), taught by the original")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.part in ("cost", "all"):
        run_cost(args)
    if args.part in ("budget", "all"):
        run_budget(args)
    if args.part == "signal":
        run_signal(args)
    if args.part == "diagnose":
        run_diagnose(args)
    if args.part == "teacher":
        run_teacher(args)
    if args.part == "coverage":
        run_coverage(args)
    if args.part == "plot":
        plot_budget(ROOT / "artifacts" / "runs" / "bench-distill", [n + args.tag for n in args.losses],
                    Path(args.plot or ROOT / "docs" / "distill_budget.png"))


if __name__ == "__main__":
    main()
