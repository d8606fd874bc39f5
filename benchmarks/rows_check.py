"""Benchmark check: two transplant outputs hold the same tensors bit for bit (rows unchanged by a speed-up).

    rows_check.py OLD_OUT NEW_OUT --check "what was compared"

Prints one JSON line (``kind: rows_check``): tensors compared, how many are bit-identical, the input
embedding's shape and dtype, whether the bias-direction fits in both reports are equal, and both
reports' wall times. Typical use: the same ``surgery transplant`` run with the code before and after a
change (``PYTHONPATH`` pointing at a checkout of the older commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bit_equal(x, y) -> bool:
    """Same dtype, shape and bytes."""
    import torch

    return x.dtype == y.dtype and x.shape == y.shape and x.view(-1).view(torch.uint8).equal(y.view(-1).view(torch.uint8))


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--check", required=True, help="what was compared (goes into the JSON line)")
    args = ap.parse_args()
    a, b = tensors(Path(args.old)), tensors(Path(args.new))
    same = sum(1 for k in a if k in b and bit_equal(a[k], b[k]))
    ra = json.loads((Path(args.old) / "transplant_report.json").read_text())
    rb = json.loads((Path(args.new) / "transplant_report.json").read_text())
    emb = next(k for k in a if "embed_tokens" in k)
    print(json.dumps({"benchmark": "scale", "kind": "rows_check", "check": args.check,
                      "dtype": str(a[emb].dtype).replace("torch.", ""), "shape": list(a[emb].shape),
                      "bit_identical": same == len(a) == len(b), "tensors_bit_identical": f"{same}/{len(a)}",
                      "same_names": set(a) == set(b),
                      "bias_direction_equal": ra.get("method_stats", {}).get("bias_direction")
                      == rb.get("method_stats", {}).get("bias_direction"),
                      "old_s": ra["timings_s"].get("wall"), "new_s": rb["timings_s"].get("wall")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
