"""`surgery generate`: sample from a model, token by token or byte by byte (prompts that end mid-token)."""

from __future__ import annotations

import time

NAME = "generate"
HELP = "generate text from a model; --bytes samples byte by byte (prompts may end inside a token)"
DESCRIPTION = (
    "Continue a prompt with a causal LM. By default tokens are sampled after the tokenized prompt. With --bytes "
    "the model is converted to a byte-level LM (sum over every tokenization that covers the prompt), so a prompt "
    "that ends in the middle of a word or token is continued without tokenization bias."
)


def add_arguments(p):
    p.add_argument("model", help="model: shipped asset name (e.g. smollm2-135m), local HF folder or hub id")
    p.add_argument("--prompt", required=True, help="text to continue (may end mid-word)")
    p.add_argument("--bytes", action="store_true", help="sample byte by byte from the byte-level conversion")
    p.add_argument("--mode", choices=["canonical", "exact"], default="canonical",
                   help="with --bytes: encodings the tokenizer can produce (default) or all of them (exact)")
    p.add_argument("--max-bytes", type=int, default=200, help="stop after this many bytes (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")


def validate(args) -> None:
    """Check the numeric options before anything is loaded (all problems at once)."""
    from surgery.errors import ConfigError

    problems = []
    if args.max_bytes < 1:
        problems.append(f"--max-bytes must be >= 1, got {args.max_bytes}")
    if args.temperature < 0:
        problems.append(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.prompt:
        problems.append("--prompt is empty")
    if problems:
        raise ConfigError(problems, "fix the options above")


def run(args) -> int:
    from surgery.loading import default_device, load_model, load_tokenizer

    validate(args)
    tok = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, device=args.device or default_device(), trust_remote_code=args.trust_remote_code)
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
