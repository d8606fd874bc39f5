"""CLI behaviour on bad input: one line, exit status 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import tiny_llama
from surgery.checkpoint import save_checkpoint
from surgery.cli import build_parser, main
from toy_tokenizers import byte_level_toy


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "surgery.cli", *args], capture_output=True, text=True)


def test_every_subcommand_has_help():
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert {"eval", "align", "assets"} <= set(names)
    for n in names:
        with pytest.raises(SystemExit) as e:
            main([n, "--help"])
        assert e.value.code == 0


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    tok = byte_level_toy()
    return save_checkpoint(tiny_llama(len(tok)), tok, tmp_path_factory.mktemp("m") / "tiny")


def test_eval_json(tiny_ckpt, tmp_path):
    import json

    f = tmp_path / "t.txt"
    f.write_text("hello world, the cat sat on the mat\n")
    r = run_cli("eval", str(tiny_ckpt), "--text", str(f), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["bits_per_byte"] > 0


@pytest.mark.parametrize("case", ["missing_model", "no_weights", "truncated", "empty_text", "latin1_text", "missing_text"])
def test_bad_input_one_line_exit_2(case, tiny_ckpt, tmp_path):
    import shutil

    text = tmp_path / "t.txt"
    text.write_text("some text\n")
    model = str(tiny_ckpt)
    if case == "missing_model":
        model = str(tmp_path / "nope")
    elif case == "no_weights":
        d = tmp_path / "noweights"
        d.mkdir()
        shutil.copy(tiny_ckpt / "config.json", d)
        model = str(d)
    elif case == "truncated":
        d = tmp_path / "trunc"
        shutil.copytree(tiny_ckpt, d)
        shard = next(d.glob("model-*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:1000])
        model = str(d)
    elif case == "empty_text":
        text.write_text("")
    elif case == "latin1_text":
        text.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    elif case == "missing_text":
        text = tmp_path / "none.txt"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = run_cli("eval", model, "--text", str(text))
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hint:" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_align_refuses_existing_output(tmp_path):
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"keep")
    r = run_cli("align", "x", "y", "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert out.read_bytes() == b"keep"
