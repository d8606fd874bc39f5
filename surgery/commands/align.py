"""`surgery align`: build and save the sparse projection between two tokenizers, with a coverage report."""

from __future__ import annotations

import json

NAME = "align"
HELP = "align two vocabularies: sparse projection A→B and a coverage report"
DESCRIPTION = (
    "Build the X-Token projection W (V_A, V_B) between two tokenizers from their canonical token bytes "
    "(exact matches, special tokens by role, re-encoding decompositions) and report how each token category maps."
)


def add_arguments(p):
    p.add_argument("tokenizer_a", help="rows of W (the student in distillation): asset name, folder or hub id")
    p.add_argument("tokenizer_b", help="columns of W (the teacher)")
    p.add_argument("--out", default=None, help="save the alignment here (.safetensors, with FILE.json metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--top-k", type=int, default=32, help="entries kept per row (default 32)")
    p.add_argument("--max-pieces", type=int, default=4, help="pieces kept when re-encoding (default 4)")
    p.add_argument("--no-reverse", action="store_true", help="skip the B→A re-encoding pass")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def run(args) -> int:
    from surgery.loading import load_tokenizer
    from surgery.errors import ConfigError, SurgeryError
    from surgery.vocab.api import align_tokenizers
    from surgery.vocab.projection import ProjectionConfig
    from surgery.checkpoint import check_not_an_input
    from surgery.vocab.store import check_alignment_path, save_alignment

    if args.out:  # before the work: not into a tokenizer, not over an alignment without --overwrite
        check_not_an_input(args.out, (args.tokenizer_a, args.tokenizer_b))
        check_alignment_path(args.out, args.overwrite)
    try:
        cfg = ProjectionConfig(max_pieces=args.max_pieces, top_k=args.top_k, reverse=not args.no_reverse)
    except ConfigError as e:  # name the command-line options, not the config fields
        raise ConfigError([p.replace("top_k", "--top-k").replace("max_pieces", "--max-pieces") for p in e.problems],
                          "pass --top-k >= 0 (0 keeps every entry) and --max-pieces >= 1") from e
    ta, tb = load_tokenizer(args.tokenizer_a), load_tokenizer(args.tokenizer_b)
    try:
        P, va, vb, report = align_tokenizers(ta, tb, cfg, args.tokenizer_a, args.tokenizer_b)
    except ValueError as e:
        raise SurgeryError(str(e), "use a byte-level BPE, SentencePiece or WordPiece tokenizer") from e
    if args.out:
        save_alignment(P, args.out, overwrite=args.overwrite,
                       extra={"tokenizer_a": args.tokenizer_a, "tokenizer_b": args.tokenizer_b})
        report["out"] = str(args.out)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"A = {args.tokenizer_a} ({va.family}, {len(va)} ids)   B = {args.tokenizer_b} ({vb.family}, {len(vb)} ids)")
    print(f"{'':16s}{'tokens':>8s}{'exact':>8s}{'decomp':>8s}{'special':>8s}{'unmapped':>9s}{'entries':>8s}")
    for c, r in report["categories"].items():
        print(f"{c:16s}{r['tokens']:8d}{r['exact']:8d}{r['decomposed']:8d}{r['special']:8d}{r['unmapped']:9d}"
              f"{r['mean_entries']:8.2f}")
        for ex in r["examples"][:2]:
            print(f"{'':18s}{ex['token']} -> " + ", ".join(f"{t} {w}" for t, w in ex["maps_to"]))
    print(
        f"Aligned {len(va)} tokens of A to {len(vb)} of B in {report['seconds_surfaces'] + report['seconds_projection']:.1f} s: "
        f"{report['exact']} exact, {report['decomposed']} decomposed, {report['special']} special, "
        f"{report['unmapped']} unmapped ({report['shared_surfaces']} distinct shared surfaces, {report['nnz']} non-zeros)"
        + (f"; {report['never_emitted']} never-emitted twins of A left empty" if report["never_emitted"] else "")
        + (f"; {report['b']['never_emitted']} never-emitted twins of B get no entry" if report["b"]["never_emitted"] else "")
        + (f"; saved to {args.out}." if args.out else "; not saved (pass --out FILE).")
    )
    return 0
