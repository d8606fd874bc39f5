"""`surgery heal`: short training of a transplanted model's new rows."""

from __future__ import annotations

NAME = "heal"
HELP = "train only the new embedding/head rows of a transplanted model (optionally LoRA), resumable"
DESCRIPTION = (
    "Train the rows that `surgery transplant` initialized (copied rows stay frozen bit for bit; the list is in "
    "MODEL/transplant_rows.json) with next-token loss on --text files, for --steps N or --minutes M, on the GPU "
    "when there is one. --lora also trains LoRA adapters on the body (merged at the end). A resumable state is "
    "written every --checkpoint-every steps next to OUT; --resume continues it. Writes a new HF folder with "
    "heal_metrics.jsonl and heal_summary.json."
)


def add_arguments(p):
    p.add_argument("model", help="transplanted model folder (from `surgery transplant`)")
    p.add_argument("--text", nargs="+", required=True, help="UTF-8 training text file(s)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--minutes", type=float, help="wall-clock budget in minutes")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the new rows (default 2e-3)")
    p.add_argument("--negatives", type=int, default=1024,
                   help="also train the head rows of the N wrong tokens each batch favours most (default 1024; 0 = off)")
    p.add_argument("--head-only", action="store_true",
                   help="train head rows only: the body runs forward only (faster steps); default: input and head rows")
    p.add_argument("--lora", action="store_true", help="also train LoRA adapters (peft) on the body")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--train-rows", default="new", choices=["new", "all"],
                   help="new: only rows the transplant initialized (default); all: every row")
    p.add_argument("--autocast", default="auto", choices=["auto", "bf16", "off"],
                   help="bf16 mixed precision (auto: where the hardware has it)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable states (default 50)")
    p.add_argument("--eval-text", default=None, help="text scored in bits/byte before and after")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the saved heal state of OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from surgery.transplant.config import HealConfig
    from surgery.transplant.heal import heal_checkpoint

    cfg = HealConfig(steps=args.steps, minutes=args.minutes, lr=args.lr, lora=args.lora, lora_rank=args.lora_rank,
                     seq_len=args.seq_len, batch_size=args.batch_size, train_rows=args.train_rows,
                     checkpoint_every=args.checkpoint_every, device=args.device, seed=args.seed,
                     autocast=args.autocast, input_rows=not args.head_only,
                     negatives=args.negatives)
    s = heal_checkpoint(args.model, args.text, args.out, cfg, overwrite=args.overwrite, resume=args.resume,
                        eval_path=args.eval_text)
    bpb = ""
    if s.get("bits_per_byte_before") is not None:
        bpb = f" Bits/byte on {args.eval_text}: {s['bits_per_byte_before']:.4f} → {s['bits_per_byte_after']:.4f}."
    print(f"Healed {args.model} for {s['steps']} steps ({s['seconds']} s on {s['device']}, "
          f"{s['tokens_seen']} tokens, {'LoRA + ' if args.lora else ''}{args.train_rows} rows): loss "
          f"{s['loss_first']} → {s['loss_last10']} (mean of the last 10 steps).{bpb} Wrote {args.out} "
          f"(heal_metrics.jsonl, heal_summary.json).")
    return 0
