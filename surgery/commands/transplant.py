"""`surgery transplant`: give a checkpoint a new tokenizer."""

from __future__ import annotations

NAME = "transplant"
HELP = "transplant a new tokenizer into a model (TokenAdapt hybrid, donor OMP, baselines)"
DESCRIPTION = (
    "Give MODEL the vocabulary of NEW_TOKENIZER and write a Hugging Face folder to OUT. Tokens with identical "
    "bytes keep their rows bit for bit, special tokens are matched by role, and the remaining rows come from "
    "--method: tokenadapt (default; TokenAdapt local+global hybrid over sentence-transformers embeddings of the "
    "token strings, plus a logit offset for merged tokens and, with --untie, separate input/output rows), "
    "tokenadapt-published (the heuristic as published), omp (needs --donor, a model that already speaks the new "
    "tokenizer), mean or random. OUT also gets transplant_report.json and a README.md model card."
)


def add_arguments(p):
    from surgery.transplant.methods import METHODS

    p.add_argument("model", help="base model: asset name (e.g. smollm2-135m), HF folder or hub id")
    p.add_argument("new_tokenizer", help="new tokenizer: asset name (e.g. llama3-tokenizer), folder or hub id")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", default="tokenadapt", choices=sorted(METHODS), help="row init method (default tokenadapt)")
    p.add_argument("--aux-model", default="minilm", help="sentence-transformers model for tokenadapt (default minilm)")
    p.add_argument("--top-k", type=int, default=3, help="global heuristic neighbours (default 3)")
    p.add_argument("--temperature", type=float, default=0.3, help="softmax temperature (default 0.3)")
    p.add_argument("--global-weight", type=float, default=0.3, help="weight of the global estimate (default 0.3)")
    p.add_argument("--threshold", type=float, default=0.0, help="drop neighbours below this cosine (default 0)")
    p.add_argument("--io-split", default="pieces", choices=["pieces", "none"],
                   help="tokenadapt: pieces = logit offset for merged tokens + (untied) separate input/output rows; none = as published")
    p.add_argument("--output-bias", type=float, default=None,
                   help="tokenadapt: logit offset per extra piece of a merged token (default -1.0 tied, -1.5 untied)")
    p.add_argument("--calibration-text", nargs="+", default=(),
                   help="texts for fitting the logit-bias direction (default: the shipped train texts)")
    p.add_argument("--donor", default=None, help="omp: donor model with the new tokenizer")
    p.add_argument("--omp-k", type=int, default=8, help="omp: non-zero coefficients per token (default 8)")
    p.add_argument("--omp-ridge", type=float, default=1e-2,
                   help="omp: relative Tikhonov term of the coefficient fits (default 0.01; 0 = none)")
    p.add_argument("--untie", action="store_true", help="give a tied model its own output head")
    p.add_argument("--pad-to-multiple", type=int, default=128, help="pad embedding rows to a multiple (default 128)")
    p.add_argument("--add-chat-markers", action="store_true",
                   help="add the old chat template's markers to a new tokenizer that has no template")
    p.add_argument("--old-tokenizer", default=None, help="the model's tokenizer when MODEL has none")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--device", default=None, help="cpu or cuda for the numeric work (default: cuda if available)")
    p.add_argument("--cache-dir", default=None, help="aux embedding cache (default artifacts/cache/aux)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args) -> int:
    from surgery.transplant import TransplantConfig, transplant_checkpoint
    from surgery.transplant.aux_embeddings import default_cache_dir

    cfg = TransplantConfig(
        method=args.method, aux_model=args.aux_model, top_k=args.top_k, temperature=args.temperature,
        global_weight=args.global_weight, threshold=args.threshold, io_split=args.io_split,
        output_bias=args.output_bias, calibration_texts=tuple(args.calibration_text), donor=args.donor,
        omp_k=args.omp_k, omp_ridge=args.omp_ridge, untie=args.untie, pad_to_multiple=args.pad_to_multiple,
        add_chat_markers=args.add_chat_markers, seed=args.seed, device=args.device,
        cache_dir=args.cache_dir or str(default_cache_dir()),
    )
    r = transplant_checkpoint(args.model, args.new_tokenizer, args.out, cfg, overwrite=args.overwrite,
                              old_tokenizer=args.old_tokenizer, dtype=args.dtype)
    c = r["counts"]
    init = ", ".join(f"{k} {v}" for k, v in c.items() if k in ("hybrid", "local", "global", "mean", "omp", "random"))
    print(f"Transplanted {r['new_tokenizer']} ({r['new_vocab']['size']} tokens, {r['new_vocab']['rows_padded']} rows) "
          f"into {r['base_model']} with {r['method']}: {c['exact']} exact and {c['special_matched']} special rows "
          f"copied, {c['initialized']} initialized ({init}), {c['special_unmatched']} unmatched special tokens; "
          f"head {r['head']}, chat template {r['chat_template']['decision']}; {r['timings_s']['wall']} s. "
          f"Wrote {args.out} (report: transplant_report.json).")
    return 0
