"""One call from two tokenizers to a projection with its report (used by `surgery align` and benchmarks)."""

from __future__ import annotations

import time

from surgery.vocab.audit import audit
from surgery.vocab.projection import Projection, ProjectionConfig, build_projection
from surgery.vocab.surfaces import Vocabulary, canonical_vocabulary


def align_tokenizers(tok_a, tok_b, config: ProjectionConfig | None = None, name_a: str = "", name_b: str = ""
                     ) -> tuple[Projection, Vocabulary, Vocabulary, dict]:
    """Canonical vocabularies of two tokenizers, their projection and a coverage report."""
    t0 = time.time()
    va = canonical_vocabulary(tok_a, name_a)
    vb = canonical_vocabulary(tok_b, name_b)
    t1 = time.time()
    P = build_projection(va, vb, config)
    report = {
        "a": {"name": name_a, "family": va.family, "size": len(va), "never_emitted": int(len(va.never_emitted))},
        "b": {"name": name_b, "family": vb.family, "size": len(vb), "never_emitted": int(len(vb.never_emitted))},
        **P.counts(),
        "shared_surfaces": len(set(va.surface_to_id) & set(vb.surface_to_id)),
        "nnz": int(P.matrix.nnz),
        "seconds_surfaces": round(t1 - t0, 2),
        "seconds_projection": round(P.seconds, 2),
        "categories": audit(P, va, vb),
    }
    return P, va, vb, report
