"""`surgery eval`: bits per byte of a causal LM on text files."""

from __future__ import annotations

import json
import time

from surgery.commands._model_options import add_model_options, model_options

NAME = "eval"
HELP = "bits per byte of a model on text files (tokenizer-neutral)"
DESCRIPTION = (
    "Score text files with a causal LM and report bits per UTF-8 byte. The text is encoded without special "
    "tokens and conditioned on one document-start token (BOS, else EOS); long texts use overlapping windows."
)


def add_arguments(p):
    p.add_argument("model", help="model: shipped asset name (e.g. smollm2-135m), local HF folder or hub id")
    p.add_argument("--text", nargs="+", required=True, help="UTF-8 text file(s)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own)")
    p.add_argument("--max-length", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--stride", type=int, default=None, help="new tokens scored per window (default max-length/2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    add_model_options(p)
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the hub")
    p.add_argument("--json", action="store_true", help="print one JSON object per text file")


def run(args) -> int:
    from surgery.errors import SurgeryError
    from surgery.evaluate import EvalOptions, bits_per_byte
    from surgery.loading import load_model, load_tokenizer
    from surgery.textio import read_text

    EvalOptions(args.max_length, args.stride, args.batch_size).check()  # numeric options before any loading
    texts = [(t, read_text(t)) for t in args.text]  # validate all inputs before loading a model
    tok = load_tokenizer(args.tokenizer or args.model, trust_remote_code=args.trust_remote_code)
    dtype, device = model_options(args)
    model = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code, tokenizer=tok)
    rows = []
    for path, text in texts:
        t0 = time.time()
        try:
            r = bits_per_byte(model, tok, text, args.max_length, args.stride, args.batch_size, progress=not args.json)
        except SurgeryError as e:
            raise SurgeryError(f"{path}: {e.message}", e.hint) from e
        d = {"model": args.model, "text": path, **r.as_dict(), "seconds": round(time.time() - t0, 2)}
        rows.append(d)
        if args.json:
            print(json.dumps(d))
    if not args.json:
        for d in rows:
            print(f"{d['text']}: {d['bits_per_byte']:.4f} bits/byte ({d['n_tokens']} tokens, {d['n_bytes']} bytes, "
                  f"{d['bytes_per_token']:.2f} bytes/token, {d['n_windows']} windows, {d['seconds']} s)")
        print(f"Scored {len(rows)} text(s) with {args.model} in windows of {rows[0]['max_length']} tokens "
              f"(stride {rows[0]['stride']}); bits/byte counts every text token, conditioned on one document-start token.")
    return 0
