"""The teacher's signal in cross-tokenizer distillation, measured (``benchmarks/distillation.py --part
coverage|diagnose|teacher`` runs these).

- :func:`run_coverage` — tokenizers only: which student positions a chunk-start loss (pkl/hkl) and ``alm`` reach;
- :func:`run_diagnose` — the initial student against its teacher: projection mass, per-position advantage of the
  projected target, the scale and direction of each KD gradient against CE's;
- :func:`run_teacher` — data-limited runs of one recipe with each loss (held-out bits/byte at start and end).

Cases (``--cases``): de, zh, ja (Gemma-3-270M teaching SmolLM2-135M on that language's shipped text) and self (the
original SmolLM2-135M teaching its Llama-3-tokenizer transplant, ``--self-student DIR``, on English).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    blocks of the case's train text, ``--steps`` steps, the same data order and seed (``--seed``: the data order, the
    same for every loss of a run); held-out bits/byte of the
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
            seed_tag = f"-seed{args.seed}" if args.seed else ""
            out = out_root / f"{case}-{name}{args.tag}{seed_tag}"
            overrides = [f"output_dir={out}", f"loss.name={name}", f"train.steps={args.steps}",
                         f"student.model={s_name}", f"teachers.0.model={t_name}",
                         f"data.train={texts / (stem + '.train.txt')}", f"data.heldout={texts / (stem + '.heldout.txt')}",
                         f"train.batch_size={args.batch}", f"train.micro_batch_size={args.micro_batch}",
                         f"data.block_chars={args.block_chars}", f"data.max_tokens={args.max_tokens}",
                         f"train.lr={args.lr}", f"train.warmup_steps={args.warmup}", f"train.eval_every={args.eval_every}",
                         f"train.eval_max_bytes={args.eval_bytes}",
                         *([f"data.max_blocks={args.max_blocks}"] if args.max_blocks else []),
                         "train.checkpoint_every=0", "train.threads=1", f"train.seed={args.seed}",
                         "train.progress=false", f"train.eval_at_start={'true' if i == 0 else 'false'}",
                         *[x for x in args.set if not (name == "ce" and x.startswith("cache."))]]  # ce: no teacher
            cfg = load_config(DistillConfig, ROOT / "recipes" / "distill_gemma3_to_smollm2.yaml", overrides)
            t0 = time.time()
            r = train(cfg, overwrite=True)
            if r.heldout_bpb_start is not None:
                start = r.heldout_bpb_start
            rows = [json.loads(l) for l in (r.output_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
            tr = [x for x in rows if x.get("event") == "train"]
            print(json.dumps({"benchmark": "distill_teacher", "case": case, "teacher": t_name, "student": s_name,
                              "text": stem, "loss": name + args.tag, "seed": args.seed, "steps": args.steps,
                              "blocks_per_step": args.batch, "corpus_blocks": args.max_blocks,
                              "block_chars": args.block_chars, "max_tokens": args.max_tokens, "lr": args.lr,
                              "heldout_bytes": args.eval_bytes, "overrides": args.set, "heldout_bpb_start": start,
                              "heldout_bpb_end": r.heldout_bpb_end, "final_train_ce": tr[-1]["ce"] if tr else None,
                              "seconds": round(time.time() - t0, 1), "threads": 1,
                              "note": "measured on a shared 2-core machine"}), flush=True)
