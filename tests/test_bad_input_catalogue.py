"""The bad-input catalogue: every command, every kind of bad input, one table.

Each row runs one ``surgery`` command on tiny models (hidden 32, 2 layers) that carry real shipped
tokenizers, against one broken input, and checks what a user sees: exit status 2, exactly one line on
stderr (``error: ... (hint: ...)``), no traceback, nothing written anywhere in the work folder, and
every input byte for byte as it was. Most rows run in-process (``surgery.cli.main``); a few run the
real ``surgery`` process so that library warnings printed at import or load time are caught too.

Stale or broken *caches* (aux embeddings, teacher top-k) are not the user's input: they are rebuilt
with a log line, which their own tests check (tests/surgery/transplant/test_aux_cache.py).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from broken_inputs import (alignment, alignment_sidecar, build_world, corrupt_config, corrupt_tokenizer,
                           corrupt_weights, distill_yaml, distill_yaml_with, distill_yaml_writing_into, encoder_model,
                           existing_dir, existing_file, model_b_with_tokenizer_a, model_missing_a_tensor,
                           model_with_corrupt_tokenizer, nan_model, no_config, output_holding_the_text, rows_file,
                           text_dir, tokenizer_copy, truncated_model, truncated_tokenizer, unreadable_text, yaml_file)
from helpers import asset_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Inputs shared by every row (never modified by a row: checked by hash)."""
    return build_world(tmp_path_factory)


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    argv: Callable  # (world, case_dir, made) -> list[str]
    make: Callable | None = None  # (world, case_dir) -> Path: the broken input, built before the snapshot
    match: str = ""  # regular expression the error line must contain (case-insensitive)
    subprocess: bool = False
    owner_note: str = field(default="")


def W(key):
    return lambda w, d, m: str(w[key])


def c(id, argv, make=None, match="", **kw):
    return Case(id, argv, make, match=match, **kw)


A, B, TXT = "a", "b", "text"
LM_EVAL_TASK = ["--tasks", "nextsent_en", "--include-path",
                str(Path(__file__).resolve().parents[1] / "artifacts" / "tasks" / "nextsent")]
CASES = [
    # ---------------------------------------------------------------- eval
    c("eval-missing-model", lambda w, d, m: ["eval", str(d / "nope"), "--text", str(w[TXT])], match="does not exist"),
    c("eval-no-config", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], no_config, "config.json"),
    c("eval-corrupt-config", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], corrupt_config, "config"),
    c("eval-truncated-weights", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], truncated_model, "truncated"),
    c("eval-corrupt-weights", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], corrupt_weights, "corrupt"),
    c("eval-nan-weights", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], nan_model, "nan"),
    c("eval-corrupt-tokenizer-json", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])],
      model_with_corrupt_tokenizer, "tokenizer"),
    c("eval-tokenizer-does-not-fit", lambda w, d, m: ["eval", str(w[B]), "--tokenizer", str(w["tok_a"]), "--text",
                                                      str(w[TXT])], match="rows"),
    c("eval-model-missing-a-tensor", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], model_missing_a_tensor,
      "up_proj.* would be random"),
    c("eval-encoder", lambda w, d, m: ["eval", str(m), "--text", str(w[TXT])], encoder_model, "would be random"),
    c("eval-empty-text", lambda w, d, m: ["eval", str(w[A]), "--text", str(w["empty"])], match="empty"),
    c("eval-non-utf8-text", lambda w, d, m: ["eval", str(w[A]), "--text", str(w["latin1"])], match="utf-8",
      subprocess=True),
    c("eval-missing-text", lambda w, d, m: ["eval", str(w[A]), "--text", str(d / "none.txt")], match="does not exist"),
    c("eval-text-is-a-folder", lambda w, d, m: ["eval", str(w[A]), "--text", str(m)], text_dir, "directory"),
    c("eval-unreadable-text", lambda w, d, m: ["eval", str(w[A]), "--text", str(m)], unreadable_text, "secret.txt"),
    c("eval-max-length-0", lambda w, d, m: ["eval", str(w[A]), "--text", str(w[TXT]), "--max-length", "0"],
      match="--max-length", subprocess=True),
    c("eval-stride-over-window", lambda w, d, m: ["eval", str(w[A]), "--text", str(w[TXT]), "--max-length", "64",
                                                  "--stride", "65"], match="--stride"),
    c("eval-stride-0", lambda w, d, m: ["eval", str(w[A]), "--text", str(w[TXT]), "--stride", "0"], match="--stride"),
    c("eval-batch-size-0", lambda w, d, m: ["eval", str(w[A]), "--text", str(w[TXT]), "--batch-size", "0"],
      match="--batch-size"),
    # ---------------------------------------------------------------- generate
    c("generate-top-p-0", lambda w, d, m: ["generate", str(w[A]), "--prompt", "Hi", "--top-p", "0"], match="--top-p"),
    c("generate-temperature-negative", lambda w, d, m: ["generate", str(w[A]), "--prompt", "Hi", "--temperature",
                                                        "-1"], match="--temperature"),
    c("generate-temperature-nan", lambda w, d, m: ["generate", str(w[A]), "--prompt", "Hi", "--temperature", "nan"],
      match="--temperature"),
    c("generate-max-bytes-0", lambda w, d, m: ["generate", str(w[A]), "--prompt", "Hi", "--max-bytes", "0"],
      match="--max-bytes"),
    c("generate-empty-prompt", lambda w, d, m: ["generate", str(w[A]), "--prompt", ""], match="prompt"),
    c("generate-tokenizer-does-not-fit", lambda w, d, m: ["generate", str(w[B]), "--tokenizer", str(w["tok_a"]),
                                                          "--prompt", "Hi", "--max-bytes", "4"], match="rows"),
    c("generate-truncated-weights", lambda w, d, m: ["generate", str(m), "--prompt", "Hi"], truncated_model,
      "truncated", subprocess=True),
    # ---------------------------------------------------------------- ensemble
    c("ensemble-weight-count", lambda w, d, m: ["ensemble", "--model", str(w[A]), "--model", str(w[B]), "--weight",
                                                "1", "--prompt", "Hi"], match="--weight"),
    c("ensemble-weight-nan", lambda w, d, m: ["ensemble", "--model", str(w[A]), "--model", str(w[B]), "--weight",
                                              "nan", "--weight", "1", "--prompt", "Hi"], match="--weight"),
    c("ensemble-weight-zero", lambda w, d, m: ["ensemble", "--model", str(w[A]), "--model", str(w[B]), "--weight",
                                               "0", "--weight", "1", "--prompt", "Hi"], match="--weight"),
    c("ensemble-missing-member", lambda w, d, m: ["ensemble", "--model", str(w[A]), "--model", str(d / "nope"),
                                                  "--prompt", "Hi"], match="does not exist"),
    c("ensemble-nan-member", lambda w, d, m: ["ensemble", "--model", str(w[A]), "--model", str(m), "--prompt", "Hi",
                                              "--max-bytes", "2"], nan_model, "nan"),
    # ---------------------------------------------------------------- align
    c("align-top-k-negative", lambda w, d, m: ["align", str(w["tok_a"]), str(w["tok_b"]), "--top-k", "-1"],
      match="--top-k"),
    c("align-max-pieces-0", lambda w, d, m: ["align", str(w["tok_a"]), str(w["tok_b"]), "--max-pieces", "0"],
      match="--max-pieces"),
    c("align-existing-output", lambda w, d, m: ["align", str(w["tok_a"]), str(w["tok_b"]), "--out", str(m)],
      existing_file, "already exists"),
    c("align-output-is-a-folder", lambda w, d, m: ["align", str(w["tok_a"]), str(w["tok_b"]), "--out", str(m),
                                                   "--overwrite"], existing_dir, "folder"),
    c("align-output-inside-a-tokenizer", lambda w, d, m: ["align", str(m), str(w["tok_b"]), "--out",
                                                          str(m / "tokenizer")], tokenizer_copy, "input",
      owner_note="its .json metadata file would have replaced tokenizer.json"),
    c("align-metadata-file-exists", lambda w, d, m: ["align", str(w["tok_a"]), str(w["tok_b"]), "--out", str(m)],
      alignment_sidecar, "already exists"),
    c("align-corrupt-tokenizer-json", lambda w, d, m: ["align", str(m), str(w["tok_b"])], corrupt_tokenizer,
      "tokenizer"),
    c("align-truncated-tokenizer-json", lambda w, d, m: ["align", str(m), str(w["tok_b"])], truncated_tokenizer,
      "tokenizer"),
    c("align-missing-tokenizer", lambda w, d, m: ["align", str(d / "nope"), str(w["tok_b"])], match="does not exist"),
    # ---------------------------------------------------------------- transplant
    c("transplant-base-tokenizer-does-not-fit", lambda w, d, m: ["transplant", str(m), str(w["tok_b"]),
                                                                 str(d / "out"), "--method", "mean"],
      model_b_with_tokenizer_a, "rows"),
    c("transplant-base-missing-a-tensor", lambda w, d, m: ["transplant", str(m), str(w["tok_b"]), str(d / "out"),
                                                           "--method", "mean"], model_missing_a_tensor,
      "would be random"),
    c("transplant-existing-output", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(m), "--method",
                                                     "mean"], existing_dir, "already exists"),
    c("transplant-output-is-the-model", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(w[A]),
                                                         "--method", "mean", "--overwrite"], match="input",
      owner_note="transplant_checkpoint must pass its inputs to check_output_free"),
    c("transplant-output-is-an-asset", lambda w, d, m: ["transplant", "smollm2-135m", str(w["tok_b"]),
                                                        str(asset_dir("smollm2-135m")), "--method", "mean",
                                                        "--overwrite"], match="input",
      owner_note="an asset name stands for its folder (check_not_an_input)"),
    c("transplant-corrupt-new-tokenizer", lambda w, d, m: ["transplant", str(w[A]), str(m), str(d / "out"),
                                                           "--method", "mean"], corrupt_tokenizer, "tokenizer"),
    c("transplant-truncated-weights", lambda w, d, m: ["transplant", str(m), str(w["tok_b"]), str(d / "out"),
                                                       "--method", "mean"], truncated_model, "truncated"),
    c("transplant-nan-weights", lambda w, d, m: ["transplant", str(m), str(w["tok_b"]), str(d / "out"), "--method",
                                                 "mean"], nan_model, "nan"),
    c("transplant-omp-without-donor", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(d / "out"),
                                                       "--method", "omp"], match="donor"),
    c("transplant-top-k-0", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(d / "out"), "--top-k",
                                             "0"], match="top_k"),
    c("transplant-temperature-negative", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(d / "out"),
                                                          "--temperature", "-1"], match="temperature"),
    c("transplant-temperature-nan", lambda w, d, m: ["transplant", str(w[A]), str(w["tok_b"]), str(d / "out"),
                                                     "--temperature", "nan"], match="temperature"),
    # ---------------------------------------------------------------- heal
    c("heal-missing-model", lambda w, d, m: ["heal", str(d / "nope"), "--text", str(w[TXT]), "--steps", "1", "--out",
                                             str(d / "out")], match="does not exist"),
    c("heal-empty-text", lambda w, d, m: ["heal", str(w[A]), "--text", str(w["empty"]), "--steps", "1", "--out",
                                          str(d / "out")], match="empty"),
    c("heal-existing-output", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1", "--out",
                                               str(m)], existing_dir, "already exists"),
    c("heal-output-is-the-model", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1", "--out",
                                                   str(w[A]), "--overwrite", "--train-rows", "all"], match="input",
      owner_note="heal_checkpoint must pass its inputs to check_output_free"),
    c("heal-output-inside-the-model", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1",
                                                       "--out", str(w[A] / "healed"), "--train-rows", "all"],
      match="input"),
    c("heal-output-holds-the-text", lambda w, d, m: ["heal", str(w[A]), "--text", str(m), "--steps", "1", "--out",
                                                     str(d / "out"), "--overwrite", "--train-rows", "all"],
      output_holding_the_text, "input"),
    c("heal-steps-0", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "0", "--out",
                                       str(d / "out")], match="steps", owner_note="heal config validation"),
    c("heal-lr-nan", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1", "--lr", "nan",
                                      "--out", str(d / "out")], match=r"\blr\b|learning rate",
      owner_note="heal config validation"),
    c("heal-batch-size-0", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1",
                                            "--batch-size", "0", "--out", str(d / "out")], match="batch",
      owner_note="heal config validation"),
    c("heal-missing-teacher", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1", "--teacher",
                                               str(d / "nope"), "--out", str(d / "out")],
      match=r"teacher .*nope.* does not exist"),
    c("heal-auto-teacher-without-report", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1",
                                                           "--teacher", "auto", "--out", str(d / "out")],
      match="does not name the base model"),
    c("heal-nan-teacher", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1", "--teacher",
                                           str(m), "--teacher-on", "every", "--train-rows", "all", "--out", str(d / "out")],
      nan_model, "nan"),
    c("heal-truncated-teacher", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "1",
                                                 "--teacher", str(m), "--teacher-on", "every", "--train-rows", "all", "--out",
                                                 str(d / "out")], truncated_model, "truncated"),
    c("heal-teacher-tokenizer-does-not-fit", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps",
                                                              "1", "--teacher", str(m), "--teacher-on", "every",
                                                              "--train-rows", "all", "--out", str(d / "out")],
      model_b_with_tokenizer_a, "rows"),
    c("heal-tokenizer-does-not-fit", lambda w, d, m: ["heal", str(m), "--text", str(w[TXT]), "--steps", "1",
                                                      "--teacher", "none", "--train-rows", "all", "--out",
                                                      str(d / "out")], model_b_with_tokenizer_a, "rows"),
    c("heal-corrupt-rows-file", lambda w, d, m: ["heal", str(m), "--text", str(w[TXT]), "--steps", "1", "--teacher",
                                                 "none", "--out", str(d / "out")], rows_file('{"n_rows": 5, "cop'),
      "transplant_rows.json.* not a valid row list"),
    c("heal-rows-file-out-of-range", lambda w, d, m: ["heal", str(m), "--text", str(w[TXT]), "--steps", "1",
                                                      "--teacher", "none", "--out", str(d / "out")],
      rows_file('{"n_rows": {rows}, "copied": [[0, 10], [40, 999999]]}'), "not a valid row list"),
    c("heal-rows-file-of-another-transplant", lambda w, d, m: ["heal", str(m), "--text", str(w[TXT]), "--steps", "1",
                                                               "--teacher", "none", "--out", str(d / "out")],
      rows_file('{"n_rows": 128256, "copied": [[0, 10]]}'), "describes 128256 rows but the model beside it has"),
    c("heal-encoder-teacher", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "3", "--teacher",
                                               str(m), "--train-rows", "all", "--out", str(d / "out")],
      encoder_model, "would be random"),
    c("heal-teacher-missing-a-tensor", lambda w, d, m: ["heal", str(w[A]), "--text", str(w[TXT]), "--steps", "3",
                                                        "--teacher", str(m), "--train-rows", "all", "--out",
                                                        str(d / "out")], model_missing_a_tensor, "would be random"),
    # ---------------------------------------------------------------- lm-eval
    c("lm-eval-missing-model", lambda w, d, m: ["lm-eval", "--model", str(d / "nope"), *LM_EVAL_TASK,
                                                "--output", str(d / "r.json")], match="does not exist"),
    c("lm-eval-output-inside-the-model", lambda w, d, m: ["lm-eval", "--model", str(w[A]), *LM_EVAL_TASK,
                                                          "--output", str(w[A] / "results.json")], match="input"),
    c("lm-eval-nan-weights", lambda w, d, m: ["lm-eval", "--model", str(m), *LM_EVAL_TASK, "--output",
                                              str(d / "r.json")], nan_model, "nan"),
    c("lm-eval-tokenizer-does-not-fit", lambda w, d, m: ["lm-eval", "--model", str(w[A]), "--model", str(m),
                                                         *LM_EVAL_TASK, "--output", str(d / "r.json")],
      model_b_with_tokenizer_a, "rows"),
    c("lm-eval-encoder", lambda w, d, m: ["lm-eval", "--model", str(m), *LM_EVAL_TASK, "--output",
                                          str(d / "r.json")], encoder_model, "would be random"),
    # ---------------------------------------------------------------- distill
    c("distill-missing-yaml", lambda w, d, m: ["distill", "--config", str(d / "none.yaml")], match="does not exist"),
    c("distill-corrupt-yaml", lambda w, d, m: ["distill", "--config", str(m)], yaml_file("student: [unclosed\n  x: :"),
      "yaml"),
    c("distill-unknown-key", lambda w, d, m: ["distill", "--config", str(m)],
      lambda w, d: yaml_file(distill_yaml(w, d, extra="colour: blue\n"))(w, d), "colour", subprocess=True),
    c("distill-student-tokenizer-does-not-fit", lambda w, d, m: ["distill", "--config", str(m)],
      distill_yaml_with("student", model_b_with_tokenizer_a), "rows"),
    c("distill-teacher-tokenizer-does-not-fit", lambda w, d, m: ["distill", "--config", str(m)],
      distill_yaml_with("teacher", model_b_with_tokenizer_a), "rows"),
    c("distill-nan-student", lambda w, d, m: ["distill", "--config", str(m)], distill_yaml_with("student", nan_model),
      "nan"),
    c("distill-nan-teacher", lambda w, d, m: ["distill", "--config", str(m)], distill_yaml_with("teacher", nan_model),
      "nan"),
    c("distill-truncated-teacher", lambda w, d, m: ["distill", "--config", str(m)],
      distill_yaml_with("teacher", truncated_model), "truncated"),
    c("distill-encoder-teacher", lambda w, d, m: ["distill", "--config", str(m)],
      distill_yaml_with("teacher", encoder_model), "would be random"),
    c("distill-missing-heldout-file", lambda w, d, m: ["distill", "--config", str(m)],
      lambda w, d: yaml_file(distill_yaml(w, d).replace(f"heldout: {w['text']}", f"heldout: {d / 'none.txt'}"))(w, d),
      r"data file .*none\.txt.* does not exist"),
    c("distill-steps-0", lambda w, d, m: ["distill", "--config", str(m)],
      lambda w, d: yaml_file(distill_yaml(w, d, steps=0))(w, d), "steps"),
    c("distill-lr-nan", lambda w, d, m: ["distill", "--config", str(m), "train.lr=nan"],
      lambda w, d: yaml_file(distill_yaml(w, d))(w, d), "lr", owner_note="distill config validation"),
    c("distill-truncated-alignment", lambda w, d, m: ["distill", "--config", str(m)], alignment("truncated"),
      "alignment"),
    c("distill-corrupt-alignment", lambda w, d, m: ["distill", "--config", str(m)], alignment("corrupt"),
      "alignment"),
    c("distill-output-is-the-student", lambda w, d, m: ["distill", "--config", str(m), "--overwrite"],
      distill_yaml_writing_into("student"), "input", owner_note="distill must check output_dir against run_inputs"),
    c("distill-output-holds-the-data", lambda w, d, m: ["distill", "--config", str(m), "--overwrite"],
      distill_yaml_writing_into("data"), "input"),
    c("distill-output-inside-the-teacher", lambda w, d, m: ["distill", "--config", str(m)],
      distill_yaml_writing_into("teacher"), "input"),
    c("distill-mismatched-alignment", lambda w, d, m: ["distill", "--config", str(m)], alignment("mismatch"),
      "does not match"),
    # ---------------------------------------------------------------- supertokens
    c("supertokens-vocab-too-small", lambda w, d, m: ["supertokens", "train", "--text", str(w[TXT]), "--vocab-size",
                                                      "10", "--out", str(d / "out")], match="vocab_size"),
    c("supertokens-chunk-range", lambda w, d, m: ["supertokens", "train", "--text", str(w[TXT]), "--vocab-size",
                                                  "400", "--method", "chunks", "--chunk-min", "9", "--chunk-max", "3",
                                                  "--out", str(d / "out")], match="chunk"),
    c("supertokens-non-utf8-text", lambda w, d, m: ["supertokens", "train", "--text", str(w["latin1"]),
                                                    "--vocab-size", "400", "--out", str(d / "out")], match="utf-8"),
    c("supertokens-output-is-the-text", lambda w, d, m: ["supertokens", "train", "--text", str(w[TXT]),
                                                         "--vocab-size", "400", "--out", str(w[TXT]), "--overwrite"],
      match="input"),
    c("supertokens-existing-output", lambda w, d, m: ["supertokens", "train", "--text", str(w[TXT]), "--vocab-size",
                                                      "400", "--out", str(m)], existing_dir, "already exists"),
    # ---------------------------------------------------------------- tokenizer-report
    c("report-max-words-0", lambda w, d, m: ["tokenizer-report", str(w["tok_a"]), "--text", str(w[TXT]),
                                             "--max-words", "0"], match="--max-words"),
    c("report-plot-not-png", lambda w, d, m: ["tokenizer-report", str(w["tok_a"]), "--text", str(w[TXT]), "--plot",
                                              str(d / "chart.jpg")], match="png"),
    c("report-empty-text", lambda w, d, m: ["tokenizer-report", str(w["tok_a"]), "--text", str(w["empty"])],
      match="empty"),
    c("report-corrupt-tokenizer", lambda w, d, m: ["tokenizer-report", str(m), "--text", str(w[TXT])],
      corrupt_tokenizer, "tokenizer"),
]


# --------------------------------------------------------------------------- running a row
def _snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` with a hash of its content (folders: their mode)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                out[os.path.join(dirpath, n)] = "dir"
            for n in filenames:
                p = os.path.join(dirpath, n)
                try:
                    out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
                except PermissionError:
                    out[p] = "unreadable"
    return out


def _run(argv: list[str], capsys, in_subprocess: bool) -> tuple[int, str]:
    if in_subprocess:
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        r = subprocess.run([sys.executable, "-m", "surgery.cli", *argv], capture_output=True, text=True, env=env,
                           timeout=300)
        return r.returncode, r.stderr
    from surgery.cli import main

    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world, tmp_path, capsys):
    d = tmp_path / "case"
    d.mkdir()
    made = case.make(world, d) if case.make else None
    argv = case.argv(world, d, made)
    before = _snapshot(world["root"], d)
    code, err = _run(argv, capsys, case.subprocess)
    if made is not None and made.exists() and made.stat().st_mode & 0o777 == 0:
        made.chmod(0o644)
    # what a terminal shows: a progress bar erased with "\r" before the error is not a line
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]
    note = f" ({case.owner_note})" if case.owner_note else ""
    assert code == 2, f"exit {code}{note}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr{note}, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: ") and "hint:" in lines[0], lines[0]
    assert re.search(case.match, lines[0], re.IGNORECASE), f"{case.match!r} not in {lines[0]!r}"
    after = _snapshot(world["root"], d)
    assert after == before, f"written or changed: {sorted(set(after.items()) ^ set(before.items()))[:5]}"


COMMANDS = {"eval", "align", "transplant", "heal", "distill", "generate", "ensemble", "supertokens", "tokenizer-report",
            "lm-eval"}


def test_catalogue_covers_every_command():
    from surgery.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert COMMANDS <= commands
    covered = {"tokenizer-report" if c.id.startswith("report-") else "lm-eval" if c.id.startswith("lm-eval-")
               else c.id.split("-")[0] for c in CASES}
    assert covered == COMMANDS
    assert len(CASES) >= 40
