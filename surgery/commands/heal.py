"""`surgery heal`: short training of a transplanted model (new rows, head, LoRA or everything), resumable."""

from __future__ import annotations

from pathlib import Path

NAME = "heal"
HELP = "train a transplanted model's new embedding/head rows (or head, LoRA, all parameters), resumable"
DESCRIPTION = (
    "Train the rows that `surgery transplant` initialized (copied rows stay frozen bit for bit; the list is in "
    "MODEL/transplant_rows.json) with next-token loss on --text files, for --steps N or --minutes M, on the GPU "
    "when there is one. The transplant's base model (MODEL/transplant_report.json) teaches the steps that read "
    "their blocks again (--teacher auto --teacher-on repeats; its weights load at the first such step, after a "
    "check at the start that they fit; --teacher none: next-token loss alone, the memory of one model). "
    "--params says what is trained: new-rows (default), head (their head rows only), lora "
    "(new rows + LoRA adapters on the body, merged at the end) or all (every parameter). Settings come from "
    "--config recipes/heal_*.yaml and the flags below (a flag wins over the YAML; --help-config lists every key). "
    "A resumable state is written every --checkpoint-every steps next to OUT; --resume continues it. Writes a new "
    "HF folder with heal_metrics.jsonl (+ a PNG plot of it) and heal_summary.json."
)

_FLAGS = ("steps", "minutes", "params", "lr", "negatives", "lora_rank", "lora_lr", "all_lr", "seq_len", "batch_size",
          "warmup", "weight_decay", "grad_clip", "train_rows", "autocast", "checkpoint_every", "eval_every", "seed",
          "teacher", "loss", "teacher_balance", "teacher_dtype", "teacher_fraction", "teacher_decay",
          "teacher_on")


def add_arguments(p):
    from surgery.commands._model_options import add_model_options
    from surgery.config_flags import add_config_arguments, add_help_config
    from surgery.transplant.config import HealConfig

    p.add_argument("model", nargs="?", help="transplanted model folder (from `surgery transplant`)")
    p.add_argument("--text", nargs="+", help="UTF-8 training text file(s)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--config", help="heal recipe YAML (e.g. recipes/heal_new_rows.yaml); flags override it")
    add_config_arguments(p, HealConfig, fields=_FLAGS)
    p.add_argument("--head-only", action="store_true", help="same as --params head")
    p.add_argument("--lora", action="store_true", help="same as --params lora")
    p.add_argument("--eval-text", default=None, help="text scored in bits/byte before and after")
    add_model_options(p)
    p.add_argument("--resume", action="store_true", help="continue from the saved heal state of OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_help_config(p)


def heal_config(args):
    """The :class:`HealConfig` of parsed ``args`` (YAML, then overrides, then flags); every problem at once."""
    from surgery.config_flags import config_from_args, given_fields
    from surgery.errors import SurgeryError
    from surgery.transplant.config import HealConfig

    legacy = [v for flag, v in (("--head-only", "head"), ("--lora", "lora")) if getattr(args, flag[2:].replace("-", "_"))]
    given = given_fields(args).get("params")
    if len(legacy) > 1 or (legacy and given and given != legacy[0]):
        raise SurgeryError("--head-only, --lora and --params ask for different things", "pass one --params value")
    extra = {"params": legacy[0]} if legacy else {}
    if getattr(args, "device", None):
        extra["device"] = args.device
    return config_from_args(HealConfig, args, path=args.config, extra=extra)


def run(args) -> int:
    from surgery.commands._model_options import model_options
    from surgery.config_flags import help_config_text
    from surgery.errors import SurgeryError
    from surgery.transplant.config import HealConfig

    if args.help_config:
        print(help_config_text(HealConfig))
        return 0
    missing = [name for name, v in (("MODEL", args.model), ("--text", args.text), ("--out", args.out)) if not v]
    if missing:
        raise SurgeryError(f"missing {', '.join(missing)}", "usage: surgery heal MODEL --text FILE... --steps N --out DIR")
    cfg = heal_config(args)
    dtype, device = model_options(args)
    if args.dtype is None:  # trained rows are float32 leaves; a bf16 load would round every update
        import torch

        dtype = torch.float32
    if cfg.device is None:
        import dataclasses

        cfg = dataclasses.replace(cfg, device=str(device))
    s = heal_checkpoint(args.model, args.text, args.out, cfg, overwrite=args.overwrite, resume=args.resume,
                        eval_path=args.eval_text, dtype=dtype)
    bpb = ""
    if s.get("bits_per_byte_before") is not None:
        bpb = f" Bits/byte on {args.eval_text}: {s['bits_per_byte_before']:.4f} → {s['bits_per_byte_after']:.4f}."
    if s.get("teacher_steps") is not None:
        hits, taught = s.get("teacher_memo_hits"), s["teacher_steps"]
        kept = f" ({hits} of them from its kept log-probs, no teacher pass)" if hits else ""
        if cfg.teacher_on != "every" and not taught:
            bpb += (f" Teacher {s.get('teacher')} taught no step: none re-read its blocks (CE alone; its weights were "
                    f"never loaded).")
        elif cfg.teacher_on == "repeats":
            bpb += (f" Teacher {s.get('teacher')} taught the {taught} steps that re-read their blocks{kept}; the other "
                    f"{s['steps'] - taught} read new text (CE alone).")
        elif cfg.teacher_on == "repeated-blocks":
            blocks = s["teacher_blocks"]
            bpb += (f" Teacher {s.get('teacher')} taught the {blocks} of {s['steps'] * cfg.batch_size} blocks read "
                    f"again, in {taught} steps{kept}; the blocks read for the first time had CE alone.")
        else:
            bpb += f" Teacher {s.get('teacher')} taught {taught} steps{kept}."
    print(f"Healed {args.model} for {s['steps']} steps ({s['seconds']} s on {s['device']}, "
          f"{s['tokens_seen']} tokens, params {cfg.params}{'' if cfg.params == 'all' else f' ({cfg.train_rows} rows)'}): "
          f"next-token loss {s['ce_first']} → {s['ce_last10']} (mean of the last 10 steps).{bpb} Wrote {args.out} "
          f"(heal_metrics.jsonl, heal_summary.json).")
    return 0


def state_dir_for(out) -> Path:
    """Hidden sibling of ``out`` holding a heal's resumable state (removed when the heal completes)."""

    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.heal-state"


def heal_checkpoint(model_path: str, text_paths: list[str], out: str, config, overwrite: bool = False,
                    resume: bool = False, eval_path: str | None = None, progress: bool = True, dtype=None) -> dict:
    """Heal a transplanted folder: the trainer configured by ``config`` (a :class:`HealConfig`), with the rows the
    transplant copied (``transplant_rows.json``) frozen; writes a new HF folder to ``out`` (atomically) with
    ``heal_metrics.jsonl``, ``heal_summary.json`` and the transplant's own files.

    Returns:
        The summary (also written as ``heal_summary.json``).
    """
    import json
    import logging
    import shutil
    from pathlib import Path

    import torch

    from distill.trainer import heal
    from surgery.checkpoint import check_output_free, save_checkpoint
    from surgery.loading import load_model, load_tokenizer
    from surgery.textio import read_text, read_texts
    from surgery.transplant.heal import ROWS_FILE, read_copied_rows

    check_output_free(out, overwrite, inputs=(model_path, *text_paths))
    texts = read_texts(text_paths)
    eval_text = read_text(eval_path) if eval_path else None
    src = Path(model_path)
    from distill.teaching import heal_teacher_task, resolve_teacher

    tok = load_tokenizer(model_path)  # a missing or broken MODEL is reported as such first
    teacher = resolve_teacher(config.teacher, src)  # before any model is loaded
    model = load_model(model_path, dtype=dtype or torch.float32, tokenizer=tok)
    copied = read_copied_rows(src, model.get_input_embeddings().num_embeddings) if src.is_dir() else None
    task = heal_teacher_task(teacher, tok, texts, config, student=model) if teacher else None
    sdir = state_dir_for(out)
    if not resume and sdir.exists():
        shutil.rmtree(sdir, ignore_errors=True)
        logging.getLogger(__name__).warning("removed an earlier heal state at %s (pass --resume to continue one)",
                                            sdir)
    model, summary, metrics = heal(model, tok, texts, config, sdir, copied, resume, eval_text, progress, task=task)
    summary["teacher"] = teacher
    if task is not None:  # the step (from 1) whose teaching loaded the teacher's weights; None: never loaded
        summary["teacher_loaded_at_step"] = None if task.loaded_at is None else task.loaded_at + 1
    summary["base_model"] = str(model_path)
    summary["texts"] = [str(p) for p in text_paths]
    extra = {"heal_metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics),
             "heal_summary.json": json.dumps(summary, indent=2) + "\n"}
    png = _plot(extra["heal_metrics.jsonl"], f"heal {model_path} ({config.params})")
    if png is not None:
        extra["heal_metrics.png"] = png
    for name in (ROWS_FILE, "transplant_report.json"):
        if (src / name).exists():
            extra[name] = (src / name).read_text()
    save_checkpoint(model, tok, out, overwrite=overwrite, extra_files=extra)
    shutil.rmtree(sdir, ignore_errors=True)  # the run is complete; its resumable state is no longer needed
    return summary


def _plot(metrics_jsonl: str, title: str) -> bytes | None:
    """The training-loss plot of a heal as PNG bytes (None without metrics)."""
    import tempfile
    from pathlib import Path

    from distill.trainer import plot_metrics

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.jsonl").write_text(metrics_jsonl)
        png = plot_metrics(Path(d) / "m.jsonl", Path(d) / "m.png", title)
        return png.read_bytes() if png is not None else None
