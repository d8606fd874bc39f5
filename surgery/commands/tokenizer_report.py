"""`surgery tokenizer-report`: compression, token premiums, overlap and segmentation of tokenizers."""

from __future__ import annotations

import json

NAME = "tokenizer-report"
HELP = "compare tokenizers on texts: bytes/token, premium vs English, overlap, numbers, ambiguity"
DESCRIPTION = (
    "For each tokenizer and text: bytes per token, tokens per word, token premium relative to the English "
    "parallel text (a.LL.b.txt vs a.en.b.txt among the given texts), share of words with another encoding no "
    "longer than the tokenizer's own; per tokenizer: digits per token for 1-6 digit numbers; per pair: shared "
    "vocabulary through the canonical token bytes. Prints Markdown tables (or JSON) and optionally a PNG chart."
)


def add_arguments(p):
    p.add_argument("tokenizers", nargs="+", metavar="TOKENIZER",
                   help="shipped asset name (e.g. llama3-tokenizer), tokenizer folder or hub id")
    p.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 text file(s)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="also write a bar chart (PNG)")
    p.add_argument("--max-words", type=int, default=300,
                   help="distinct words per text checked for ambiguity (seeded sample; default 300)")


def run(args) -> int:
    from surgery.errors import SurgeryError
    from surgery.textio import read_text
    from surgery.tokenizer_design.report import format_report, plot_report, tokenizer_report

    if args.max_words < 1:
        raise SurgeryError(f"--max-words must be >= 1, got {args.max_words}", "pass a positive number")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise SurgeryError(f"--plot {args.plot!r} is not a .png path", "pass e.g. --plot report.png")
    texts = [(t, read_text(t)) for t in args.text]  # validate every input before loading tokenizers
    report = tokenizer_report(args.tokenizers, texts, max_words=args.max_words)
    if args.plot:
        plot_report(report, args.plot)
    if args.json:
        print(json.dumps(report.as_dict()))
        return 0
    print(format_report(report))
    print()
    print(f"Measured {len(report.tokenizers)} tokenizer(s) on {len(texts)} text(s) in {report.seconds:.1f} s"
          + (f"; chart written to {args.plot}" if args.plot else "")
          + ". Premium = tokens / tokens of the English parallel; ambiguous = another vocabulary path no longer "
            "than the tokenizer's own spells the word.")
    return 0
