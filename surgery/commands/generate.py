"""`surgery generate`: sample from a model, token by token or byte by byte (prompts that end mid-token)."""

from __future__ import annotations

import time

from surgery.commands._model_options import add_model_options, model_options
from surgery.commands._sampling import add_sampling_arguments, sampling_problems

NAME = "generate"
HELP = "generate text from a model; --bytes samples byte by byte (prompts may end inside a token)"
DESCRIPTION = (
    "Continue a prompt with a causal LM. By default tokens are sampled after the tokenized prompt. With --bytes "
    "the model is converted to a byte-level LM (sum over every tokenization that covers the prompt), so a prompt "
    "that ends in the middle of a word or token is continued without tokenization bias."
)


def add_arguments(p):
    p.add_argument("model", help="model: shipped asset name (e.g. smollm2-135m), local HF folder or hub id")
    p.add_argument("--bytes", action="store_true", help="sample byte by byte from the byte-level conversion")
    p.add_argument("--mode", choices=["canonical", "exact"], default="canonical",
                   help="with --bytes: encodings the tokenizer can produce (default) or all of them (exact)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    add_sampling_arguments(p)
    add_model_options(p)


def validate(args) -> None:
    """Check the numeric options before anything is loaded (all problems at once)."""
    from surgery.errors import ConfigError

    problems = sampling_problems(args)
    if problems:
        raise ConfigError(problems, "fix the options above")


def run(args) -> int:
    from surgery.loading import load_model, load_tokenizer

    validate(args)
    dtype, device = model_options(args)
    tok = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code, tokenizer=tok)
    t0 = time.time()
    if args.bytes:
        from surgery.bytelevel import ByteLM

        blm = ByteLM(model, tok, mode=args.mode)
        out = blm.generate(args.prompt.encode("utf-8"), args.max_bytes, args.temperature, args.top_p, args.seed)
        how = f"byte level ({args.mode} mode), {blm.forwards} forward passes"
    else:
        from surgery.bytelevel.fim import generate_tokens

        out = generate_tokens(model, tok, args.prompt, args.max_bytes, args.temperature, args.top_p, args.seed)
        how = "token level"
    seconds = time.time() - t0
    print(args.prompt + out.decode("utf-8", errors="replace"))
    print(f"\nGenerated {len(out)} bytes after a {len(args.prompt.encode('utf-8'))}-byte prompt with {args.model}, "
          f"{how}, temperature {args.temperature}, top-p {args.top_p}, in {seconds:.1f} s "
          f"({len(out) / max(seconds, 1e-9):.2f} bytes/s).")
    return 0
