"""A logit-bias direction: the head has no bias, but the final hidden states nearly do.

The hidden states ``h`` that feed a causal LM's head lie close to an affine plane:
there is a vector ``δ`` with ``h·δ ≈ 1`` for almost every position (SmolLM2-135M, fitted on
4k tokens of four languages: mean 0.97-1.0, std ≈ 0.07 on other text; ``|δ| ≈ 0.16`` against
row norms ≈ 3.2). Adding ``b·δ`` to a head row therefore shifts that token's logit by about
``b`` everywhere — a per-token bias, expressed in weights plain ``transformers`` loads.

The transplant uses it for merged tokens: the probability of a token made of pieces
``p1 … pn`` is ``P(p1)·P(p2…pn | p1)``, so its logit should sit below its first piece's,
by more the more pieces (that start a character) it has. ``δ`` is fitted by ridge regression
on hidden states of calibration text (the shipped train texts when present, else text the
model writes itself).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)


def default_calibration_texts(max_chars: int = 4000) -> list[str]:
    """Slices of the shipped train texts (``artifacts/texts/*.train.txt``), or ``[]`` when absent."""
    root = Path(__file__).resolve().parents[2] / "artifacts" / "texts"
    out = []
    for p in sorted(root.glob("*.train.txt")):
        try:
            out.append(p.read_text(encoding="utf-8")[:max_chars])
        except (OSError, UnicodeDecodeError):
            continue
    return out


def length_groups(seqs: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the ``(1, L)`` sequences of each length, in order of first appearance: each group
    runs as one ``(n, L)`` batch (no padding), one pass over the weights for all its sequences."""
    groups: dict[int, list[int]] = {}
    for j, s in enumerate(seqs):
        groups.setdefault(int(s.shape[-1]), []).append(j)
    return list(groups.values())


def ungroup(groups: list[list[int]], states: list[torch.Tensor]) -> torch.Tensor:
    """``(Σ L_i, d)``: the states of each group's batch (``(n_b · L_b, d)``) back in sequence order."""
    out: list[torch.Tensor | None] = [None] * sum(len(g) for g in groups)
    for g, h in zip(groups, states):
        for j, part in zip(g, h.chunk(len(g))):
            out[j] = part
    return torch.cat(out)


class _Stop(Exception):
    """Raised by the head's pre-hook: the head inputs are all we need, the logits are skipped."""


@torch.no_grad()
def head_inputs(model, tokenizer, texts: list[str], max_tokens: int = 384, sample_tokens: int = 1024
                ) -> torch.Tensor:
    """Hidden states entering the output head: ``(N, d)`` float32.

    Uses a forward pre-hook on the head, so architecture details (final norm, soft-capping
    after the head) do not matter, and stops the forward there (no logits are computed).
    Texts whose token counts are equal run as one batch (:func:`length_groups`; the rows of a
    batch equal those of one forward per text on CPU for the shipped models, not for tiny ones,
    whose GEMMs take other kernels). Without texts, the model samples ``sample_tokens`` tokens
    from its document-start token.
    """
    from surgery.evaluate import document_start_id

    head = model.get_output_embeddings()
    grabbed: list[torch.Tensor] = []

    def grab(mod, inp):
        grabbed.append(inp[0].detach().float().reshape(-1, inp[0].shape[-1]))
        raise _Stop

    device = next(model.parameters()).device
    start = document_start_id(tokenizer)
    seqs = []
    if texts:
        for t in texts:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]
            seqs.append(torch.tensor([([start] if start is not None else []) + ids], device=device))
    else:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        prompt = torch.tensor([[start if start is not None else 0]] * 4, device=device)
        seqs.append(model.generate(prompt, max_new_tokens=sample_tokens // 4, do_sample=True, temperature=1.0,
                                   top_k=0, pad_token_id=start or 0))
    groups = length_groups(seqs)
    hook = head.register_forward_pre_hook(grab)
    try:
        for g in groups:
            try:
                model(input_ids=torch.cat([seqs[j] for j in g]))
            except _Stop:
                pass
    finally:
        hook.remove()
    return ungroup(groups, grabbed)


def bias_direction(hidden: torch.Tensor, ridge: float = 100.0) -> tuple[torch.Tensor, dict]:
    """Ridge fit of ``δ`` with ``hidden @ δ ≈ 1``.

    Args:
        hidden: ``(N, d)`` head inputs.

    Returns:
        ``(δ (d,), stats)`` with the fit's mean, std and ``|δ|``.
    """
    H = hidden.double()
    d = H.shape[1]
    delta = torch.linalg.solve(H.T @ H + ridge * torch.eye(d, dtype=H.dtype), H.T @ torch.ones(H.shape[0], dtype=H.dtype))
    fit = H @ delta
    return delta.float(), {"n": int(H.shape[0]), "fit_mean": round(float(fit.mean()), 4),
                           "fit_std": round(float(fit.std()), 4), "norm": round(float(delta.norm()), 4)}
