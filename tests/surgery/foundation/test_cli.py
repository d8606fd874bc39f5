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


# --------------------------------------------------------------------------- output folders
def _umask(value=None):
    import os

    old = os.umask(0o022 if value is None else value)
    if value is None:
        os.umask(old)
    return old


@pytest.mark.parametrize("mask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                     (0o002, 0o775, 0o664)])
def test_output_folder_follows_the_umask(tmp_path, mask, dir_mode, file_mode):
    from surgery.checkpoint import atomic_output_dir

    old = _umask(mask)
    try:
        tok = byte_level_toy()
        out = save_checkpoint(tiny_llama(len(tok)), tok, tmp_path / "m")
        with atomic_output_dir(tmp_path / "plain") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text("x")
    finally:
        _umask(old)
    for folder in (out, tmp_path / "plain"):
        for p in [folder, *folder.rglob("*")]:
            assert p.stat().st_mode & 0o777 == (dir_mode if p.is_dir() else file_mode), p


def test_stale_temporary_folders_are_reported_and_removed(tmp_path, caplog):
    import logging
    import os

    from surgery.checkpoint import atomic_output_dir

    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [tmp_path / ".out.tmp-abc123", tmp_path / f".out.tmp-{dead}-xyz"]  # old and current naming
    for p in stale:
        p.mkdir()
        (p / "half-written.safetensors").write_bytes(b"\0" * 10)
    live = tmp_path / f".out.tmp-{os.getppid()}-busy"  # a writer that is still running: left alone
    live.mkdir()
    other = tmp_path / ".other.tmp-abc"  # another output's leftovers: not ours to judge
    other.mkdir()
    with caplog.at_level(logging.WARNING, logger="surgery.checkpoint"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("new")
    assert not any(p.exists() for p in stale) and live.exists() and other.exists()
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 2 and all("interrupted write" in m for m in msgs)
    assert (tmp_path / "out" / "f").read_text() == "new"


def test_interrupted_replacement_restores_the_previous_output(tmp_path, caplog):
    """Killed between the two renames of --overwrite: the old output sits in .OUT.old-PID and OUT is gone."""
    from surgery.checkpoint import atomic_output_dir

    old = tmp_path / f".out.old-{2**22 + 54321}"
    old.mkdir()
    (old / "model.safetensors").write_text("the user's model")
    with pytest.raises(Exception, match="already exists"):
        with atomic_output_dir(tmp_path / "out"):
            pass
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the user's model" and not old.exists()


def test_killed_write_leaves_nothing_that_the_next_write_keeps(tmp_path):
    """A real SIGKILL in the middle of a write: no output; the next write reports and removes the leftovers."""
    import signal
    import textwrap
    import time

    code = textwrap.dedent(f"""
        import time
        from surgery.checkpoint import atomic_output_dir
        with atomic_output_dir({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "part").write_text("half")
            print("writing", flush=True)
            time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(0.1)
    assert not (tmp_path / "out").exists() and [q.name for q in tmp_path.iterdir() if q.name.startswith(".out.tmp-")]
    r = run_cli("supertokens", "train", "--text", str(_text(tmp_path)), "--vocab-size", "300", "--out",
                str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "interrupted write" in r.stderr
    assert sorted(q.name for q in tmp_path.iterdir()) == ["out", "t.txt"]


def _text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the cat sat on the mat and the dog sat on the log\n" * 50)
    return f


def test_os_errors_about_paths_are_one_line(tmp_path, capsys):
    """A path the OS refuses (here: a file where a folder must be created) is one line, exit 2."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = main(["supertokens", "train", "--text", str(_text(tmp_path)), "--vocab-size", "300", "--out",
                 str(blocker / "sub" / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
