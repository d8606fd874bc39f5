"""`surgery ensemble`: generate from several models with different tokenizers, byte by byte."""

from __future__ import annotations

import time

from surgery.commands._model_options import add_model_options, model_options
from surgery.commands._sampling import add_member_arguments, add_sampling_arguments, member_problems, sampling_problems

NAME = "ensemble"
HELP = "generate from an ensemble of models with different vocabularies (byte level; --token-level approximate)"
DESCRIPTION = (
    "Convert each model to a byte-level LM and sample each byte from their weighted mixture (mix) or normalized "
    "weighted geometric mean (product). Works across vocabularies (e.g. SmolLM2 + Gemma-3). --token-level instead "
    "projects every model's next-token distribution into the first model's vocabulary (fast, approximate)."
)


def add_arguments(p):
    add_member_arguments(p)
    p.add_argument("--token-level", action="store_true",
                   help="approximate token-level ensemble in the first model's vocabulary (via projections)")
    p.add_argument("--byte-mode", choices=["canonical", "exact"], default="canonical",
                   help="byte-level conversion of each member (default canonical)")
    add_sampling_arguments(p)
    add_model_options(p)


def validate(args) -> None:
    from surgery.errors import ConfigError

    problems = member_problems(args)
    problems += sampling_problems(args)
    if problems:
        raise ConfigError(problems, "give one --weight per --model (or none), and valid sampling options")


def run(args) -> int:
    from surgery.loading import load_model, load_tokenizer

    validate(args)
    dtype, device = model_options(args)
    toks = [load_tokenizer(m, trust_remote_code=args.trust_remote_code) for m in args.model]
    models = [load_model(m, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code, tokenizer=t)
              for m, t in zip(args.model, toks)]
    t0 = time.time()
    prompt = args.prompt.encode("utf-8")
    if args.token_level:
        from surgery.bytelevel.ensemble import TokenEnsemble

        ens = TokenEnsemble(models, toks, args.weight, args.mode)
        out = ens.generate(prompt, args.max_bytes, args.temperature, args.top_p, args.seed)
        how = f"token level in {args.model[0]}'s vocabulary (approximate)"
    else:
        from surgery.bytelevel import ByteLM
        from surgery.bytelevel.ensemble import ByteEnsemble

        ens = ByteEnsemble([ByteLM(m, t, mode=args.byte_mode) for m, t in zip(models, toks)], args.weight,
                           args.mode)
        out = ens.generate(prompt, args.max_bytes, args.temperature, args.top_p, args.seed)
        how = f"byte level ({args.byte_mode}), forward passes per member {ens.forwards}"
    seconds = time.time() - t0
    weights = [round(float(w), 3) for w in ens.weights]
    print(args.prompt + out.decode("utf-8", errors="replace"))
    print(f"\nGenerated {len(out)} bytes from the {args.mode} of {', '.join(args.model)} (weights {weights}), {how}, "
          f"temperature {args.temperature}, top-p {args.top_p}, in {seconds:.1f} s "
          f"({len(out) / max(seconds, 1e-9):.2f} bytes/s).")
    return 0
