#!/usr/bin/env python3
"""Cut the small text excerpts committed under ``artifacts/texts/`` (standard library only).

Run it from anywhere; it writes next to itself and prints what it wrote::

    python3 artifacts/texts/make_texts.py            # (re)write the texts, SOURCES.md, manifest.json
    python3 artifacts/texts/make_texts.py --check    # rebuild in memory, compare with the files

Sources (both already on the machine; nothing is downloaded):

* The Debian Reference (Osamu Aoki, GPL-2+), Debian packages ``debian-reference-{en,de,fr,es,ja,zh-cn}``:
  ``/usr/share/debian-reference/debian-reference.LL.txt.gz``. The book is the same in every
  language and its section numbers ("1.2.3. Title" at the start of a line) are identical, so
  cutting by section number gives parallel excerpts.
* The CPython standard library (PSF-2.0): whole ``.py`` files of the interpreter under
  ``--stdlib`` (default: CPython 3.11.7 from pyenv).

What is cut:

* ``debian-reference.LL.heldout.txt``: the sections of groups ``HELDOUT_GROUPS`` that every
  translation translated completely (no English prose paragraph left verbatim in some languages
  but not others), so the six held-out files say the same thing. About 20 KB of English.
* ``debian-reference.LL.train.txt``: every section of chapters ``TRAIN_CHAPTERS`` outside the
  held-out groups. Translations keep the rare paragraphs their translators left in English out
  (they are English, not the language); the sections are the same in every language.
* Cleaning: the front matter and table of contents are skipped (the text starts at section 1.1);
  ASCII-art tables and their captions are dropped (cells wrap mid-word, so they are not prose);
  non-breaking spaces become spaces; the 4-space body indent is removed, deeper indents (command
  examples) kept; runs of blank lines collapse to one; UTF-8, LF, final newline.
* ``code.heldout.txt`` / ``code.train.txt``: whole standard-library modules (``CODE_HELDOUT`` and
  ``CODE_TRAIN``, no module in both), each preceded by a ``# file: name.py`` line.

The output is a pure function of the source files, so reruns are byte-identical.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEBIAN_DIR = Path("/usr/share/debian-reference")
STDLIB_DIR = Path(sysconfig.get_paths()["stdlib"])  # the texts were made from CPython 3.11.7
COPYRIGHT_FILE = Path("/usr/share/doc/debian-reference-common/copyright")

# File-name code -> Debian's language code.
LANGUAGES = {"en": "en", "de": "de", "fr": "fr", "es": "es", "ja": "ja", "zh": "zh-cn"}
HELDOUT_GROUPS = ("1.2",)  # "Unix-like filesystem": prose, commands and lists
TRAIN_CHAPTERS = ("1", "2", "9")  # "GNU/Linux tutorials", "Debian package management", "System tips"
CODE_HELDOUT = ("shlex.py", "fnmatch.py")
CODE_TRAIN = ("functools.py", "heapq.py", "contextlib.py", "fractions.py", "graphlib.py", "queue.py",
              "copy.py", "sched.py")

HEADING = re.compile(r"^(\d+(?:\.\d+)+|[A-Z](?:\.\d+)+)\. (\S.*)$")
CAPTION = re.compile(r"^\s*\S*\s?\d+\.\d+\.?\s")  # "Table 1.17. ...", "表1.1 ...", "Tabelle 1.1. ..."


def read_book(lang: str) -> dict[str, list[str]]:
    """Section number -> the section's lines (heading first), from section 1.1 to the end."""
    path = DEBIAN_DIR / f"debian-reference.{lang}.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().replace("\u00a0", " ").split("\n")
    # Skip front matter and the table of contents: the body starts at the "1.1." heading just
    # before the first "1.1.1." heading (lists of tables also start lines with "1.1.").
    first = next(i for i, line in enumerate(lines) if line.startswith("1.1.1. "))
    start = max(i for i in range(first) if lines[i].startswith("1.1. "))
    heads = [i for i in range(start, len(lines)) if HEADING.match(lines[i])]
    sections = {}
    for n, i in enumerate(heads):
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        sections[HEADING.match(lines[i]).group(1)] = lines[i:end]
    return sections


def blocks(lines: list[str]) -> list[list[str]]:
    """Split lines into blank-line separated blocks, trailing spaces removed."""
    out, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def clean_section(lines: list[str]) -> list[str]:
    """Paragraphs of one section: tables and their captions dropped, body indent removed."""
    kept: list[list[str]] = []
    for block in blocks(lines):
        first = block[0].strip()
        if first.startswith("+-") or (first.startswith("|") and first.endswith("|")):
            if len(kept) > 1 and CAPTION.match(kept[-1][0]):
                kept.pop()
            continue
        kept.append(block)
    return ["\n".join(line[4:] if line.startswith("    ") else line.lstrip() for line in b) for b in kept]


def is_prose(paragraph: str) -> bool:
    """An English sentence-like paragraph (not a command or a heading)."""
    return len(paragraph.split()) >= 8 and re.search(r"[a-z]{3,} [a-z]{3,} [a-z]{3,}", paragraph) is not None


def debian_texts() -> tuple[dict[str, dict[str, str]], dict]:
    """Return {lang: {"heldout": text, "train": text}} and facts for SOURCES.md."""
    books = {code: {h: clean_section(lines) for h, lines in read_book(deb).items()}
             for code, deb in LANGUAGES.items()}
    ids = [h for h in books["en"] if all(h in b for b in books.values())]
    # English paragraphs some translations left untranslated, per section. A paragraph verbatim in
    # every translation is language-neutral (command output, a licence notice) and stays; so does
    # an untranslated heading (it keeps the section numbering parallel).
    others = [c for c in LANGUAGES if c != "en"]
    untranslated = {h: {p for p in books["en"][h] if is_prose(p) and not HEADING.match(p.split("\n")[0])
                        and 0 < sum(p in books[c][h] for c in others) < len(others)} for h in ids}
    group = {h: ".".join(h.split(".")[:2]) for h in ids}
    heldout = [h for h in ids if group[h] in HELDOUT_GROUPS and not untranslated[h]]
    train = [h for h in ids if h.split(".")[0] in TRAIN_CHAPTERS and group[h] not in HELDOUT_GROUPS]
    out: dict[str, dict[str, str]] = {}
    dropped = {}
    for code, book in books.items():
        parts = {}
        for split, chosen in (("heldout", heldout), ("train", train)):
            paragraphs = []
            for h in chosen:
                for p in book[h]:
                    if code != "en" and p in untranslated[h]:
                        dropped[code] = dropped.get(code, 0) + 1
                        continue
                    paragraphs.append(p)
            parts[split] = "\n\n".join(paragraphs) + "\n"
        out[code] = parts
    facts = {"heldout_sections": heldout, "train_sections": train, "dropped_untranslated": dropped,
             "skipped_heldout_sections": [h for h in ids if group[h] in HELDOUT_GROUPS and untranslated[h]]}
    return out, facts


def code_text(files: tuple[str, ...]) -> str:
    parts = []
    for name in files:
        body = (STDLIB_DIR / name).read_text(encoding="utf-8").replace("\r\n", "\n").rstrip("\n")
        parts.append(f"# file: {name}\n{body}\n")
    return "\n".join(parts)


def debian_version() -> str:
    try:
        return subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "debian-reference-en"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        with gzip.open(Path("/usr/share/doc/debian-reference-common/changelog.gz"), "rt") as f:
            return re.search(r"\((.*?)\)", f.readline()).group(1)


def python_version() -> str:
    header = STDLIB_DIR.parents[1] / "include" / STDLIB_DIR.name / "patchlevel.h"
    match = re.search(r'#define PY_VERSION\s+"([^"]+)"', header.read_text()) if header.exists() else None
    return match.group(1) if match else STDLIB_DIR.name


def build() -> tuple[dict[str, str], dict]:
    """All output files as {name: content}, plus the manifest."""
    texts, facts = debian_texts()
    files: dict[str, str] = {}
    meta: dict[str, tuple[str, str]] = {}
    for code, parts in texts.items():
        for split, text in parts.items():
            name = f"debian-reference.{code}.{split}.txt"
            files[name], meta[name] = text, (code, split)
    files["code.heldout.txt"], meta["code.heldout.txt"] = code_text(CODE_HELDOUT), ("python", "heldout")
    files["code.train.txt"], meta["code.train.txt"] = code_text(CODE_TRAIN), ("python", "train")
    manifest = {name: {"language": meta[name][0], "split": meta[name][1], "bytes": len(text.encode("utf-8")),
                       "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
                for name, text in sorted(files.items())}
    files["SOURCES.md"] = sources_md(manifest, facts)
    files["manifest.json"] = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    return files, manifest


def sources_md(manifest: dict, facts: dict) -> str:
    copyright_line = next((line.strip() for line in COPYRIGHT_FILE.read_text().splitlines()
                           if line.startswith("Copyright:")), "Copyright: Osamu Aoki")
    deb, py = debian_version(), python_version()

    def source(lang: str) -> str:
        return f"CPython {py} stdlib | PSF-2.0" if lang == "python" else \
            f"debian-reference-{LANGUAGES[lang]} {deb} | GPL-2+"

    rows = "\n".join(f"| `{n}` | {m['language']} | {m['split']} | {m['bytes']:,} | {source(m['language'])} |"
                     for n, m in manifest.items())
    held, train = facts["heldout_sections"], facts["train_sections"]
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(facts["dropped_untranslated"].items())) or "none"
    return f"""# Shipped texts

Small excerpts committed so that tests and demos need no apt step. All files are UTF-8 with LF line
endings and end in a newline. `manifest.json` lists language, split, size and SHA-256 of each; the
script `make_texts.py` (standard library only) rewrites every file here byte for byte
(`python3 artifacts/texts/make_texts.py --check` verifies).

| file | language | split | bytes | source | licence |
|---|---|---|---:|---|---|
{rows}

## Debian Reference (`debian-reference.LL.{{heldout,train}}.txt`)

- Source: *Debian Reference* by Osamu Aoki, version {deb}, Debian packages `debian-reference-en`, `-de`,
  `-fr`, `-es`, `-ja`, `-zh-cn` (files `/usr/share/debian-reference/debian-reference.LL.txt.gz`; `zh`
  here is Debian's `zh-cn`).
- Licence: GPL-2+. From `/usr/share/doc/debian-reference-common/copyright`: "{copyright_line}",
  "License: GPL-2+ — This document may used under the terms the GNU General Public License version 2
  or higher." The book's own front matter reads "Copyright © 2013-2021 Osamu Aoki". Translators
  licensed their work under the same terms.
- Parallel: files of one split hold the same numbered sections in every language.
- Held-out: the {len(held)} sections under {", ".join(HELDOUT_GROUPS)} that all five translations
  translated completely: {", ".join(held)}. (A paragraph verbatim in all six languages, such as
  command output, counts as language-neutral.)
  Left out because some translation kept English paragraphs: {", ".join(facts["skipped_heldout_sections"]) or "none"}.
- Train: the {len(train)} sections of chapters {", ".join(TRAIN_CHAPTERS)} outside those groups (sections
  {train[0]} to {train[-1]}). English paragraphs left untranslated in a translation are dropped from
  that translation (paragraphs dropped: {dropped}).
- Cut: front matter, table of contents and lists of tables skipped (text starts at section 1.1);
  ASCII-art tables and their captions dropped; non-breaking spaces made spaces; the 4-space body indent
  removed (command examples keep their extra indent); blank-line runs collapsed.

## Python code (`code.{{heldout,train}}.txt`)

- Source: the standard library of CPython {py} (`Lib/` of the release).
- Licence: PSF-2.0 (Python Software Foundation License Version 2; "Copyright (c) 2001-2023 Python
  Software Foundation; All Rights Reserved").
- Held-out: {", ".join(CODE_HELDOUT)}. Train: {", ".join(CODE_TRAIN)}. Whole files, unmodified,
  each preceded by a `# file: name.py` line; no module is in both.
"""


def main(argv: list[str] | None = None) -> int:
    global DEBIAN_DIR, STDLIB_DIR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the files here instead of writing")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: next to this script)")
    parser.add_argument("--debian-dir", type=Path, default=DEBIAN_DIR)
    parser.add_argument("--stdlib", type=Path, default=STDLIB_DIR)
    args = parser.parse_args(argv)
    DEBIAN_DIR, STDLIB_DIR = args.debian_dir, args.stdlib
    missing = [p for p in (DEBIAN_DIR / "debian-reference.en.txt.gz", STDLIB_DIR / "shlex.py") if not p.exists()]
    if missing:
        print(f"error: missing source {missing[0]} (apt-get install debian-reference-en ... / pass --stdlib)",
              file=sys.stderr)
        return 2
    files, manifest = build()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).exists() or (args.out / n).read_bytes() != text.encode("utf-8")]
        print("up to date" if not stale else "differ: " + ", ".join(stale))
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_bytes(text.encode("utf-8"))
    for name, m in manifest.items():
        print(f"{m['bytes']:>9,}  {name}")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
