"""`surgery supertokens train`: superword BPE tokenizers (SuperBPE, TokenAdapt chunks) and a BPE control."""

from __future__ import annotations

import argparse
import json

NAME = "supertokens"
HELP = "train a superword (Supertoken) BPE tokenizer as a Hugging Face folder"
DESCRIPTION = (
    "Train a byte-level BPE tokenizer whose tokens may span spaces: `superbpe` (default) learns subwords up to "
    "--transition tokens, then keeps merging without whitespace pre-tokenization; `chunks` is TokenAdapt's "
    "random-chunk Supertokens; `bpe` is plain BPE. The folder holds <unk> <s> </s> <pad> <|im_start|> <|im_end|>, "
    "a ChatML chat template and supertokens.json; --with-control adds the same-size standard BPE in OUT/bpe-control."
)


def add_arguments(p):
    from surgery.config_flags import add_config_arguments
    from surgery.tokenizer_design.supertokens import METHODS, SupertokenConfig

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    t = sub.add_parser("train", help="train a tokenizer from text files", description=DESCRIPTION)
    t.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    t.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 training text file(s)")
    t.add_argument("--out", required=True, help="output tokenizer folder")
    add_config_arguments(t, SupertokenConfig, fields=("vocab_size", "method", "transition", "transition_fraction",
                                                      "min_frequency", "chunk_min", "chunk_max", "seed"),
                         required=("vocab_size",), choices={"method": METHODS})
    t.add_argument("--with-control", action="store_true", help="also train the same-size standard BPE into OUT/bpe-control")
    t.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")


def run(args) -> int:
    from surgery.config_flags import config_from_args
    from surgery.tokenizer_design.supertokens import SupertokenConfig, train_supertokens

    cfg = config_from_args(SupertokenConfig, args)  # every bad value reported at once, exit 2
    res = train_supertokens(args.text, args.out, cfg, with_control=args.with_control, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(res.as_dict()))
        return 0
    msg = (f"Trained a {res.method} tokenizer of {res.vocab_size} tokens on {len(args.text)} file(s) in {res.seconds:.1f} s "
           f"and saved it to {res.out}: {res.bytes_per_token:.2f} bytes/token on the training text")
    if res.vocab_size < cfg.vocab_size:
        msg += f" (asked for {cfg.vocab_size}: the text supports no more merges)"
    if res.control_out:
        gain = 100 * (res.bytes_per_token / res.control_bytes_per_token - 1)
        msg += (f"; the standard BPE control ({res.control_vocab_size} tokens, {res.control_out}) gets "
                f"{res.control_bytes_per_token:.2f} ({gain:+.1f}%)")
    print(msg + ". Load it with AutoTokenizer.from_pretrained or pass it to `surgery transplant`.")
    return 0
