"""Which steps and blocks a heal's teacher teaches (``teacher_on``: every, repeats, repeated-blocks), checked against
brute-force redraws of the block order, and when its weights load (at the first taught step; refused up front when
they cannot fit; a failed load stops the heal with its state saved)."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from distill.teaching import TeacherTask, load_heal_teacher
from surgery.errors import SurgeryError


@pytest.mark.parametrize("teacher_on", ["every", "repeats", "repeated-blocks"])
def test_cli_heal_with_a_teacher_on_a_small_corpus_reuses_the_teachers_log_probs(teacher_on, tiny_student, tiny_teacher,
                                                                                 tiny_text, tmp_path, capsys):
    """A small corpus is drawn again and again: from the CLI, the summary counts the steps served from the teacher's
    kept log-probs (no teacher pass) and the last line says so; with ``--teacher-on repeats`` the teacher teaches
    exactly the steps that re-read their blocks."""
    from distill.data import token_blocks
    from surgery.cli import main
    from surgery.loading import load_tokenizer

    small = (tiny_text / "train.txt").read_text(encoding="utf-8")[:400]
    text = tmp_path / "small.txt"
    text.write_text(small, encoding="utf-8")
    out = tmp_path / "healed"
    rc = main(["heal", str(tiny_student), "--text", str(text), "--steps", "6", "--out", str(out), "--seq-len", "48",
               "--batch-size", "2", "--device", "cpu", "--params", "all", "--teacher", str(tiny_teacher),
               "--loss", "alm", "--teacher-on", teacher_on])
    printed = capsys.readouterr().out
    s = json.loads((out / "heal_summary.json").read_text())
    n_blocks = len(token_blocks([small], load_tokenizer(str(tiny_student)), 47))
    blocks = _repeated_blocks(n_blocks, 2, 6)
    taught = {"every": 6, "repeats": sum(_repeat_steps(n_blocks, 2, 6)),
              "repeated-blocks": sum(c > 0 for c in blocks)}[teacher_on]
    assert rc == 0 and s["teacher_steps"] == taught and 1 <= s["teacher_memo_hits"] < taught
    kept = f"({s['teacher_memo_hits']} of them from its kept log-probs, no teacher pass)"
    if teacher_on == "repeats":
        assert f"taught the {taught} steps that re-read their blocks {kept}; the other {6 - taught} read new" in printed
    elif teacher_on == "repeated-blocks":
        assert sum(blocks) > taught and s["teacher_blocks"] == sum(blocks)
        assert f"taught the {sum(blocks)} of 12 blocks read again, in {taught} steps {kept}; the blocks" in printed
    else:
        assert f"taught {taught} steps {kept}." in printed
    train = [json.loads(l) for l in (out / "heal_metrics.jsonl").read_text().splitlines()]
    train = [m for m in train if m.get("event") == "train"]
    assert s["ce_first"] == round(train[0]["ce"], 5) and f"next-token loss {s['ce_first']} → {s['ce_last10']}" in printed


def _repeat_steps(n_blocks: int, batch_size: int, steps: int, seed: int = 0) -> list[bool]:
    """Reference: the steps whose blocks were all drawn at an earlier step (:func:`_repeated_blocks`)."""
    return [c == batch_size for c in _repeated_blocks(n_blocks, batch_size, steps, seed)]


def test_teacher_on_repeats_teaches_only_steps_whose_blocks_were_all_read_before(tiny_student, tiny_teacher,
                                                                                 tiny_text, tmp_path):
    """``teacher_on="repeats"``: the teacher's model runs (and its term weighs 1) at exactly the steps a brute-force
    redraw of the block order marks as repeats; every other step is the student's CE alone. A run stopped after
    3 steps (its last state) and resumed rebuilds which blocks it read: its steps and weights are those of the
    straight run."""
    from distill.teaching import heal_teacher_task
    from distill.trainer import heal
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")[:600]]
    cfg = HealConfig(steps=8, params="all", teacher=str(tiny_teacher), loss="pkl", seq_len=48, batch_size=2,
                     warmup=0, device="cpu", teacher_on="repeats", checkpoint_every=3)
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    want = _repeat_steps(len(task.blocks), 2, 8)
    assert any(want) and not all(want)  # the corpus is small enough for both kinds of step
    student = load_model(str(tiny_student))
    calls: list[str] = []
    student.register_forward_hook(lambda *_: calls.append("s"))
    task.teacher_model().register_forward_hook(lambda *_: calls.append("t"))
    _, summary, metrics = heal(student, tok, texts, cfg, tmp_path / "straight", progress=False, task=task)
    train = [m for m in metrics if m["event"] == "train"]
    assert "".join(calls) == "".join("st" if r else "s" for r in want)
    assert [m["teacher_weight"] for m in train] == [1.0 if r else 0.0 for r in want]
    assert all(("kd0" in m) == r for m, r in zip(train, want)) and summary["teacher_steps"] == sum(want)

    stopped = HealConfig(**{**cfg.to_dict(), "steps": 4})  # its state is written after step 3
    heal(load_model(str(tiny_student)), tok, texts, stopped, tmp_path / "stopped", progress=False,
         task=heal_teacher_task(str(tiny_teacher), tok, texts, stopped))
    resumed_task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    _, _, again = heal(load_model(str(tiny_student)), tok, texts, cfg, tmp_path / "stopped", resume=True,
                       progress=False, task=resumed_task)
    again = [m for m in again if m["event"] == "train"]
    assert [m["step"] for m in again] == list(range(1, 9))
    assert [m["teacher_weight"] for m in again] == [m["teacher_weight"] for m in train]
    assert np.array_equal(resumed_task.seen, task.seen)


def _repeated_blocks(n_blocks: int, batch_size: int, steps: int, seed: int = 0) -> list[int]:
    """Reference: redraw the heal's blocks and count, step by step, the blocks drawn at an earlier step."""
    gen, seen, out = torch.Generator().manual_seed(seed), set(), []
    for _ in range(steps):
        ids = torch.randint(0, n_blocks, (batch_size,), generator=gen).tolist()
        out.append(sum(i in seen for i in ids))
        seen.update(ids)
    return out


@pytest.mark.parametrize("loss", ["alm", "pkl", "hidden"])
def test_a_teacher_on_some_rows_reads_and_teaches_only_those(loss, tiny_student, tiny_teacher, tiny_text):
    """``micro_loss(teacher_rows=[1])``: the teacher's forward pass reads row 1 alone, its term is the term of a
    batch of that block alone, and the student's CE still covers both rows (the CE of the batch without a
    teacher)."""
    from distill.trainer.distill_task import micro_loss
    from surgery.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_student))
    teacher, sv, lc = load_heal_teacher(str(tiny_teacher), tok, loss, torch.device("cpu"), top_k=128)
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    task = TeacherTask(texts, tok, sv, teacher, lc, seq_len=48, batch_size=2, seed=0, device=torch.device("cpu"))
    pair = [task.blocks[0], task.blocks[3]]
    student = load_model(str(tiny_student))
    rows_read: list[int] = []
    teacher.model.register_forward_hook(lambda m, a, kw, out: rows_read.append(kw["input_ids"].shape[0]),
                                        with_kwargs=True)

    def run(blocks, ids, teachers, rows=None):
        with torch.no_grad():
            return micro_loss(task.cfg, student, tok, sv, teachers, blocks, ids, torch.device("cpu"),
                              contextlib.nullcontext, teacher_rows=rows)

    _, part = run(pair, [0, 3], [teacher], np.array([1]))
    assert rows_read == [1]
    _, alone = run(pair[1:], [3], [teacher])
    _, plain = run(pair, [0, 3], [])
    _, whole = run(pair, [0, 3], [teacher])
    assert part["kd0"] == pytest.approx(alone["kd0"], rel=1e-4) and part["chunks0"] == alone["chunks0"]
    assert part["ce"] == plain["ce"] == whole["ce"] and part["kd0"] != pytest.approx(whole["kd0"], rel=1e-3)
    assert rows_read == [1, 1, 2]


def test_teacher_on_repeated_blocks_teaches_each_block_read_before(tiny_student, tiny_teacher, tiny_text, tmp_path):
    """``teacher_on="repeated-blocks"``: in each step the teacher's model reads exactly the blocks a brute-force redraw
    of the block order marks as drawn before (none: no teacher pass), and its term weighs their share of the step
    (value balance: loss = (1 + share) · CE); the summary counts the taught blocks and steps."""
    from distill.teaching import heal_teacher_task
    from distill.trainer import heal
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")[:600]]
    cfg = HealConfig(steps=8, params="all", teacher=str(tiny_teacher), loss="pkl", seq_len=48, batch_size=2,
                     warmup=0, device="cpu", teacher_on="repeated-blocks", teacher_balance="value")
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    want = _repeated_blocks(len(task.blocks), 2, 8)
    assert 1 in want and 2 in want and 0 in want  # fresh, mixed and repeated steps
    assert task.first_taught_step(8) == next(i for i, c in enumerate(want) if c)
    rows_read: list[int] = []
    task.teacher_model().register_forward_hook(lambda m, a, kw, out: rows_read.append(kw["input_ids"].shape[0]),
                                               with_kwargs=True)
    _, summary, metrics = heal(load_model(str(tiny_student)), tok, texts, cfg, progress=False, task=task)
    train = [m for m in metrics if m["event"] == "train"]
    assert rows_read == [c for c in want if c]
    assert [m["teacher_blocks"] for m in train] == want
    assert [m["teacher_weight"] for m in train] == [1.0 if c else 0.0 for c in want]
    for m, c in zip(train, want):
        assert ("kd0" in m) == (c > 0) and m["loss"] == pytest.approx((1 + c / 2) * m["ce"], rel=1e-5)
    assert summary["teacher_blocks"] == sum(want) and summary["teacher_steps"] == sum(c > 0 for c in want)


def test_heal_config_defaults_to_the_base_model_teaching_what_is_read_again():
    from surgery.errors import ConfigError
    from surgery.transplant.config import HealConfig

    cfg = HealConfig(steps=1)
    assert (cfg.teacher, cfg.loss, cfg.teacher_on) == ("auto", "alm", "repeats")
    assert HealConfig(steps=1, teacher="none").teacher == "none"  # teacher_on is moot without a teacher
    with pytest.raises(ConfigError, match="teacher_on"):
        HealConfig.from_dict({"steps": 1, "teacher": "auto", "teacher_on": "sometimes"})


@pytest.mark.parametrize("bad", [{"teacher_on": "sometimes"}, {"teacher_decay": "Linear"}])
def test_a_teacher_task_refuses_a_schedule_it_does_not_know(bad, tiny_student, tiny_teacher, tiny_text):
    """Direct library use gets the config's choices checked too (a misspelt decay is not quietly ``none``)."""
    from surgery.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_student))
    teacher, sv, lc = load_heal_teacher(str(tiny_teacher), tok, "alm", torch.device("cpu"), top_k=128)
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    with pytest.raises(ValueError, match=next(iter(bad))):
        TeacherTask(texts, tok, sv, teacher, lc, seq_len=48, batch_size=2, seed=0, device=torch.device("cpu"), **bad)


def test_a_teacher_that_does_not_fit_in_memory_is_a_clear_error(tiny_student, tiny_teacher, monkeypatch):
    """The default heal loads the base model beside the student; torch's out-of-memory error while loading it becomes
    one line naming the teacher and the way out (``--teacher none``)."""
    import surgery.loading
    from surgery.loading import load_tokenizer

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(surgery.loading, "load_model", no_memory)
    with pytest.raises(SurgeryError, match="does not fit") as e:
        load_heal_teacher(str(tiny_teacher), load_tokenizer(str(tiny_student)), "alm", torch.device("cpu"))
    assert "--teacher none" in e.value.hint


def _weights(folder) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_heal_that_reads_every_block_once_never_loads_the_teacher_and_is_the_ce_heal(tiny_student, tiny_teacher,
                                                                                      tiny_text, tmp_path, monkeypatch):
    """With ``teacher_on="repeats"`` and a budget that re-reads no block (a brute-force redraw finds no repeated
    step) the teacher's weights are never loaded, and the healed weights are bit for bit those of ``--teacher
    none``."""
    import distill.teaching as teaching
    from distill.data import token_blocks
    from surgery.commands.heal import heal_checkpoint
    from surgery.loading import load_tokenizer
    from surgery.transplant.config import HealConfig

    loads = []
    real = teaching.load_teacher_weights
    monkeypatch.setattr(teaching, "load_teacher_weights", lambda *a, **k: loads.append(a) or real(*a, **k))
    text = tiny_text / "train.txt"
    n_blocks = len(token_blocks([text.read_text(encoding="utf-8")], load_tokenizer(str(tiny_student)), 47))
    assert not any(_repeat_steps(n_blocks, 2, 3))
    summaries = {}
    for name, teacher in (("taught", str(tiny_teacher)), ("ce", "none")):
        cfg = HealConfig(steps=3, params="all", teacher=teacher, seq_len=48, batch_size=2, warmup=0, device="cpu")
        summaries[name] = heal_checkpoint(str(tiny_student), [str(text)], str(tmp_path / name), cfg, progress=False)
    s = summaries["taught"]
    assert loads == [] and s["teacher_steps"] == 0 and s["teacher_loaded_at_step"] is None
    taught, ce = _weights(tmp_path / "taught"), _weights(tmp_path / "ce")
    assert taught.keys() == ce.keys() and all(torch.equal(taught[k], ce[k]) for k in ce)


def test_the_teachers_weights_load_at_the_first_step_it_teaches(tiny_student, tiny_teacher, tiny_text, tmp_path):
    """On a small corpus the weights load once, just before the first step a brute-force redraw of the block order
    marks as a repeat (after that many student forward passes); a shorter step budget has no taught step."""
    from distill.teaching import heal_teacher_task
    from distill.trainer import heal
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")[:600]]
    cfg = HealConfig(steps=8, params="all", teacher=str(tiny_teacher), loss="alm", seq_len=48, batch_size=2,
                     warmup=0, device="cpu")
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    want = _repeat_steps(len(task.blocks), 2, 8)
    k = want.index(True)
    assert k >= 1 and task.first_taught_step(8) == k and task.first_taught_step(k) is None
    assert task.teacher.model is None
    student = load_model(str(tiny_student))
    forwards, loaded = [], []
    student.register_forward_hook(lambda *_: forwards.append(1))
    real = task.load
    task.load = lambda: loaded.append(len(forwards)) or real()
    _, summary, metrics = heal(student, tok, texts, cfg, tmp_path / "state", progress=False, task=task)
    train = [m for m in metrics if m["event"] == "train"]
    assert loaded == [k] and task.loaded_at == k and summary["teacher_steps"] == sum(want)
    assert [m["teacher_loaded"] for m in train] == [i >= k for i in range(8)]


def test_a_teacher_that_fails_to_load_mid_heal_stops_with_the_state_saved_and_resumes_without_it(
        tiny_student, tiny_teacher, tiny_text, tmp_path, monkeypatch, capsys):
    """The teacher's load runs out of memory at its first taught step ``k``: from the CLI, exit code 2, one line
    saying so and how to go on, no output folder, the heal state of ``k`` steps saved. Resumed with
    ``--teacher none`` the heal ends bit for bit where a straight CE heal does (nothing of step ``k+1`` was drawn or
    applied before the stop)."""
    import surgery.loading
    from distill.data import token_blocks
    from helpers import no_memory_for
    from surgery.cli import main
    from surgery.commands.heal import state_dir_for

    text = tmp_path / "small.txt"
    small = (tiny_text / "train.txt").read_text(encoding="utf-8")[:600]
    text.write_text(small, encoding="utf-8")
    n_blocks = len(token_blocks([small], surgery.loading.load_tokenizer(str(tiny_student)), 47))
    k = _repeat_steps(n_blocks, 2, 8).index(True)
    no_memory_for(monkeypatch, tiny_teacher)
    args = [str(tiny_student), "--text", str(text), "--steps", "8", "--seq-len", "48", "--batch-size", "2",
            "--warmup", "0", "--device", "cpu", "--params", "all"]
    out = tmp_path / "healed"
    assert main(["heal", *args, "--out", str(out), "--teacher", str(tiny_teacher)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and f"for step {k + 1}, the first it teaches" in err
    assert f"stopped after {k} steps" in err and "--resume" in err and "--teacher none" in err
    assert not out.exists() and state_dir_for(out).exists()
    monkeypatch.undo()
    assert main(["heal", *args, "--out", str(out), "--teacher", "none", "--resume"]) == 0
    assert main(["heal", *args, "--out", str(tmp_path / "straight"), "--teacher", "none"]) == 0
    resumed, straight = _weights(out), _weights(tmp_path / "straight")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[n], straight[n]) for n in straight)
    steps = [json.loads(l)["step"] for l in (out / "heal_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_teacher_larger_than_the_free_memory_is_refused_before_the_first_step(tiny_student, tiny_teacher, tiny_text,
                                                                                tmp_path, monkeypatch):
    """A heal whose teacher would teach checks its weights against the memory free beside the student and refuses
    before any step (no state, no output); a step budget that teaches no step does not need the check."""
    import surgery.memory
    from surgery.commands.heal import heal_checkpoint, state_dir_for
    from surgery.memory import weights_nbytes
    from surgery.transplant.config import HealConfig

    need = weights_nbytes(str(tiny_teacher), torch.float32)
    monkeypatch.setattr(surgery.memory, "free_memory", lambda device: need - 1)
    out = tmp_path / "out"
    for budget in ({"steps": 8}, {"minutes": 1.0}):
        cfg = HealConfig(**budget, params="all", teacher=str(tiny_teacher), seq_len=48, batch_size=2, device="cpu",
                         autocast="off", teacher_on="every")
        with pytest.raises(SurgeryError, match=r"needs [0-9.]+ MiB of cpu memory for its weights \(float32\), "
                                               r"more than the [0-9.]+ MiB free beside the student"):
            heal_checkpoint(str(tiny_student), [str(tiny_text / "train.txt")], str(out), cfg, progress=False)
        assert not out.exists() and not state_dir_for(out).exists()
    cfg = HealConfig(steps=3, params="all", teacher=str(tiny_teacher), seq_len=48, batch_size=2, device="cpu")
    s = heal_checkpoint(str(tiny_student), [str(tiny_text / "train.txt")], str(out), cfg, progress=False)
    assert s["steps"] == 3 and s["teacher_loaded_at_step"] is None
