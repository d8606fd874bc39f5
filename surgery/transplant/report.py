"""What a transplant reports: the JSON report of the rows it computed (:func:`rows_report`), the
:class:`TransplantReport` that carries it with the tokenizer to save, and the model card written beside the weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from surgery.transplant.methods import SOURCE_NAMES


@dataclass
class TransplantReport:
    """What a transplant did.

    Attributes:
        tokenizer: the tokenizer to save with the model: the new one, or a copy of it when
            roles were filled, a chat template carried over or markers added.
        data: JSON-able report (method, parameters, counts, timings, ...).
        copied_rows: ``(n,)`` new ids whose rows were copied (exact + special), for heal.
    """

    tokenizer: object
    data: dict = field(default_factory=dict)
    copied_rows: np.ndarray | None = None

    def as_dict(self) -> dict:
        return dict(self.data)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=False, default=str) + "\n"


def rows_report(cfg, plan, old_vocab, new_vocab, new_tok, V_rows, V_pad, ex_new, sp_new, sp_old, targets,
                 unmatched_special, never, head, separate, tied, filled, added_markers, decision, missing,
                 timings) -> dict:
    """The JSON-able report of :func:`compute_rows` (``config_ids`` is filled by the caller)."""
    V_new = len(new_vocab)
    src_counts = {name: int((plan.source == code).sum()) for code, name in SOURCE_NAMES.items()
                  if (plan.source == code).any()}
    return {
        "method": cfg.method,
        "parameters": cfg.to_dict(),
        "old_vocab": {"size": len(old_vocab), "family": old_vocab.family, "hash": old_vocab.hash, "rows": V_rows},
        "new_vocab": {"size": V_new, "family": new_vocab.family, "hash": new_vocab.hash, "len_tokenizer": len(new_tok),
                      "rows_padded": V_pad},
        "counts": {
            "exact": int(len(ex_new)),
            "special_matched": int(len(sp_new)),
            "special_unmatched": int(len(unmatched_special)),
            "initialized": int(len(targets)),
            **src_counts,
            "undefined_or_padding": int(V_pad - len(ex_new) - len(sp_new) - len(targets) - len(unmatched_special)),
        },
        "never_emitted": int(len(never)),
        "head": "untied" if separate else ("tied" if head != "none" else "none"),
        "untied_by_request": bool(cfg.untie and tied),
        "filled_roles": filled,
        "added_chat_markers": added_markers,
        "chat_template": {"decision": decision, "missing_markers": missing},
        "config_ids": None,
        "special_map": {str(n): int(o) for n, o in zip(sp_new.tolist(), sp_old.tolist())},
        "method_stats": plan.stats,
        "timings_s": timings,
    }


def model_card(report: dict, base: str, tokenizer: str) -> str:
    """A short README.md for the output folder."""
    c = report["counts"]
    lines = [
        f"# {Path(str(base)).name} with the {Path(str(tokenizer)).name} tokenizer",
        "",
        f"Made by `surgery transplant` (method `{report['method']}`) from `{base}` and the tokenizer `{tokenizer}`.",
        "It loads with plain `transformers` (`AutoModelForCausalLM` / `AutoTokenizer`).",
        "",
        f"- vocabulary: {report['old_vocab']['size']} → {report['new_vocab']['size']} tokens "
        f"({report['new_vocab']['rows_padded']} embedding rows), head {report['head']}",
        f"- rows copied bit for bit: {c['exact']} shared tokens, {c['special_matched']} special tokens by role",
        f"- rows initialized by `{report['method']}`: {c['initialized']} "
        f"({', '.join(f'{k} {v}' for k, v in c.items() if k in ('local', 'global', 'hybrid', 'mean', 'omp', 'random'))})",
        f"- chat template: {report['chat_template']['decision']}",
        "",
        "Zero-shot transplanted models lose quality on text the new tokens cover; `surgery heal` trains the new rows.",
        "Details (parameters, counts, timings): `transplant_report.json`.",
        "",
    ]
    return "\n".join(lines)
