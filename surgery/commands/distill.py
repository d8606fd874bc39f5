"""`surgery distill`: cross-tokenizer distillation from a YAML recipe plus key=value overrides."""

from __future__ import annotations

NAME = "distill"
HELP = "distill one or more teachers into a student with another vocabulary (X-Token P-KL/H-KL, ULD, GOLD, KL)"
DESCRIPTION = (
    "Train a student on text with a distillation loss against frozen teachers, as described by a YAML recipe "
    "(see recipes/distill_*.yaml). Any key can be overridden as dotted.key=value, e.g. `train.steps=20 "
    "loss.name=hkl teachers.0.weight=0.5`. Runs alone, or under `torchrun --nproc_per_node N -m surgery.cli distill` "
    "with DDP/FSDP. `--help-config` lists every key."
)


def add_arguments(p):
    p.add_argument("--config", help="recipe YAML (e.g. recipes/distill_gemma3_to_smollm2.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides with dotted keys")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output_dir (the old one is deleted only when the new run succeeds)")
    p.add_argument("--help-config", action="store_true", help="list every config key with type, default and help")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved, and exit")


def run(args) -> int:
    from surgery.config import load_config, to_yaml
    from surgery.config_flags import describe
    from surgery.errors import SurgeryError

    from distill.config import DistillConfig

    if args.help_config:
        print("\n".join(describe(DistillConfig)))
        return 0
    if not args.config and not args.overrides:
        raise SurgeryError("no recipe given", "pass --config recipes/<name>.yaml (and/or key=value overrides)")
    if args.resume and args.overwrite:
        raise SurgeryError("--resume and --overwrite contradict each other", "pass one of them")
    cfg = load_config(DistillConfig, args.config, args.overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from distill.trainer import train

    r = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if r.final_dir is None:  # non-zero ranks under torchrun
        return 0
    bpb = ""
    if r.heldout_bpb_end is not None:
        start = f"{r.heldout_bpb_start:.4f} → " if r.heldout_bpb_start is not None else ""
        bpb = f" Held-out student bits/byte: {start}{r.heldout_bpb_end:.4f}."
    resumed = f" (resumed at step {r.resumed_from})" if r.resumed_from is not None else ""
    teachers = ", ".join(t.model for t in cfg.teachers) or "none"
    print(f"Distilled {cfg.student.model} with loss {cfg.loss.name} from {teachers} for {r.steps} steps{resumed} "
          f"in {r.seconds:.0f} s.{bpb} Final model: {r.final_dir}; metrics: {r.output_dir / 'metrics.jsonl'}, "
          f"plot: {r.output_dir / 'metrics.png'}.")
    return 0
