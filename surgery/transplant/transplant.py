"""Top level: give a model a new tokenizer.

:func:`transplant` works on objects in memory; :func:`transplant_checkpoint` is the
one call behind ``surgery transplant`` (validate, load, transplant, write atomically).

Row sources, in order: shared tokens (identical canonical bytes, found by the
alignment core) copy their old rows bit for bit; special tokens copy the row of
the old token with the same role; the remaining new tokens with bytes get the
init method's rows (:mod:`surgery.transplant.methods`); unmatched special tokens,
undefined ids and padding rows get the mean old row.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.transplant.config import TransplantConfig
from surgery.transplant.methods import METHODS, SOURCE_NAMES, SRC_RANDOM, MethodInputs
from surgery.transplant.surgery_ops import (add_chat_markers, chat_template_plan, embedding_modules,
                                            fill_missing_roles, padded_size, replace_rows, special_token_map,
                                            update_config_ids)
from surgery.vocab.surfaces import canonical_vocabulary

LOG = logging.getLogger(__name__)


@dataclass
class TransplantReport:
    """What a transplant did.

    Attributes:
        tokenizer: the tokenizer to save with the model: the new one, or a copy of it when
            roles were filled, a chat template carried over or markers added.
        data: JSON-able report (method, parameters, counts, timings, ...).
        copied_rows: ``(n,)`` new ids whose rows were copied (exact + special), for heal.
    """

    tokenizer: object
    data: dict = field(default_factory=dict)
    copied_rows: np.ndarray | None = None

    def as_dict(self) -> dict:
        return dict(self.data)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n"


def _apply_coef(coef, old: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``coef @ old`` for a ``(T, V)`` CSR and ``(V, d)`` rows, in row chunks (float32 result)."""
    src = old.detach().float().cpu().numpy()
    out = np.empty((coef.shape[0], src.shape[1]), dtype=np.float32)
    for s in range(0, coef.shape[0], chunk):
        out[s:s + chunk] = (coef[s:s + chunk] @ src).astype(np.float32)
    return torch.from_numpy(out)


def _row_stats(w: torch.Tensor, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = w.detach()[torch.as_tensor(rows)].double()
    return x.mean(0), x.std(0)


def _build_matrix(old: torch.Tensor, coef, plan_src: np.ndarray, targets: np.ndarray, copies: tuple,
                  V_pad: int, base_rows: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """New ``(V_pad, d)`` matrix: mean everywhere, copies bit for bit, combinations, random rows."""
    d = old.shape[1]
    mean, std = _row_stats(old, base_rows)
    new = mean.to(old.dtype).expand(V_pad, d).clone()
    comb = _apply_coef(coef, old)
    rnd = plan_src == SRC_RANDOM
    if rnd.any():
        comb[torch.as_tensor(np.flatnonzero(rnd))] = (
            torch.randn(int(rnd.sum()), d, generator=gen, dtype=torch.float64) * std + mean).float()
    new[torch.as_tensor(targets)] = comb.to(old.dtype)
    for new_ids, old_ids in copies:  # last: copies are never overwritten and stay bit-exact
        if len(new_ids):
            new[torch.as_tensor(new_ids)] = old.detach()[torch.as_tensor(old_ids)]
    return new


def _bias_direction(model, old_tok, cfg) -> tuple[torch.Tensor, dict]:
    """Fit the logit-bias direction of the (still unmodified) model on calibration text."""
    from surgery.transplant.calibration import bias_direction, default_calibration_texts, head_inputs

    if cfg.calibration_texts:
        from surgery.textio import read_texts

        texts = [t[:4000] for t in read_texts(cfg.calibration_texts)]
    else:
        texts = default_calibration_texts()
    H = head_inputs(model, old_tok, texts)
    delta, fit = bias_direction(H)
    fit["source"] = "texts" if texts else "sampled"
    LOG.info("bias direction fitted on %d positions: %s", H.shape[0], fit)
    return delta, fit


@torch.no_grad()
def shadowed_byte_tokens(tokenizer, vocab) -> np.ndarray:
    """Byte-fallback ids (``<0xNN>``) whose byte is also the surface of an ordinary token of the same vocabulary.

    The tokenizer never emits them (byte fallback only spells characters the vocabulary lacks), but an
    exact copy would give them the ordinary token's head row too, and the head then splits that token's
    probability between the twins (half the mass of ``,``, ``.``, ``\\n`` with Gemma-3's tokenizer).

    Returns:
        ``(n,)`` sorted ids (empty for tokenizers without ``<0xNN>`` pieces).
    """
    single: dict[bytes, list[int]] = {}
    for i, s in enumerate(vocab.surfaces):
        if s is not None and len(s) == 1:
            single.setdefault(s, []).append(i)
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for byte in range(256):
        i = tokenizer.convert_tokens_to_ids(f"<0x{byte:02X}>")
        if i is None or i == unk or not 0 <= i < len(vocab.surfaces) or vocab.surfaces[i] != bytes([byte]):
            continue
        if any(j != i for j in single.get(bytes([byte]), ())):
            out.append(int(i))
    return np.array(sorted(out), dtype=np.int64)


def transplant(model, old_tok, new_tok, config: TransplantConfig | None = None, donor=None,
               progress: bool = False, old_vocab=None, new_vocab=None) -> tuple[object, TransplantReport]:
    """Replace ``model``'s vocabulary by ``new_tok``'s, in place.

    Args:
        model: a HF causal LM (any dtype; rows are computed in float32).
        old_tok: the tokenizer the model was trained with.
        new_tok: the new tokenizer (not modified; the report carries the one to save).
        config: :class:`TransplantConfig`.
        donor: for ``omp``: a model (or its ``(V_new, d')`` input rows) that speaks ``new_tok``.
        old_vocab, new_vocab: canonical vocabularies already built for these tokenizers (saves
            time for large vocabularies; ignored when the new tokenizer has to be changed).

    Returns:
        ``(model, report)``.

    Raises:
        SurgeryError: no input embeddings, unusable tokenizers or donor.
    """
    cfg = config or TransplantConfig()
    t_start = time.time()
    timings = {}
    emb, head, tied = embedding_modules(model)
    old_in = emb.weight.detach()
    V_rows, d = old_in.shape
    old_out = head.weight.detach() if head is not None else old_in
    separate = head is not None and (not tied or cfg.untie)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")

    # copy the caller's tokenizer only when something on it will change (a 262k copy takes seconds)
    if (cfg.fill_special_roles and (new_tok.bos_token is None or new_tok.eos_token is None)) or \
            cfg.add_chat_markers or (not getattr(new_tok, "chat_template", None) and getattr(old_tok, "chat_template", None)):
        new_tok = copy.deepcopy(new_tok)
        new_vocab = None
    filled = fill_missing_roles(new_tok) if cfg.fill_special_roles else {}
    added_markers = add_chat_markers(old_tok, new_tok) if cfg.add_chat_markers else []
    t0 = time.time()
    try:
        old_vocab = old_vocab or canonical_vocabulary(old_tok)
        new_vocab = new_vocab or canonical_vocabulary(new_tok)
    except ValueError as e:
        raise SurgeryError(f"unsupported tokenizer: {e}", "use a byte-level BPE, SentencePiece or WordPiece tokenizer") from e
    timings["vocabularies"] = round(time.time() - t0, 2)
    if len(old_vocab) > V_rows:
        LOG.warning("old tokenizer has %d ids but the model only %d rows; ids beyond are ignored", len(old_vocab), V_rows)

    from surgery.vocab.projection import exact_pairs

    t0 = time.time()
    ex_new, ex_old = exact_pairs(new_vocab, old_vocab)
    ok = ex_old < V_rows
    ex_new, ex_old = ex_new[ok], ex_old[ok]
    sp_new, sp_old = special_token_map(old_vocab, new_vocab, old_tok, new_tok)
    ok = sp_old < V_rows
    sp_new, sp_old = sp_new[ok], sp_old[ok]
    V_new = len(new_vocab)
    is_copied = np.zeros(V_new, dtype=bool)
    is_copied[ex_new] = True
    is_copied[sp_new] = True
    has_surface = np.fromiter((s is not None for s in new_vocab.surfaces), bool, V_new)
    targets = np.flatnonzero(has_surface & ~is_copied)
    special_ids = np.array(sorted(new_vocab.roles), dtype=np.int64)
    unmatched_special = np.setdiff1d(special_ids, sp_new)
    timings["matching"] = round(time.time() - t0, 2)
    LOG.info("new vocabulary %d: %d exact, %d special matched, %d to initialize (%s)", V_new, len(ex_new),
             len(sp_new), len(targets), cfg.method)

    donor_in = None
    if cfg.method == "omp":
        if donor is None:
            raise SurgeryError("method 'omp' needs a donor model", "pass --donor MODEL (a model with the new tokenizer)")
        donor_in = donor if isinstance(donor, torch.Tensor) else embedding_modules(donor)[0].weight.detach()
        if donor_in.shape[0] < len(new_tok):
            raise SurgeryError(f"donor has {donor_in.shape[0]} embedding rows but the new tokenizer {len(new_tok)} ids",
                               "the donor must be a model trained with the new tokenizer")

    aux_holder: list = []

    def aux_factory():  # the aux model loads only if a method asks for it
        if not aux_holder:
            from surgery.transplant.aux_embeddings import AuxEmbedder

            aux_holder.append(AuxEmbedder(cfg.aux_model, device=device, batch_size=cfg.aux_batch_size,
                                          max_seq_length=cfg.aux_max_seq_length, dtype=cfg.aux_dtype))
        return aux_holder[0]

    base_rows = np.flatnonzero(np.fromiter((s is not None for s in old_vocab.surfaces), bool, len(old_vocab)))
    base_rows = base_rows[base_rows < V_rows]
    inputs = MethodInputs(old_vocab, new_vocab, old_in.float(), old_out.float(), targets, separate, ex_new, ex_old,
                          cfg, aux_factory, donor_in, device, progress)
    t0 = time.time()
    plan = METHODS[cfg.method](inputs)
    timings["method"] = round(time.time() - t0, 2)

    delta = None
    if plan.out_bias is not None and np.any(plan.out_bias):
        t0 = time.time()
        delta, fit = _bias_direction(model, old_tok, cfg)
        plan.stats["bias_direction"] = fit
        plan.stats["out_bias_mean"] = round(float(plan.out_bias.mean()), 4)
        timings["bias_direction"] = round(time.time() - t0, 2)

    t0 = time.time()
    V_pad = padded_size(V_new, cfg.pad_to_multiple)
    gen = torch.Generator().manual_seed(cfg.seed)
    copies = ((ex_new, ex_old), (sp_new, sp_old))
    new_in = _build_matrix(old_in, plan.coef_in, plan.source, targets, copies, V_pad, base_rows, gen)
    new_out = None
    if separate:
        coef_out = plan.coef_out if plan.coef_out is not None else plan.coef_in
        new_out = _build_matrix(old_out, coef_out, plan.source, targets, copies, V_pad, base_rows, gen)
    if delta is not None:  # logit offsets of merged tokens, on the head rows (tied: the shared rows)
        rows = new_out if new_out is not None else new_in
        shift = torch.from_numpy(plan.out_bias).double()[:, None] * delta.double()[None, :]
        tt = torch.as_tensor(targets)
        rows[tt] = (rows[tt].double() + shift).to(rows.dtype)
    shadowed = shadowed_byte_tokens(new_tok, new_vocab)
    if len(shadowed):  # never emitted: a zero head row (logit 0) instead of their ordinary twin's row
        rows = new_out if new_out is not None else new_in
        rows[torch.as_tensor(shadowed)] = 0
    pad_id = getattr(new_tok, "pad_token_id", None)
    replace_rows(model, new_in, new_out, pad_id)
    cfg_ids = update_config_ids(model, old_tok, new_tok, sp_new, sp_old)
    template, decision, missing = chat_template_plan(old_tok, new_tok)
    if decision == "carried":
        new_tok.chat_template = template
    timings["assemble"] = round(time.time() - t0, 2)
    timings["total"] = round(time.time() - t_start, 2)

    src_counts = {name: int((plan.source == code).sum()) for code, name in SOURCE_NAMES.items()
                  if (plan.source == code).any()}
    report = {
        "method": cfg.method,
        "parameters": cfg.to_dict(),
        "old_vocab": {"size": len(old_vocab), "family": old_vocab.family, "hash": old_vocab.hash, "rows": V_rows},
        "new_vocab": {"size": V_new, "family": new_vocab.family, "hash": new_vocab.hash, "len_tokenizer": len(new_tok),
                      "rows_padded": V_pad},
        "counts": {
            "exact": int(len(ex_new)),
            "special_matched": int(len(sp_new)),
            "special_unmatched": int(len(unmatched_special)),
            "initialized": int(len(targets)),
            **src_counts,
            "undefined_or_padding": int(V_pad - len(ex_new) - len(sp_new) - len(targets) - len(unmatched_special)),
        },
        "shadowed_byte_tokens": int(len(shadowed)),
        "head": "untied" if separate else ("tied" if head is not None else "none"),
        "untied_by_request": bool(cfg.untie and tied),
        "filled_roles": filled,
        "added_chat_markers": added_markers,
        "chat_template": {"decision": decision, "missing_markers": missing},
        "config_ids": cfg_ids,
        "special_map": {str(n): int(o) for n, o in zip(sp_new.tolist(), sp_old.tolist())},
        "method_stats": plan.stats,
        "timings_s": timings,
    }
    LOG.info("transplant done in %.1fs: %s", timings["total"], report["counts"])
    copied = np.union1d(ex_new, sp_new)
    return model, TransplantReport(new_tok, report, copied)


def model_card(report: dict, base: str, tokenizer: str) -> str:
    """A short README.md for the output folder."""
    c = report["counts"]
    lines = [
        f"# {Path(str(base)).name} with the {Path(str(tokenizer)).name} tokenizer",
        "",
        f"Made by `surgery transplant` (method `{report['method']}`) from `{base}` and the tokenizer `{tokenizer}`.",
        "It loads with plain `transformers` (`AutoModelForCausalLM` / `AutoTokenizer`).",
        "",
        f"- vocabulary: {report['old_vocab']['size']} → {report['new_vocab']['size']} tokens "
        f"({report['new_vocab']['rows_padded']} embedding rows), head {report['head']}",
        f"- rows copied bit for bit: {c['exact']} shared tokens, {c['special_matched']} special tokens by role",
        f"- rows initialized by `{report['method']}`: {c['initialized']} "
        f"({', '.join(f'{k} {v}' for k, v in c.items() if k in ('local', 'global', 'hybrid', 'mean', 'omp', 'random'))})",
        f"- chat template: {report['chat_template']['decision']}",
        "",
        "Zero-shot transplanted models lose quality on text the new tokens cover; `surgery heal` trains the new rows.",
        "Details (parameters, counts, timings): `transplant_report.json`.",
        "",
    ]
    return "\n".join(lines)


def transplant_checkpoint(model_path: str, tokenizer_path: str, out: str, config: TransplantConfig | None = None,
                          overwrite: bool = False, old_tokenizer: str | None = None, dtype: str = "float32",
                          progress: bool = True) -> dict:
    """Load a checkpoint, transplant ``tokenizer_path`` into it and write a HF folder to ``out``.

    Everything is validated before the expensive work (output free, tokenizers load,
    aux model and donor present); nothing is written unless the whole run succeeds.

    Returns:
        The report dict (also written as ``transplant_report.json``).
    """
    from surgery.checkpoint import check_output_free, save_checkpoint
    from surgery.loading import load_model, load_tokenizer

    cfg = config or TransplantConfig()
    t0 = time.time()
    check_output_free(out, overwrite)
    new_tok = load_tokenizer(tokenizer_path)
    old_tok = load_tokenizer(old_tokenizer or model_path)
    if cfg.method.startswith("tokenadapt"):
        from surgery.transplant.aux_embeddings import resolve_aux_model

        src = resolve_aux_model(cfg.aux_model)
        if (src.startswith((".", "/", "~")) or cfg.aux_model == "minilm") and not Path(src).expanduser().exists():
            raise SurgeryError(f"aux model {cfg.aux_model!r} not found at {src!r}",
                               "run `surgery assets`, or pass --aux-model with a sentence-transformers folder")
    donor = None
    if cfg.method == "omp":
        donor_tok = None
        try:
            donor_tok = load_tokenizer(cfg.donor)
        except SurgeryError:
            LOG.warning("donor %s has no tokenizer; cannot check that it speaks the new tokenizer", cfg.donor)
        if donor_tok is not None:
            from surgery.vocab.surfaces import tokenizer_hash

            if tokenizer_hash(donor_tok) != tokenizer_hash(new_tok) and len(donor_tok) != len(new_tok):
                raise SurgeryError(f"donor {cfg.donor!r} has a different tokenizer ({len(donor_tok)} ids) than "
                                   f"{tokenizer_path!r} ({len(new_tok)} ids)",
                                   "the donor must be a model trained with the new tokenizer")
    model = load_model(model_path, dtype=dtype)
    if cfg.method == "omp":
        donor_model = load_model(cfg.donor, dtype="float32")
        donor = embedding_modules(donor_model)[0].weight.detach().clone()
        del donor_model
    t_load = time.time() - t0
    model, rep = transplant(model, old_tok, new_tok, cfg, donor=donor, progress=progress)
    data = rep.data
    data["base_model"] = str(model_path)
    data["new_tokenizer"] = str(tokenizer_path)
    data["timings_s"]["load"] = round(t_load, 2)
    t1 = time.time()
    from surgery.transplant.heal import ROWS_FILE, rows_file_content

    extra = {"transplant_report.json": rep.to_json(), "README.md": model_card(data, model_path, tokenizer_path),
             ROWS_FILE: rows_file_content(rep.copied_rows, data["new_vocab"]["rows_padded"])}
    save_checkpoint(model, rep.tokenizer, out, overwrite=overwrite, extra_files=extra)
    data["timings_s"]["save"] = round(time.time() - t1, 2)
    data["timings_s"]["wall"] = round(time.time() - t0, 2)
    # the final timings go into the written report too (cheap rewrite of one small file)
    (Path(out) / "transplant_report.json").write_text(rep.to_json())
    return data
