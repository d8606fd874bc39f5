"""Loads the ``nextsent`` items from the JSONL files beside this file (written by ../make_tasks.py)."""

import json
from pathlib import Path


def load(language: str, **_):
    import datasets

    path = Path(__file__).resolve().parent / f"nextsent_{language}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
