"""Metrics of a run: held-out bits/byte, one JSON line per logged step and per evaluation, and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill import distributed as dd


@torch.no_grad()
def heldout_bpb(model, tokenizer, text: str, max_length: int = 1024) -> float:
    """Bits per byte of ``text`` under the (possibly DDP-wrapped) model in eval mode; its mode is restored."""
    from surgery.evaluate import bits_per_byte

    m = dd.unwrap(model)
    was = m.training
    m.eval()
    try:
        return float(bits_per_byte(m, tokenizer, text, max_length=max_length, progress=False).bits_per_byte)
    finally:
        m.train(was)


def append_jsonl(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint being resumed (they will be redone)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
    path.write_text("".join(l + "\n" for l in keep), encoding="utf-8")


def plot_metrics(metrics_path: Path, out_png: Path, title: str = "") -> Path | None:
    """PNG with training loss (left) and held-out bits/byte (right) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
    tr = [r for r in rows if r.get("event") == "train"]
    ev = [r for r in rows if r.get("event") == "eval"]
    if not tr and not ev:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        axes[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], label="total")
        axes[0].plot([r["step"] for r in tr], [r.get("ce", r["loss"]) for r in tr], label="student CE", alpha=0.7)
        axes[0].set_xlabel("step"); axes[0].set_ylabel("loss"); axes[0].legend(); axes[0].set_title("training loss")
    if ev:
        axes[1].plot([r["step"] for r in ev], [r["heldout_bpb"] for r in ev], marker="o")
        axes[1].set_xlabel("step"); axes[1].set_ylabel("bits/byte"); axes[1].set_title("held-out bits/byte (student)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


