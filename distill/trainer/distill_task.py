"""Distillation as a task of the training loop: blocks of text, the student's CE and the teachers' terms.

One optimizer step consumes ``train.batch_size`` blocks (all ranks together) in micro-batches of
``train.micro_batch_size`` per rank; the blocks are taken at global positions ``position .. position +
batch_size`` of a seeded order (:class:`distill.data.BlockOrder`), so the position alone tells where to
resume.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from distill import distributed as dd
from distill.chunks import align_chunks, exact_chunks, position_chunks
from distill.config import DistillConfig
from distill.data import EncodedBatch, encode_blocks
from distill.losses import ChunkedBatch, build_context, combine, make_loss
from distill.losses.token_logp import balance_on_token_logp, mean_ce, token_log_probs
from distill.teacher_dist import TeacherDist
from distill.teachers import (Teacher, TopKCache, build_cache, load_frozen, position_stats, teacher_score,
                              teacher_weights)
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)


def teacher_sides(cfg: DistillConfig, s_vocab) -> list[tuple]:
    """``(tokenizer, vocabulary, saved projection or None)`` of each teacher: cheap, and it reads every
    alignment file and checks each teacher's checkpoint (:func:`surgery.loading.check_checkpoint`), so a bad one is
    reported before anything is written."""
    from surgery.loading import check_checkpoint, load_tokenizer
    from surgery.vocab.store import load_alignment
    from surgery.vocab.surfaces import canonical_vocabulary

    out = []
    for tc in cfg.teachers:
        tok = load_tokenizer(tc.tokenizer or tc.model, trust_remote_code=tc.trust_remote_code)
        check_checkpoint(tc.model, tok, tc.trust_remote_code)
        vocab = canonical_vocabulary(tok, tc.tokenizer or tc.model)
        out.append((tok, vocab, load_alignment(tc.alignment, s_vocab, vocab) if tc.alignment else None))
    return out


def load_teachers(cfg: DistillConfig, s_vocab, sides: list[tuple], device, blocks, blocks_hash, out: Path,
                  env) -> list[Teacher]:
    """The teachers of ``cfg`` (models or their top-k caches) with their losses; ``sides`` from :func:`teacher_sides`."""
    teachers = []
    for i, (tc, (tok, vocab, projection)) in enumerate(zip(cfg.teachers, sides)):
        ctx = build_context(cfg.loss.name, s_vocab, vocab, device, projection=projection,
                            hkl_threshold=cfg.loss.hkl_threshold, project=cfg.loss.project)
        loss = make_loss(cfg.loss.name, cfg.loss, ctx)
        cache = None
        model = None
        if cfg.cache.enabled:
            cdir = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else out / "teacher_cache"
            cdir = cdir / f"teacher{i}"
            key = TopKCache.key(tc.model, vocab.hash, blocks_hash, len(blocks), cfg.data.max_tokens, cfg.cache.top_k,
                                tc.dtype)
            cache = TopKCache.open_matching(cdir, key)
            if cache is None:
                model = load_teacher_model(tc, tok, device)
                cache = build_cache(cdir, key, model, tok, vocab, blocks, cfg.data.max_tokens, cfg.cache.top_k,
                                    cfg.cache.batch_size, device, env.rank, env.world_size, lambda: dd.barrier(env),
                                    progress=cfg.train.progress)
            model = None  # the cache serves every block from now on
        else:
            model = load_teacher_model(tc, tok, device)
        teachers.append(Teacher(i, tc.model, tok, vocab, loss, tc.weight, model, cache))
        LOG.info("teacher %d: %s (%d tokens, %s)%s", i, tc.model, len(vocab), vocab.family,
                 " from cache" if cache is not None else "")
    return teachers


# what to do when a distillation teacher does not fit in memory
TOO_BIG_HINT = ("load it in bfloat16 (teachers[i].dtype=bfloat16), run on a device with more memory, or pass a "
                "smaller teacher")


def load_teacher_model(tc, tokenizer, device):
    """Teacher ``tc``'s model (:func:`distill.teachers.load_frozen` with its config's dtype and remote-code
    setting); ``tokenizer`` (its own) must fit its embedding."""
    return load_frozen(tc.model, tokenizer, device, tc.dtype, tc.trust_remote_code, TOO_BIG_HINT)


def fit_vocab(logits: torch.Tensor, V: int) -> torch.Tensor:
    """Logits ``(..., V_model)`` → ``(..., V)``: drop padding columns, or pad missing ids with −inf."""
    if logits.shape[-1] == V:
        return logits
    if logits.shape[-1] > V:
        return logits[..., :V]
    pad = torch.full((*logits.shape[:-1], V - logits.shape[-1]), float("-inf"), dtype=logits.dtype, device=logits.device)
    return torch.cat([logits, pad], dim=-1)


# -- one micro-batch -----------------------------------------------------------------------------------

def keep_positions(pos_chunks: np.ndarray, mode: str) -> np.ndarray:
    """Flattened ``(B·L,)`` chunk id per position; with ``first`` only each chunk's first position keeps it.

    A chunk's first position on either side sees exactly the bytes before the chunk and predicts
    what starts there; later positions of a multi-token chunk sit at different byte offsets on the
    two sides, so ``first`` compares like with like and ``mean`` averages them (X-Token).
    """
    if mode == "first":
        prev = np.full_like(pos_chunks, -1)
        prev[:, 1:] = pos_chunks[:, :-1]
        pos_chunks = np.where(pos_chunks != prev, pos_chunks, -1)
    return pos_chunks.reshape(-1)


def teacher_is_coarser(s_enc: EncodedBatch, t_enc: EncodedBatch) -> bool:
    """Did the teacher spell the batch's text in fewer tokens *per byte* than the student?

    Per byte, not per block: both sides are truncated to ``max_tokens``, so two encodings that both
    hit the limit have equal token counts although they cover different amounts of text.
    """
    s_tokens, t_tokens = int(s_enc.valid.sum()), int(t_enc.valid.sum())
    s_bytes, t_bytes = int(s_enc.ends.max(1).sum()), int(t_enc.ends.max(1).sum())
    return t_tokens * s_bytes < s_tokens * t_bytes


def micro_loss(cfg, model, s_tok, s_vocab, teachers: list[Teacher], texts, block_ids, device, autocast,
               teacher_rows: np.ndarray | None = None):
    """Loss of one micro-batch; returns ``(total, metrics dict)``.

    ``teacher_rows``: the rows (indices into ``texts``) the teachers read and teach (None: all); the student's CE
    covers every row. A teacher's term is then its loss on those rows' chunks (its forward pass runs on them only).
    """
    s_enc = encode_blocks(texts, s_tok, s_vocab, cfg.data.max_tokens).to(device)
    wants_hidden = cfg.loss.name != "ce" and any(reads_student(t) == "hidden" for t in teachers)
    with head_input(model, wants_hidden) as s_box, autocast():
        logits = model(input_ids=s_enc.input_ids, attention_mask=s_enc.attention_mask).logits
    h_s = s_box.get("h")  # (B, L, d) the student's final hidden states (loss "hidden" only)
    logits = fit_vocab(logits.float(), len(s_vocab))
    B, Ls, Vs = logits.shape
    flat_s = logits.reshape(B * Ls, Vs)
    labels = s_enc.labels.reshape(-1)
    s_logp, s_r = token_log_probs(flat_s, labels)  # (B·L,) log p of each next token, one vocabulary pass
    ce = mean_ce(s_logp, labels)  # = F.cross_entropy(flat_s, labels, ignore_index=-100)
    metrics = {"ce": float(ce.detach())}
    if cfg.loss.name == "ce" or not teachers or (teacher_rows is not None and len(teacher_rows) == 0):
        return ce, metrics  # the plain cross-entropy baseline
    rows = None if teacher_rows is None or len(teacher_rows) == B else np.asarray(teacher_rows, dtype=np.int64)
    if rows is not None:  # the taught rows: their texts, ids and student encoding; sub-batch flat index -> full
        texts, block_ids, s_enc = [texts[i] for i in rows], [block_ids[i] for i in rows], s_enc.take(rows)
        full_index = (torch.from_numpy(rows)[:, None] * Ls + torch.arange(Ls)).reshape(-1).to(device)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    kd_terms, scores, hidden_rows = [], [], {}
    for t in teachers:
        # a live teacher may read more tokens than the student (cfg.data.teacher_max_tokens) so that its tokens
        # cover the student's bytes; the cache stores max_tokens per block
        t_max = cfg.data.max_tokens if t.cache is not None else getattr(cfg.data, "teacher_max_tokens", None) or \
            cfg.data.max_tokens
        t_enc = encode_blocks(texts, t.tokenizer, t.vocab, t_max).to(device)
        al = align_chunks(s_enc.ends, s_enc.valid, t_enc.ends, t_enc.valid)
        mode = "mean" if getattr(t.loss, "positions", None) == "all" else cfg.loss.chunk_positions  # alm: all
        ps = torch.from_numpy(keep_positions(position_chunks(al.chunk_a), mode)).to(device)
        pt = torch.from_numpy(keep_positions(position_chunks(al.chunk_b), mode)).to(device)
        sel_s = torch.nonzero(ps >= 0)[:, 0]  # positions of the (taught rows') flat batch
        at_s = sel_s if rows is None else full_index[sel_s]  # the same positions in the student's (B·Ls) batch
        sel_t = torch.nonzero(pt >= 0)[:, 0]
        Lt = t_enc.input_ids.shape[1]
        targets = t_enc.labels.reshape(-1)
        t_lengths = t_enc.attention_mask.sum(1).tolist()
        if t.cache is not None:
            if reads_student(t) == "hidden":
                raise SurgeryError("loss 'hidden' needs the live teacher (its hidden states are not cached)",
                                   "set cache.enabled=false")
            full, stats = t.cache.read(block_ids, t_lengths, Lt, device)
        elif t.memo is not None and (memo_logp := t.memo.read(block_ids, t_lengths, Lt, device)) is not None:
            full, stats, t_logp = None, None, memo_logp  # every block seen before: alm reads only these log-probs
        else:
            with torch.no_grad(), head_input(t.model, reads_student(t) == "hidden") as t_box, autocast():
                tl = t.model(input_ids=t_enc.input_ids, attention_mask=t_enc.attention_mask).logits
            tl = fit_vocab(tl, len(t.vocab)).reshape(len(texts) * Lt, -1)
            full = TeacherDist(len(t.vocab), logits=tl)
            if getattr(t.loss, "needs_targets", False):  # alm: the teacher's log p of its own next tokens
                with torch.no_grad():
                    t_logp = token_log_probs(tl, targets)[0]
                if t.memo is not None:
                    t.memo.write(block_ids, t_logp.view(len(texts), Lt), t_lengths)
            stats = position_stats(tl, targets) if cfg.weighting.mode == "dynamic" else None
        dist = full.select(sel_t) if full is not None else None
        if dist is not None:
            dist.temperature = cfg.loss.temperature
        exact = None
        if cfg.loss.exact_chunks_only:
            exact = torch.from_numpy(exact_chunks(al, s_enc.input_ids.cpu().numpy(), t_enc.input_ids.cpu().numpy(),
                                                  s_vocab.surfaces, t.vocab.surfaces)).to(device)
        coarser = teacher_is_coarser(s_enc, t_enc)
        # a loss that reads the student only through its next-token log-probs (or its hidden states) gets those,
        # not a (N_s, V) copy of its logits
        batch = ChunkedBatch(flat_s[at_s] if reads_student(t) == "logits" else None, ps[sel_s], dist, pt[sel_t],
                             al.n_chunks, exact, coarser)
        if reads_student(t) == "hidden":  # the head's inputs at each chunk's last token on both sides
            from distill.losses.hidden import chunk_last_tokens

            last_s, last_t = chunk_last_tokens(al.chunk_a, al.n_chunks), chunk_last_tokens(al.chunk_b, al.n_chunks)
            keep = (last_s >= 0) & (last_t >= 0)
            at = torch.from_numpy(last_s[keep]).to(device)
            at = at if rows is None else full_index[at]
            batch.student_hidden = h_s.reshape(-1, h_s.shape[-1])[at]
            h_t = t_box["h"]
            batch.teacher_hidden = h_t.reshape(-1, h_t.shape[-1])[torch.from_numpy(last_t[keep]).to(h_t.device)]
            hidden_rows[t.index] = (at, batch.student_hidden)
        if getattr(t.loss, "needs_targets", False):  # alm: chunk likelihoods of both sides' own tokens
            from distill.losses.alm import complete_chunks

            tlp = stats[:, 0] if t.cache is not None else t_logp
            batch.student_targets = labels[at_s]
            batch.student_target_logp = s_logp[at_s]
            batch.teacher_target_logp = tlp.to(device)[sel_t]
            batch.chunk_complete = torch.from_numpy(
                complete_chunks(al.chunk_a, position_chunks(al.chunk_a), al.n_chunks)
                & complete_chunks(al.chunk_b, position_chunks(al.chunk_b), al.n_chunks)).to(device)
        kd = t.loss(batch)
        kd_terms.append(kd)
        metrics[f"kd{t.index}"] = float(kd.detach())
        metrics[f"chunks{t.index}"] = al.n_chunks
        if cfg.weighting.mode == "dynamic":
            scores.append(teacher_score(stats, targets >= 0, n_bytes, cfg.weighting.score))
    weights = teacher_weights(cfg.weighting.mode, [t.weight for t in teachers], scores, cfg.weighting.alpha)
    for t, w in zip(teachers, weights):
        metrics[f"w{t.index}"] = round(float(w), 4)
    rescale = cfg.loss.rescale_kd
    if rescale and getattr(cfg.loss, "rescale_by", "value") == "gradient":  # equal gradient norms
        kd_terms = balance_terms(ce, kd_terms, teachers, logits, s_logp, s_r, h_s, hidden_rows)
        rescale = False
    total = combine(ce, kd_terms, weights, cfg.loss.ce_weight, cfg.loss.kd_weight, rescale)
    return total, metrics


def reads_student(t: Teacher) -> str:
    """What the teacher's loss reads of the student: ``logits``, ``target_logp`` or ``hidden``."""
    return getattr(t.loss, "reads_student", "logits")


@contextlib.contextmanager
def head_input(model, capture: bool):
    """A dict that receives ``h``, the output head's input (``(B, L, d)``, the final hidden states), of the
    forward passes run inside (nothing when ``capture`` is False)."""
    box: dict = {}
    if not capture:
        yield box
        return
    head = getattr(model, "module", model).get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: box.__setitem__("h", args[0]))
    try:
        yield box
    finally:
        handle.remove()


def balance_terms(ce, kd_terms, teachers, logits, s_logp, s_r, h_s, hidden_rows) -> list[torch.Tensor]:
    """Each teacher's term scaled to pull as hard as CE (``loss.rescale_by=gradient``), where its gradient meets
    CE's: on the logits (``balance_by_gradient``), computed on the next-token log-probs when the term reads only
    those (``alm``: :func:`~distill.losses.token_logp.balance_on_token_logp`), on the final hidden states for
    ``hidden`` (:class:`~distill.losses.hidden.HiddenBalance`)."""
    from distill.losses.base import balance_by_gradient

    out = list(kd_terms)
    kinds = [reads_student(t) for t in teachers]
    for kind in ("logits", "target_logp"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if not idx:
            continue
        sub = [kd_terms[i] for i in idx]
        done = balance_by_gradient(ce, sub, logits) if kind == "logits" else balance_on_token_logp(ce, sub, s_logp, s_r)
        for i, kd in zip(idx, done):
            out[i] = kd
    for i, t in enumerate(teachers):
        if kinds[i] == "hidden":
            out[i] = t.loss.balance.apply(ce, kd_terms[i], h_s, *hidden_rows[t.index])
    return out


class DistillTask:
    """The loop's view of a distillation: this rank's micro-batches of blocks and their loss."""

    def __init__(self, cfg: DistillConfig, s_tok, s_vocab, teachers: list[Teacher], blocks: list[str], order, env,
                 position: int = 0):
        tr = cfg.train
        self.cfg, self.s_tok, self.s_vocab, self.teachers = cfg, s_tok, s_vocab, teachers
        self.blocks, self.order, self.env, self.position = blocks, order, env, position
        self.accum = tr.batch_size // (tr.micro_batch_size * env.world_size)

    def micro_batches(self, step: int) -> list[tuple[list[str], np.ndarray]]:
        mb, env = self.cfg.train.micro_batch_size, self.env
        out = []
        for m in range(self.accum):
            ids = self.order.take(self.position + (m * env.world_size + env.rank) * mb, mb)
            out.append(([self.blocks[i] for i in ids], ids))
        self.position += self.cfg.train.batch_size
        return out

    def loss(self, model, batch, autocast):
        texts, ids = batch
        return micro_loss(self.cfg, model, self.s_tok, self.s_vocab, self.teachers, texts, ids, self.env.device,
                          autocast)

    def step_metrics(self) -> dict:
        return {"position": self.position}
