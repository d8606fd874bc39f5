"""Build the local lm-evaluation-harness task ``nextsent`` from the shipped held-out texts.

Run from anywhere (standard library only; output is deterministic)::

    python3 artifacts/tasks/make_tasks.py          # rewrite artifacts/tasks/nextsent/
    python3 artifacts/tasks/make_tasks.py --check  # verify the committed files are what this script writes

Each item is one sentence of ``artifacts/texts/debian-reference.LL.heldout.txt`` (the context) and four
candidate continuations: the sentence that really follows it in the same paragraph, and three distractor
sentences drawn from elsewhere in the same text (at least five sentences away, of comparable length). The
model must give the real next sentence the highest likelihood (lm-eval ``multiple_choice``: ``acc`` and the
length-normalized ``acc_norm``). One task per language (``nextsent_en`` ... ``nextsent_zh``) and the group
``nextsent`` of all of them.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXTS = HERE.parent / "texts"
OUT = HERE / "nextsent"
LANGS = ("en", "de", "fr", "es", "ja", "zh")
CJK = ("ja", "zh")
ITEMS = 30  # per language
CHOICES = 4
MIN_CHARS = {"cjk": 12, "latin": 40}
MAX_CHARS = {"cjk": 90, "latin": 220}
SEED = 1234

LOADER = '''"""Loads the ``nextsent`` items from the JSONL files beside this file (written by ../make_tasks.py)."""

import json
from pathlib import Path


def load(language: str, **_):
    import datasets

    path = Path(__file__).resolve().parent / f"nextsent_{language}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''

YAML = """task: nextsent_{lang}
tag: nextsent_tasks
custom_dataset: !function loader.load
dataset_kwargs:
  language: {lang}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
target_delimiter: "{delim}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GROUP = """group: nextsent
task:
{tasks}
aggregate_metric_list:
  - metric: acc
    aggregation: mean
    weight_by_size: true
metadata:
  version: 1.0
"""


def paragraphs(text: str, cjk: bool) -> list[str]:
    """Prose paragraphs (no headings, list items or indented blocks), lines joined."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(ln.startswith((" ", "\t")) or not ln.strip() for ln in lines):
            continue  # lists, tables, code
        if re.match(r"^\d+(\.\d+)*\.? ", lines[0]):
            continue  # section heading
        out.append(("" if cjk else " ").join(ln.strip() for ln in lines))
    return out


def sentences(par: str, cjk: bool) -> list[str]:
    if cjk:
        parts = re.findall(r"[^。！？]+[。！？]", par)
    else:
        parts = re.split(r"(?<=[.!?])\s+(?=[A-ZÀ-ÖØ-Þ¿¡\"«(])", par)
    return [p.strip() for p in parts if p.strip()]


def build(lang: str) -> list[dict]:
    cjk = lang in CJK
    kind = "cjk" if cjk else "latin"
    text = (TEXTS / f"debian-reference.{lang}.heldout.txt").read_text(encoding="utf-8")
    flat, pairs = [], []  # all sentences in order; (index of context, index of next) within one paragraph
    for par in paragraphs(text, cjk):
        sents = sentences(par, cjk)
        base = len(flat)
        flat.extend(sents)
        pairs.extend((base + i, base + i + 1) for i in range(len(sents) - 1))

    def ok(s: str) -> bool:
        return MIN_CHARS[kind] <= len(s) <= MAX_CHARS[kind]

    rng = random.Random(f"{SEED}-{lang}")
    items = []
    for i, j in pairs:
        if not (ok(flat[i]) and ok(flat[j])):
            continue
        pool = [k for k in range(len(flat)) if abs(k - j) >= 5 and ok(flat[k]) and flat[k] != flat[j]
                and 0.5 <= len(flat[k]) / len(flat[j]) <= 2.0]
        if len(pool) < CHOICES - 1:
            continue
        choices = [flat[j]] + [flat[k] for k in rng.sample(pool, CHOICES - 1)]
        order = list(range(CHOICES))
        rng.shuffle(order)
        items.append({"id": f"{lang}-{len(items)}", "language": lang, "context": flat[i],
                      "choices": [choices[o] for o in order], "label": order.index(0)})
    if len(items) < ITEMS:
        sys.exit(f"{lang}: only {len(items)} items (want {ITEMS})")
    keep = sorted(rng.sample(range(len(items)), ITEMS))
    return [dict(items[k], id=f"{lang}-{n}") for n, k in enumerate(keep)]


def files() -> dict[str, str]:
    out = {"loader.py": LOADER}
    for lang in LANGS:
        out[f"nextsent_{lang}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in build(lang))
        out[f"nextsent_{lang}.yaml"] = YAML.format(lang=lang, delim="" if lang in CJK else " ")
    out["nextsent.yaml"] = GROUP.format(tasks="\n".join(f"  - nextsent_{lang}" for lang in LANGS))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the committed files instead of writing them")
    args = ap.parse_args()
    want = files()
    if args.check:
        bad = [n for n, s in want.items() if not (OUT / n).is_file() or (OUT / n).read_text(encoding="utf-8") != s]
        print("ok" if not bad else f"differ: {', '.join(bad)}")
        return 1 if bad else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, s in want.items():
        (OUT / name).write_text(s, encoding="utf-8")
    print(f"wrote {len(want)} files to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
