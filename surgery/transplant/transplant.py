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
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.transplant.config import TransplantConfig
from surgery.transplant.methods import METHODS, MethodInputs, method_wants_offsets
from surgery.transplant.report import TransplantReport, model_card, rows_report
from surgery.transplant.rows import BackgroundCall, build_matrix, fit_bias_direction, streamed_bias_fn
from surgery.transplant.surgery_ops import (add_chat_markers, chat_template_plan, embedding_modules,
                                            fill_missing_roles, padded_size, replace_rows, set_vocab_config,
                                            special_token_map, update_config_ids)
from surgery.vocab.surfaces import canonical_vocabulary

LOG = logging.getLogger(__name__)


@dataclass
class NewRows:
    """New embedding rows and what :func:`compute_rows` decided.

    Attributes:
        new_in: ``(V_pad, d)`` input rows.
        new_out: ``(V_pad, d)`` head rows, or ``None`` (tied head, or no head).
        tokenizer: the tokenizer to save (see :class:`TransplantReport`).
        data: the report dict (``config_ids`` is filled by the caller).
        copied: ``(n,)`` new ids whose rows were copied.
        special: ``(new_ids, old_ids)`` of special tokens matched by role.
    """

    new_in: torch.Tensor
    new_out: torch.Tensor | None
    tokenizer: object
    data: dict
    copied: np.ndarray
    special: tuple


def compute_rows(old_in: torch.Tensor, old_out: torch.Tensor | None, head: str, old_tok, new_tok,
                 config: TransplantConfig | None = None, donor_in: torch.Tensor | None = None, bias_fn=None,
                 progress: bool = False, old_vocab=None, new_vocab=None, out_dtype: torch.dtype | None = None
                 ) -> NewRows:
    """New input (and head) rows for ``new_tok`` from the old matrices alone.

    Args:
        old_in: ``(V_rows, d)`` old input rows (any dtype; sums are float32 or float64, see
            :func:`~surgery.transplant.rows.build_matrix`).
        old_out: ``(V_rows, d)`` old head rows when ``head == "untied"``, else ``None``.
        head: ``"tied"``, ``"untied"`` or ``"none"``.
        old_tok, new_tok: the model's tokenizer and the new one (not modified).
        donor_in: for ``omp``: ``(V_new, d')`` input rows of a model that speaks ``new_tok``.
        bias_fn: ``bias_fn() -> (δ (d,), fit) | None``, the logit-bias direction of the unmodified
            model; started in a background thread before the vocabularies when the method will ask
            for logit offsets (:func:`~surgery.transplant.methods.method_wants_offsets`), so the calibration
            forward runs beside the rest, else called when the plan asks for them.
        out_dtype: dtype of the new rows (default: ``old_in``'s).

    Raises:
        SurgeryError: unusable tokenizers or donor.
    """
    cfg = config or TransplantConfig()
    t_start = time.time()
    timings = {}
    out_dtype = out_dtype or old_in.dtype
    # the old rows stay in their own dtype: build_matrix upcasts one column block at a time (exact)
    in_f = old_in.detach()
    out_f = old_out.detach() if old_out is not None else in_f
    del old_in, old_out  # compute_rows holds the only references when the caller handed them over
    V_rows, d = in_f.shape
    tied = head == "tied"
    separate = head == "untied" or (tied and cfg.untie)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    early = None  # the calibration forward runs beside everything else when the method will want logit offsets
    if bias_fn is not None and method_wants_offsets(cfg):
        early = BackgroundCall(bias_fn)

    new_tok, old_vocab, new_vocab, filled, added_markers, timings["vocabularies"] = _vocabularies(
        cfg, old_tok, new_tok, old_vocab, new_vocab)
    if len(old_vocab) > V_rows:
        LOG.warning("old tokenizer has %d ids but the model only %d rows; ids beyond are ignored", len(old_vocab), V_rows)

    t0 = time.time()
    ex_new, ex_old, sp_new, sp_old, targets, unmatched_special = _match(old_vocab, new_vocab, old_tok, new_tok, V_rows)
    V_new = len(new_vocab)
    timings["matching"] = round(time.time() - t0, 2)
    LOG.info("new vocabulary %d: %d exact, %d special matched, %d to initialize (%s)", V_new, len(ex_new),
             len(sp_new), len(targets), cfg.method)

    base_rows = np.flatnonzero(np.fromiter((s is not None for s in old_vocab.surfaces), bool, len(old_vocab)))
    base_rows = base_rows[base_rows < V_rows]
    t0 = time.time()
    plan = _run_method(cfg, old_vocab, new_vocab, in_f, out_f, targets, separate, (ex_new, ex_old), donor_in, device,
                       progress, len(new_tok))
    timings["method"] = round(time.time() - t0, 2)

    t0 = time.time()
    V_pad = padded_size(V_new, cfg.pad_to_multiple)
    gen = torch.Generator().manual_seed(cfg.seed)
    copies = ((ex_new, ex_old), (sp_new, sp_old))
    new_in = build_matrix(in_f, out_dtype, plan.coef_in, plan.source, targets, copies, V_pad, base_rows, gen)
    del in_f  # freed here when the caller handed over its only reference (8B: 2 GB less at the peak)
    new_out = None
    if separate:
        coef_out = plan.coef_out if plan.coef_out is not None else plan.coef_in
        new_out = build_matrix(out_f, out_dtype, coef_out, plan.source, targets, copies, V_pad, base_rows, gen)
    del out_f
    rows = new_out if new_out is not None else new_in  # the head rows (tied: the shared rows)
    t_wait = 0.0
    if plan.out_bias is not None and np.any(plan.out_bias):
        t1 = time.time()  # with an early start: the wait for the calibration forward
        delta = _bias_direction(plan, early.result if early is not None else bias_fn)
        t_wait = time.time() - t1
        timings["bias_direction"] = round(t_wait, 2)
        if delta is not None:
            _add_logit_offsets(rows, targets, plan.out_bias, delta)
    elif early is not None:
        early.result()  # nothing to offset after all; its errors (a NaN in the body) still count
    never = new_vocab.never_emitted  # twins the tokenizer never produces (byte fallback beside an ordinary piece)
    if len(never):  # a zero head row (logit 0), so they do not take probability from their emitted twin
        rows[torch.as_tensor(never)] = 0
    template, decision, missing = chat_template_plan(old_tok, new_tok)
    if decision == "carried":
        new_tok.chat_template = template
    timings["assemble"] = round(time.time() - t0 - t_wait, 2)
    timings["total"] = round(time.time() - t_start, 2)

    report = rows_report(cfg, plan, old_vocab, new_vocab, new_tok, V_rows, V_pad, ex_new, sp_new, sp_old, targets,
                          unmatched_special, never, head, separate, tied, filled, added_markers, decision, missing,
                          timings)
    LOG.info("rows computed in %.1fs: %s", timings["total"], report["counts"])
    return NewRows(new_in, new_out, new_tok, report, np.union1d(ex_new, sp_new), (sp_new, sp_old))


def _run_method(cfg: TransplantConfig, old_vocab, new_vocab, in_f: torch.Tensor, out_f: torch.Tensor,
                targets: np.ndarray, separate: bool, exact: tuple, donor_in, device: str, progress: bool,
                len_new_tok: int):
    """The init method's plan for ``targets`` (``in_f`` / ``out_f``: ``(V_rows, d)`` old rows; ``exact``:
    the exact pairs ``(new_ids, old_ids)``); the aux model loads only if the method asks for it.

    Raises:
        SurgeryError: ``omp`` without a donor, or a donor with fewer rows than the new tokenizer has ids.
    """
    if cfg.method == "omp":
        if donor_in is None:
            raise SurgeryError("method 'omp' needs a donor model", "pass --donor MODEL (a model with the new tokenizer)")
        if donor_in.shape[0] < len_new_tok:
            raise SurgeryError(f"donor has {donor_in.shape[0]} embedding rows but the new tokenizer {len_new_tok} ids",
                               "the donor must be a model trained with the new tokenizer")
    aux_holder: list = []

    def aux_factory():
        if not aux_holder:
            from surgery.transplant.aux_embeddings import AuxEmbedder

            aux_holder.append(AuxEmbedder(cfg.aux_model, device=device, batch_size=cfg.aux_batch_size,
                                          max_seq_length=cfg.aux_max_seq_length, dtype=cfg.aux_dtype))
        return aux_holder[0]

    inputs = MethodInputs(old_vocab, new_vocab, in_f, out_f, targets, separate, exact[0], exact[1],
                          cfg, aux_factory, donor_in, device, progress)
    try:
        return METHODS[cfg.method](inputs)
    finally:
        aux_holder.clear()  # the aux model is freed with the method's work

def _bias_direction(plan, bias_fn) -> torch.Tensor | None:
    """The ``(d,)`` logit-bias direction of the unmodified model for the plan's logit offsets (None, with a warning
    and a note in the plan's stats, when there is nothing to fit it on)."""
    fitted = bias_fn() if bias_fn is not None else None
    if fitted is None:
        plan.stats["bias_direction"] = {"skipped": "no model forward or calibration text to fit it on"}
        LOG.warning("logit offsets skipped: no model forward or calibration text to fit the bias direction")
        return None
    delta, fit = fitted
    plan.stats["bias_direction"] = fit
    plan.stats["out_bias_mean"] = round(float(plan.out_bias.mean()), 4)
    return delta


def _vocabularies(cfg: TransplantConfig, old_tok, new_tok, old_vocab, new_vocab):
    """The tokenizer to save (a copy of ``new_tok`` when roles, chat markers or a template will change on it) and
    both canonical vocabularies.

    Returns:
        ``(new_tok, old_vocab, new_vocab, filled_roles, added_markers, seconds)``.

    Raises:
        SurgeryError: a tokenizer family the core cannot read.
    """
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
    return new_tok, old_vocab, new_vocab, filled, added_markers, round(time.time() - t0, 2)


def _match(old_vocab, new_vocab, old_tok, new_tok, V_rows: int):
    """Which new rows are copied and which are initialized.

    Returns:
        ``(ex_new, ex_old, sp_new, sp_old, targets, unmatched_special)``: exact pairs (the core's emitted ids) and
        special tokens matched by role, both limited to old ids below ``V_rows``; ``targets`` the new ids with bytes
        that are not copied; ``unmatched_special`` the new special ids without an old counterpart.
    """
    from surgery.vocab.projection import exact_pairs

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
    return ex_new, ex_old, sp_new, sp_old, targets, np.setdiff1d(special_ids, sp_new)


def _add_logit_offsets(rows: torch.Tensor, targets: np.ndarray, out_bias: np.ndarray, delta: torch.Tensor) -> None:
    """Shift the head rows of ``targets`` along the logit-bias direction, in place (float64, then ``rows``' dtype).

    Args:
        rows: ``(V_pad, d)`` head rows.
        targets: ``(T,)`` new ids; ``out_bias``: ``(T,)`` their logit offsets; ``delta``: ``(d,)`` the direction.
    """
    bias, d64 = torch.from_numpy(out_bias).double(), delta.double()[None, :]
    for s in range(0, len(targets), 8192):
        tt = torch.as_tensor(targets[s:s + 8192])
        shift = bias[s:s + 8192][:, None] * d64
        rows[tt] = (rows[tt].double() + shift).to(rows.dtype)


def transplant(model, old_tok, new_tok, config: TransplantConfig | None = None, donor=None,
               progress: bool = False, old_vocab=None, new_vocab=None) -> tuple[object, TransplantReport]:
    """Replace ``model``'s vocabulary by ``new_tok``'s, in place.

    Args:
        model: a HF causal LM (any dtype; rows are computed in float32 and stored in the model's dtype).
        old_tok: the tokenizer the model was trained with.
        new_tok: the new tokenizer (not modified; the report carries the one to save).
        config: :class:`TransplantConfig`.
        donor: for ``omp``: a model (or its ``(V_new, d')`` input rows) that speaks ``new_tok``.
        old_vocab, new_vocab: canonical vocabularies already built for these tokenizers (saves
            time for large vocabularies; ignored when the new tokenizer has to be changed).

    Returns:
        ``(model, report)``.

    Raises:
        SurgeryError: no input embeddings, unusable tokenizers or donor, an ``old_tok`` with more ids than the
            model has embedding rows.
    """
    from surgery.loading import check_tokenizer_fits

    cfg = config or TransplantConfig()
    emb, head, tied = embedding_modules(model)
    check_tokenizer_fits(emb.weight.shape[0], old_tok, "the model to transplant")
    kind = "none" if head is None else ("tied" if tied else "untied")
    donor_in = None
    if cfg.method == "omp" and donor is not None:
        donor_in = donor if isinstance(donor, torch.Tensor) else embedding_modules(donor)[0].weight.detach()
    rows = compute_rows(emb.weight.detach(), head.weight.detach() if kind == "untied" else None, kind, old_tok,
                        new_tok, cfg, donor_in=donor_in, bias_fn=lambda: fit_bias_direction(model, old_tok, cfg),
                        progress=progress, old_vocab=old_vocab, new_vocab=new_vocab)
    t0 = time.time()
    replace_rows(model, rows.new_in, rows.new_out, getattr(rows.tokenizer, "pad_token_id", None))
    rows.data["config_ids"] = update_config_ids(model, old_tok, rows.tokenizer, *rows.special)
    rows.data["timings_s"]["assemble"] = round(rows.data["timings_s"]["assemble"] + time.time() - t0, 2)
    LOG.info("transplant done in %.1fs: %s", rows.data["timings_s"]["total"], rows.data["counts"])
    return model, TransplantReport(rows.tokenizer, rows.data, rows.copied)


def transplant_checkpoint(model_path: str, tokenizer_path: str, out: str, config: TransplantConfig | None = None,
                          overwrite: bool = False, old_tokenizer: str | None = None, dtype: str | None = None,
                          progress: bool = True, max_shard_bytes: int = 5 * 1000**3) -> dict:
    """Transplant ``tokenizer_path`` into a checkpoint folder (or hub id), streaming, and write ``out``.

    Only the input embedding and the output head are read into memory (their names come from
    the config: the model is built on the ``meta`` device); every other tensor is copied shard
    by shard, bit for bit, in its own dtype (``dtype`` converts floating-point tensors when
    given), from the start, beside the row computation (:class:`~surgery.transplant.body_copy.BodyWriter`:
    copied file to file, checked by the calibration forward that reads them when there are logit offsets,
    otherwise through the memory map just before);
    the new rows get shards of their own at the end. Validated before any expensive work: the output
    is free, the new tokenizer loads (before a hub checkpoint downloads), the aux model or the donor's
    tokenizer is there, every shard header and the index are consistent. The body copy then starts
    at once, into the temporary folder, beside the old tokenizer, the embedding and head reads and the
    rows. Every tensor is checked for NaN/inf as it is read, the embedding and head before the rows
    are computed; any failure cancels the copy, and nothing is written unless the whole run succeeds.

    Args:
        max_shard_bytes: output shard size limit (default 5 GB).

    Returns:
        The report dict (also written as ``transplant_report.json``).
    """
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from surgery.checkpoint import CheckpointReader, atomic_output_dir, check_output_free, save_generation_config
    from surgery.loading import check_tokenizer_fits, checkpoint_folder, load_tokenizer, parse_dtype, read_config
    from surgery.transplant.streaming import check_weights_stored, embedding_keys, model_skeleton

    cfg = config or TransplantConfig()
    t0 = time.time()
    check_output_free(out, overwrite, inputs=(model_path, tokenizer_path, old_tokenizer))
    convert = parse_dtype(dtype) if dtype else None
    new_tok = load_tokenizer(tokenizer_path)  # before a hub checkpoint downloads
    _check_method_inputs(cfg, new_tok, tokenizer_path)
    folder = checkpoint_folder(model_path)
    reader = CheckpointReader(folder)  # every header and the index checked: a broken checkpoint fails here
    mcfg = read_config(folder, model_path)
    skeleton = model_skeleton(mcfg)
    emb_key, head_key, kind, head_name = embedding_keys(skeleton, reader)
    store = reader.dtype(emb_key)
    out_dtype = convert or store
    wants_offsets = method_wants_offsets(cfg)

    from surgery.shards import name_shards, shard_plan, write_parts
    from surgery.transplant.body_copy import BodyWriter
    from surgery.transplant.heal import ROWS_FILE, rows_file_content

    check_weights_stored(skeleton, reader.keys, model_path)
    old_tok = load_tokenizer(old_tokenizer or folder)
    check_tokenizer_fits(reader.shape(emb_key)[0], old_tok, model_path)

    with atomic_output_dir(out, overwrite) as tmp:
        # the body is written from now on, beside everything else (old tokenizer, embedding, rows; read by the
        # calibration forward); any error below cancels it and the temporary folder goes
        body_keys = [k for k in reader.keys if k not in (emb_key, head_key)]  # a tied model's stored head is dropped
        body = BodyWriter(reader, [(k, _body_dtype(reader.dtype(k), convert), reader.shape(k)) for k in body_keys],
                          tmp, max_shard_bytes, convert, copy_unread=wants_offsets)
        try:
            donor_in = None
            if cfg.method == "omp":
                dfolder = checkpoint_folder(cfg.donor)
                dreader = CheckpointReader(dfolder)
                dkey = embedding_keys(model_skeleton(read_config(dfolder, cfg.donor)), dreader)[0]
                donor_in = _float_copy(dreader, dkey)
            # NaN/inf checked as read, before the rows; in the stored dtype (build_matrix upcasts column blocks)
            held = [_stored_copy(reader, emb_key), _stored_copy(reader, head_key) if kind == "untied" else None]
            LOG.info("read %s%s (%s) from %s", emb_key, f" and {head_key}" if kind == "untied" else "", store, folder)
            t_load = time.time() - t0
            # the calibration forward, for methods that ask for logit offsets (the calibration tokens' rows only)
            bias_fn = streamed_bias_fn(skeleton, reader, old_tok, cfg, held[0], store) if wants_offsets else None
            # compute_rows gets the only references: it frees each old matrix once its rows are built
            rows = compute_rows(held.pop(0), held.pop(0), kind, old_tok, new_tok, cfg, donor_in=donor_in,
                                bias_fn=bias_fn, progress=progress, out_dtype=out_dtype)
            t1 = time.time()
            files, tensors = body.finish()
        except BaseException:
            body.cancel()
            raise
        data = rows.data
        data["base_model"] = str(model_path)
        data["new_tokenizer"] = str(tokenizer_path)
        data["timings_s"]["load"] = round(t_load, 2)
        set_vocab_config(mcfg, rows.new_in.shape[0], kind != "none" and rows.new_out is None)
        if convert is not None:
            mcfg.dtype = convert
        gen = (GenerationConfig.from_pretrained(str(folder)) if (folder / "generation_config.json").exists()
               else GenerationConfig.from_model_config(mcfg))
        data["config_ids"] = update_config_ids(SimpleNamespace(config=mcfg, generation_config=gen), old_tok,
                                               rows.tokenizer, *rows.special)
        new = {emb_key: rows.new_in}
        if rows.new_out is not None:  # an untied head (also one untied on request: a new tensor)
            new[head_key or head_name] = rows.new_out
        new_entries = [(k, out_dtype, list(t.shape)) for k, t in new.items()]  # the new rows: shards of their own
        row_files, row_tensors = write_parts(new_entries, new.__getitem__, tmp, shard_plan(new_entries, max_shard_bytes),
                                             "rows")
        index = name_shards(tmp, files + row_files, {**tensors, **row_tensors})
        mcfg.save_pretrained(tmp)
        save_generation_config(gen, tmp)
        rows.tokenizer.save_pretrained(tmp)
        data["stream"] = {"input_dtype": str(store).replace("torch.", ""),
                          "output_dtype": str(out_dtype).replace("torch.", ""),
                          "tensors": len(body_keys) + len(new), "tensors_passed_through": len(body_keys),
                          "tensors_copied_as_bytes": len(body_keys) if body.copy_unread else 0,
                          "shards": len(files) + len(row_files), "bytes": index["metadata"]["total_size"]}
        data["timings_s"]["save"] = round(time.time() - t1, 2)
        data["timings_s"]["wall"] = round(time.time() - t0, 2)
        rep = TransplantReport(rows.tokenizer, data, rows.copied)
        (tmp / "transplant_report.json").write_text(rep.to_json())
        (tmp / "README.md").write_text(model_card(data, model_path, tokenizer_path))
        (tmp / ROWS_FILE).write_text(rows_file_content(rows.copied, data["new_vocab"]["rows_padded"]))
    LOG.info("wrote %s (%d shards) in %.1fs", out, data["stream"]["shards"], data["timings_s"]["wall"])
    return data


def _float_copy(reader, key: str) -> torch.Tensor:
    """A float32 copy of a stored tensor (checked for NaN/inf), converted straight from the mapped file: the OMP
    donor's rows, which OMP reads in float32 (no stored-dtype copy held beside them)."""
    t = reader.get(key, mapped=True)
    return t.float() if t.dtype != torch.float32 else t.clone()


def _stored_copy(reader, key: str) -> torch.Tensor:
    """A stored tensor in its own dtype (checked for NaN/inf), copied out of the mapped file into memory: the
    page cache may drop the file's pages while a large checkpoint streams through it."""
    return reader.get(key, mapped=True).clone()


def _body_dtype(dt: torch.dtype, convert: torch.dtype | None) -> torch.dtype:
    """The output dtype of a body tensor stored as ``dt`` (``convert`` applies to floating point only)."""
    return convert if convert is not None and dt.is_floating_point else dt


def _check_method_inputs(cfg: TransplantConfig, new_tok, tokenizer_path: str) -> None:
    """Before any expensive work: the aux model of ``tokenadapt`` exists, and an ``omp`` donor speaks the new
    tokenizer (same tokenizer hash or the same number of ids).

    Raises:
        SurgeryError: either is not so.
    """
    from surgery.loading import load_tokenizer

    if cfg.method.startswith("tokenadapt"):
        from surgery.transplant.aux_embeddings import resolve_aux_model

        src = resolve_aux_model(cfg.aux_model)
        if (src.startswith((".", "/", "~")) or cfg.aux_model == "minilm") and not Path(src).expanduser().exists():
            raise SurgeryError(f"aux model {cfg.aux_model!r} not found at {src!r}",
                               "run `surgery assets`, or pass --aux-model with a sentence-transformers folder")
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
