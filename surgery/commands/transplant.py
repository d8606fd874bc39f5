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
    "tokenizer), mean or random. OUT also gets transplant_report.json and a README.md model card. The checkpoint "
    "is streamed: only the input embedding and output head are read into memory; every other tensor is copied "
    "shard by shard, bit for bit and in its own dtype, so memory grows with vocabulary x hidden size, not with depth."
)


_FLAGS = ("method", "aux_model", "top_k", "temperature", "global_weight", "threshold", "io_split", "output_bias",
          "donor", "omp_k", "omp_ridge", "untie", "pad_to_multiple", "add_chat_markers", "device", "cache_dir", "seed")


def add_arguments(p):
    from surgery.config_flags import add_config_arguments
    from surgery.transplant import TransplantConfig
    from surgery.transplant.methods import METHODS

    p.add_argument("model", help="base model: asset name (e.g. smollm2-135m), HF folder or hub id")
    p.add_argument("new_tokenizer", help="new tokenizer: asset name (e.g. llama3-tokenizer), folder or hub id")
    p.add_argument("out", help="output folder")
    add_config_arguments(p, TransplantConfig, fields=_FLAGS, choices={"method": METHODS})
    p.add_argument("--calibration-text", nargs="+", default=(),
                   help="texts for fitting the logit-bias direction (default: the shipped train texts)")
    p.add_argument("--old-tokenizer", default=None, help="the model's tokenizer when MODEL has none")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="convert the output's floating-point tensors (default: keep the checkpoint's own dtype)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="output shard size limit, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``2GiB`` / a plain byte count as bytes.

    Raises:
        SurgeryError: anything else, or a size that is not positive.
    """
    import re

    from surgery.errors import SurgeryError

    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "KIB": 1024, "MIB": 1024**2,
             "GIB": 1024**3, "TIB": 1024**4}
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise SurgeryError(f"bad --max-shard-size {text!r}", "give a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def run(args) -> int:
    from surgery.config_flags import config_from_args, given_fields
    from surgery.transplant import TransplantConfig, transplant_checkpoint
    from surgery.transplant.aux_embeddings import default_cache_dir

    max_shard = parse_size(args.max_shard_size)
    extra = {"calibration_texts": tuple(args.calibration_text)} if args.calibration_text else {}
    if "cache_dir" not in given_fields(args):
        extra["cache_dir"] = str(default_cache_dir())
    cfg = config_from_args(TransplantConfig, args, extra=extra)  # every bad value at once, exit 2
    r = transplant_checkpoint(args.model, args.new_tokenizer, args.out, cfg, overwrite=args.overwrite,
                              old_tokenizer=args.old_tokenizer, dtype=args.dtype, max_shard_bytes=max_shard)
    c = r["counts"]
    init = ", ".join(f"{k} {v}" for k, v in c.items() if k in ("hybrid", "local", "global", "mean", "omp", "random"))
    print(f"Transplanted {r['new_tokenizer']} ({r['new_vocab']['size']} tokens, {r['new_vocab']['rows_padded']} rows) "
          f"into {r['base_model']} with {r['method']}: {c['exact']} exact and {c['special_matched']} special rows "
          f"copied, {c['initialized']} initialized ({init}), {c['special_unmatched']} unmatched special tokens; "
          f"head {r['head']}, chat template {r['chat_template']['decision']}; {r['timings_s']['wall']} s. "
          f"Wrote {args.out} (report: transplant_report.json).")
    return 0
