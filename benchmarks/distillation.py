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


DIAG_CASES = {  # case -> (student, teacher, text stem); "self" takes the transplanted student from --self-student
    "de": ("smollm2-135m", "gemma3-270m", "debian-reference.de"),
    "zh": ("smollm2-135m", "gemma3-270m", "debian-reference.zh"),
    "ja": ("smollm2-135m", "gemma3-270m", "debian-reference.ja"),
    "self": (None, "smollm2-135m", "debian-reference.en"),
}


def _flat_grad(loss, z):
    import torch

    (g,) = torch.autograd.grad(loss, z, retain_graph=True)
    return g


def run_diagnose(args) -> None:
    """Why does the teacher's signal lose (or win) against CE? Per-position diagnostics on the training blocks.

    For each case (``--cases``: de, zh, ja, self) and the first ``--max-blocks`` (default 48) training blocks, with
    the *initial* student and the recipe's loss settings, prints one JSON line with:

    - coverage: the fraction of the student's predicted tokens that receive a distillation signal — chunk starts
      (``pkl``/``hkl`` with ``chunk_positions=first``) against every token of a comparable chunk (``alm``);
    - helps/hurts at chunk starts: how often the projected teacher target (``pkl``'s target, first-piece
      projection when the teacher is coarser, as ``project=auto`` chooses) gives the student's *actual* next
      token more probability than the student does, and the mean nats of both, split by chunk shape
      (one token on each side vs longer chunks);
    - mass lost in projection: the teacher's mass on the compared columns (what ``pkl`` keeps before
      renormalizing) and on teacher tokens some student token maps to;
    - scale: each term's value and gradient norm w.r.t. the student logits (per token of the batch), the
      factor ``rescale_kd`` applies (CE/KD), the rescaled KD gradient norm against CE's, and the cosine between
      the KD and CE gradients;
    - alm: how often the teacher's chunk likelihood beats the student's, and the bits/byte of both on the
      compared chunks.
    """
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from distill.chunks import align_chunks, position_chunks
    from distill.data import encode_blocks, load_documents, make_blocks
    from distill.losses import ChunkedBatch, LossConfig, build_context, make_loss, normalize_rows, \
        projected_teacher_target
    from distill.losses.alm import complete_chunks, target_log_probs
    from distill.teacher_dist import TeacherDist
    from distill.trainer.distill_task import keep_positions, teacher_is_coarser
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    torch.set_num_threads(1)
    n_blocks = args.max_blocks or 48
    for case in args.cases or ["de", "zh", "self"]:
        s_name, t_name, stem = DIAG_CASES[case]
        s_name = s_name or args.self_student
        if not s_name:
            print(json.dumps({"benchmark": "distill_diagnose", "case": case, "error": "needs --self-student"}))
            continue
        t0 = time.time()
        docs = load_documents(str(ROOT / "artifacts" / "texts" / f"{stem}.train.txt"))
        texts = make_blocks(docs, args.block_chars, False)[:n_blocks]
        names = {"student": s_name, "teacher": t_name}
        toks = {k: load_tokenizer(v) for k, v in names.items()}
        vocabs = {k: canonical_vocabulary(toks[k], v) for k, v in names.items()}
        models = {k: load_model(v).eval() for k, v in names.items()}
        sv, tv = vocabs["student"], vocabs["teacher"]
        lc = LossConfig(top_k=8192, uld_topk=256)
        ctx_pkl = build_context("pkl", sv, tv, "cpu")
        losses = {"pkl": make_loss("pkl", lc, ctx_pkl),
                  "hkl": make_loss("hkl", lc, build_context("hkl", sv, tv, "cpu", hkl_threshold=lc.hkl_threshold)),
                  "alm": make_loss("alm", lc, build_context("alm", sv, tv, "cpu"))}
        acc: dict[str, list] = {}

        def add(key, val):
            acc.setdefault(key, []).append(val)

        for i in range(0, len(texts), 4):
            tx = texts[i:i + 4]
            se, te = (encode_blocks(tx, toks[k], vocabs[k], args.max_tokens) for k in ("student", "teacher"))
            with torch.no_grad():
                zs0 = models["student"](input_ids=se.input_ids, attention_mask=se.attention_mask).logits.float()
                zt = models["teacher"](input_ids=te.input_ids, attention_mask=te.attention_mask).logits.float()
            B, Ls = se.input_ids.shape
            zs = zs0[..., :len(sv)].reshape(B * Ls, len(sv)).clone().requires_grad_()
            zt = zt[..., :len(tv)].reshape(B * te.input_ids.shape[1], len(tv))
            labels, t_labels = se.labels.reshape(-1), te.labels.reshape(-1)
            n_tok = int((labels >= 0).sum())
            ce = F.cross_entropy(zs, labels, ignore_index=-100)
            g_ce = _flat_grad(ce, zs)
            add("ce", float(ce)); add("gnorm_ce", float(g_ce.norm()))
            al = align_chunks(se.ends, se.valid, te.ends, te.valid)
            coarser = teacher_is_coarser(se, te)
            full = TeacherDist(len(tv), logits=zt)
            pc_s, pc_t = position_chunks(al.chunk_a), position_chunks(al.chunk_b)
            for name, loss in losses.items():
                mode = "mean" if name == "alm" else "first"
                ps = torch.from_numpy(keep_positions(pc_s, mode)); pt = torch.from_numpy(keep_positions(pc_t, mode))
                sel_s, sel_t = torch.nonzero(ps >= 0)[:, 0], torch.nonzero(pt >= 0)[:, 0]
                batch = ChunkedBatch(zs[sel_s], ps[sel_s], full.select(sel_t), pt[sel_t], al.n_chunks, None, coarser)
                if name == "alm":
                    batch.student_targets = labels[sel_s]
                    batch.teacher_target_logp = target_log_probs(full, t_labels)[sel_t]
                    batch.chunk_complete = torch.from_numpy(complete_chunks(al.chunk_a, pc_s, al.n_chunks)
                                                            & complete_chunks(al.chunk_b, pc_t, al.n_chunks))
                    log_t, log_s, valid = loss.chunk_log_likelihoods(batch)
                    covered = np.isin(pc_s.reshape(-1), np.flatnonzero(batch.chunk_complete.numpy()))
                    add("alm_chunks", int(valid.sum()))
                    add("alm_teacher_better", int(((log_t > log_s) & valid).sum()))
                    add("alm_teacher_nats", float(-(log_t * valid).sum())); add("alm_student_nats", float(-(log_s.detach() * valid).sum()))
                else:
                    covered = ps.numpy() >= 0
                add(f"covered_{name}", int((covered & (labels.numpy() >= 0)).sum()))
                kd = loss(batch)
                g = _flat_grad(kd, zs)
                scale = float(ce.detach() / kd.detach().clamp_min(1e-8))
                add(f"kd_{name}", float(kd)); add(f"gnorm_{name}", float(g.norm()))
                add(f"gnorm_rescaled_{name}", float(g.norm()) * scale)
                add(f"cos_{name}", float(F.cosine_similarity(g.reshape(1, -1), g_ce.reshape(1, -1))[0]))
            add("tokens", n_tok)
            # pkl's target at chunk starts against the student's actual next token
            ps = keep_positions(pc_s, "first"); pt = keep_positions(pc_t, "first")
            t_of = {int(pt[j]): j for j in np.flatnonzero(pt >= 0)}
            pairs = [(j, t_of[int(ps[j])]) for j in np.flatnonzero(ps >= 0) if int(ps[j]) in t_of]
            sj = torch.tensor([a for a, _ in pairs]); tj = torch.tensor([b for _, b in pairs])
            lab = labels[sj]; ok = lab >= 0
            sj, tj, lab = sj[ok], tj[ok], lab[ok]
            n_s = np.bincount(al.chunk_a[al.chunk_a >= 0], minlength=al.n_chunks)
            n_t = np.bincount(al.chunk_b[al.chunk_b >= 0], minlength=al.n_chunks)
            one = torch.from_numpy((n_s == 1) & (n_t == 1))[torch.from_numpy(ps[sj.numpy()])]
            with torch.no_grad():
                logq = torch.log_softmax(zs.detach()[sj], -1).gather(1, lab[:, None])[:, 0]
                tsel = full.select(tj)
                if coarser:  # pkl project=auto: teacher -> first student pieces
                    raw = projected_teacher_target(tsel, ctx_pkl.down_projection, lc.top_k)
                    kept = raw.sum(-1)
                    tgt, _ = normalize_rows(raw)
                    logp = torch.log(tgt.gather(1, lab[:, None])[:, 0].clamp_min(1e-12))
                else:  # student -> teacher: how much teacher mass the student can reach at all
                    _, row_mass = tsel.masses(ctx_pkl.projection.reachable)
                    kept = row_mass
                    logp = None
            add("target_mass_kept", float(kept.sum())); add("starts", int(len(sj)))
            if logp is not None:
                for tag, m in (("one_to_one", one), ("longer", ~one)):
                    add(f"n_{tag}", int(m.sum()))
                    add(f"helps_{tag}", int((logp[m] > logq[m]).sum()))
                    add(f"target_nats_{tag}", float(-logp[m].sum())); add(f"student_nats_{tag}", float(-logq[m].sum()))
        S = {k: float(np.sum(v)) for k, v in acc.items()}
        M = {k: float(np.mean(v)) for k, v in acc.items()}
        row = {"benchmark": "distill_diagnose", "case": case, "student": s_name, "teacher": t_name,
               "text": f"{stem}.train (first {len(texts)} blocks)", "max_tokens": args.max_tokens,
               "teacher_coarser": bool(coarser), "pkl_projects": "teacher->student" if coarser else "student->teacher",
               "student_tokens": int(S["tokens"]),
               "coverage_chunk_starts": round(S["covered_pkl"] / S["tokens"], 3),
               "coverage_alm": round(S["covered_alm"] / S["tokens"], 3),
               "teacher_mass_kept_by_projection": round(S["target_mass_kept"] / S["starts"], 3),
               "ce": round(M["ce"], 3)}
        for name in losses:
            row[f"{name}_value"] = round(M[f"kd_{name}"], 4)
            row[f"{name}_grad_norm_over_ce"] = round(M[f"gnorm_{name}"] / M["gnorm_ce"], 3)
            row[f"{name}_rescaled_grad_norm_over_ce"] = round(M[f"gnorm_rescaled_{name}"] / M["gnorm_ce"], 3)
            row[f"{name}_cos_with_ce_grad"] = round(M[f"cos_{name}"], 3)
        for tag in ("one_to_one", "longer"):
            if S.get(f"n_{tag}"):
                row[f"starts_{tag}"] = int(S[f"n_{tag}"])
                row[f"target_better_on_actual_token_{tag}"] = round(S[f"helps_{tag}"] / S[f"n_{tag}"], 3)
                row[f"target_nats_{tag}"] = round(S[f"target_nats_{tag}"] / S[f"n_{tag}"], 3)
                row[f"student_nats_{tag}"] = round(S[f"student_nats_{tag}"] / S[f"n_{tag}"], 3)
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        row.update({"alm_chunks": int(S["alm_chunks"]),
                    "alm_teacher_better_chunks": round(S["alm_teacher_better"] / S["alm_chunks"], 3),
                    "alm_teacher_nats_per_chunk": round(S["alm_teacher_nats"] / S["alm_chunks"], 3),
                    "alm_student_nats_per_chunk": round(S["alm_student_nats"] / S["alm_chunks"], 3),
                    "seconds": round(time.time() - t0, 1), "threads": 1})
        print(json.dumps(row), flush=True)
        del models


def run_coverage(args) -> None:
    """Chunk-start coverage from the tokenizers alone (no model; ``--part coverage``).

    On the first ``--max-blocks`` (default 28) training blocks of each case, as the trainer encodes them
    (``--max-tokens`` per side): the fraction of the student's predicted tokens that receive a distillation
    signal under ``pkl``/``hkl`` (chunk starts, ``chunk_positions=first``) and under ``alm`` (every token of a
    chunk whose tokens are all predicted on both sides), chunk shapes, and the bytes each side covers.
    """
    import numpy as np

    from distill.chunks import align_chunks, position_chunks
    from distill.data import encode_blocks, load_documents, make_blocks
    from distill.losses.alm import complete_chunks
    from distill.trainer.distill_task import keep_positions
    from surgery.loading import load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    for case in args.cases or ["de", "zh", "ja"]:
        s_name, t_name, stem = DIAG_CASES[case]
        s_name = s_name or args.self_student or "llama3-tokenizer"
        st, tt = load_tokenizer(s_name), load_tokenizer(t_name)
        sv, tv = canonical_vocabulary(st, s_name), canonical_vocabulary(tt, t_name)
        docs = load_documents(str(ROOT / "artifacts" / "texts" / f"{stem}.train.txt"))
        blocks = make_blocks(docs, args.block_chars, False)[:args.max_blocks or 28]
        se, te = encode_blocks(blocks, st, sv, args.max_tokens), encode_blocks(blocks, tt, tv, args.max_tokens)
        al = align_chunks(se.ends, se.valid, te.ends, te.valid)
        pc_s, pc_t = position_chunks(al.chunk_a), position_chunks(al.chunk_b)
        lab = se.labels.reshape(-1).numpy() >= 0
        starts = keep_positions(pc_s, "first") >= 0
        comp = complete_chunks(al.chunk_a, pc_s, al.n_chunks) & complete_chunks(al.chunk_b, pc_t, al.n_chunks)
        in_alm = np.isin(pc_s.reshape(-1), np.flatnonzero(comp))
        ns = np.bincount(al.chunk_a[al.chunk_a >= 0], minlength=al.n_chunks)
        nt = np.bincount(al.chunk_b[al.chunk_b >= 0], minlength=al.n_chunks)
        print(json.dumps({"benchmark": "distill_coverage", "case": case, "student_tokenizer": s_name,
                          "teacher_tokenizer": t_name, "text": f"{stem}.train (first {len(blocks)} blocks)",
                          "max_tokens": args.max_tokens, "student_predicted_tokens": int(lab.sum()),
                          "coverage_chunk_starts": round(float((starts & lab).sum() / lab.sum()), 3),
                          "coverage_alm": round(float((in_alm & lab).sum() / lab.sum()), 3),
                          "one_to_one_chunks": round(float(((ns == 1) & (nt == 1)).mean()), 3),
                          "student_tokens_per_chunk": round(float(ns.mean()), 2),
                          "teacher_tokens_per_chunk": round(float(nt.mean()), 2),
                          "student_bytes_covered": int(se.ends.max(1).sum()),
                          "teacher_bytes_covered": int(te.ends.max(1).sum())}), flush=True)


def run_teacher(args) -> None:
    """Data-limited comparison of the teacher's signal on several cases with one recipe (``--part teacher``).

    For each case of ``--cases`` (de, zh, ja: Gemma-3-270M → SmolLM2-135M on that language's shipped text;
    self: the original SmolLM2-135M teaching its Llama-3-tokenizer transplant, ``--self-student``, on English) and
    each loss of ``--losses``: the recipe recipes/distill_gemma3_to_smollm2.yaml with the first ``--max-blocks``
    blocks of the case's train text, ``--steps`` steps, the same data order and seed; held-out bits/byte of the
    student at the start and the end on the case's held-out text. ``--set`` overrides apply to every run.
    """
    from surgery.config import load_config

    from distill.config import DistillConfig
    from distill.trainer import train

    out_root = ROOT / "artifacts" / "runs" / "bench-distill-teacher"
    for case in args.cases or ["de", "zh"]:
        s_name, t_name, stem = DIAG_CASES[case]
        s_name = s_name or args.self_student
        texts = ROOT / "artifacts" / "texts"
        start = None
        for i, name in enumerate(args.losses):
            out = out_root / f"{case}-{name}{args.tag}"
            overrides = [f"output_dir={out}", f"loss.name={name}", f"train.steps={args.steps}",
                         f"student.model={s_name}", f"teachers.0.model={t_name}",
                         f"data.train={texts / (stem + '.train.txt')}", f"data.heldout={texts / (stem + '.heldout.txt')}",
                         f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch}",
                         f"data.block_chars={args.block_chars}", f"data.max_tokens={args.max_tokens}",
                         f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}", f"train.eval_every={args.eval_every}",
                         f"train.eval_max_bytes={args.eval_bytes}",
                         *([f"data.max_blocks={args.max_blocks}"] if args.max_blocks else []),
                         "train.checkpoint_every=0", "train.threads=1", "train.seed=0", "train.progress=false",
                         f"train.eval_at_start={'true' if i == 0 else 'false'}",
                         *[x for x in args.set if not (name == "ce" and x.startswith("cache."))]]  # ce: no teacher
            cfg = load_config(DistillConfig, ROOT / "recipes" / "distill_gemma3_to_smollm2.yaml", overrides)
            t0 = time.time()
            r = train(cfg, overwrite=True)
            if r.heldout_bpb_start is not None:
                start = r.heldout_bpb_start
            rows = [json.loads(l) for l in (r.output_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
            tr = [x for x in rows if x.get("event") == "train"]
            print(json.dumps({"benchmark": "distill_teacher", "case": case, "teacher": t_name, "student": s_name,
                              "text": stem, "loss": name + args.tag, "steps": args.steps,
                              "blocks_per_step": args.batch, "corpus_blocks": args.max_blocks,
                              "block_chars": args.block_chars, "max_tokens": args.max_tokens, "lr": args.lr,
                              "heldout_bytes": args.eval_bytes, "overrides": args.set, "heldout_bpb_start": start,
                              "heldout_bpb_end": r.heldout_bpb_end, "final_train_ce": tr[-1]["ce"] if tr else None,
                              "seconds": round(time.time() - t0, 1), "threads": 1,
                              "note": "measured on a shared 2-core machine"}), flush=True)


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
