"""A teacher for healing: which teacher a heal gets, and one step of its task on tiny models."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from distill.teaching import TeacherTask, load_heal_teacher, resolve_teacher
from surgery.errors import SurgeryError


def test_resolve_teacher(tmp_path):
    assert resolve_teacher("none", tmp_path) is None
    assert resolve_teacher("gemma3-270m", tmp_path) == "gemma3-270m"
    with pytest.raises(SurgeryError, match="base model"):
        resolve_teacher("auto", tmp_path)
    (tmp_path / "transplant_report.json").write_text(json.dumps({"base_model": "smollm2-135m"}))
    assert resolve_teacher("auto", tmp_path) == "smollm2-135m"


@pytest.mark.parametrize("loss", ["alm", "pkl", "hidden"])
def test_teacher_task_step(loss, tiny_student, tiny_teacher, tiny_text):
    from surgery.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_student))
    teacher, sv, lc = load_heal_teacher(str(tiny_teacher), tok, loss, torch.device("cpu"), top_k=128)
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    task = TeacherTask(texts, tok, sv, teacher, lc, seq_len=48, batch_size=2, seed=0, device=torch.device("cpu"))
    student = load_model(str(tiny_student))
    student.train()
    (batch,) = task.micro_batches(0)
    total, mets = task.loss(student, batch, contextlib.nullcontext)
    total.backward()
    assert torch.isfinite(total) and mets["kd0"] > 0 and total.item() > mets["ce"]
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0
    again = TeacherTask(texts, tok, sv, teacher, lc, seq_len=48, batch_size=2, seed=0, device=torch.device("cpu"))
    assert again.micro_batches(0)[0][1] == batch[1]  # the seed fixes the block order


@pytest.mark.parametrize("params", ["new-rows", "head", "lora", "all"])
def test_heal_with_a_teacher_under_every_parameter_policy(params, tiny_student, tiny_teacher, tiny_text, tmp_path):
    from surgery.commands.heal import heal_checkpoint
    from surgery.transplant.config import HealConfig

    cfg = HealConfig(steps=2, params=params, train_rows="all", teacher=str(tiny_teacher), loss="alm", seq_len=48,
                     batch_size=2, warmup=0, device="cpu")
    s = heal_checkpoint(str(tiny_student), [str(tiny_text / "train.txt")], str(tmp_path / "out"), cfg, progress=False)
    assert s["steps"] == 2 and s["teacher"] == str(tiny_teacher)
    rows = [json.loads(l) for l in (tmp_path / "out" / "heal_metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("event") == "train"]
    assert all("kd0" in r and r["loss"] > r["ce"] for r in train)  # CE + the teacher's term


@pytest.mark.parametrize("balance", ["gradient", "value"])
def test_heal_teacher_task_balances_as_configured(balance, tiny_student, tiny_teacher, tiny_text):
    """The heal's ``teacher_balance`` reaches the loss: with ``value`` the teacher's term is rescaled to CE's value
    (total = 2 CE); with ``gradient`` to CE's gradient norm on the logits, which for alm is another value."""
    from distill.teaching import heal_teacher_task
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    cfg = HealConfig(steps=1, teacher=str(tiny_teacher), loss="alm", seq_len=48, batch_size=2, device="cpu",
                     teacher_balance=balance)
    task = heal_teacher_task(str(tiny_teacher), tok, [(tiny_text / "train.txt").read_text(encoding="utf-8")], cfg)
    assert task.cfg.loss.rescale_by == balance
    student = load_model(str(tiny_student))
    (batch,) = task.micro_batches(0)
    total, mets = task.loss(student, batch, contextlib.nullcontext)
    assert torch.isfinite(total) and mets["kd0"] > 0
    doubled = total.item() == pytest.approx(2 * mets["ce"], rel=1e-4)  # CE + KD rescaled to CE's value
    assert doubled == (balance == "value")


def test_heal_teacher_dtype_follows_autocast_and_a_bf16_teacher_teaches_the_same(tiny_student, tiny_teacher,
                                                                                 tiny_text):
    """``teacher_dtype=auto`` loads the teacher in bf16 exactly when the heal runs under bf16 autocast; that
    teacher's term (its log-probs upcast to float32) stays close to the float32 teacher's on the same batch."""
    from distill.teaching import heal_teacher_task
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    kd, dtypes = {}, {}
    for autocast in ("off", "bf16"):
        cfg = HealConfig(steps=1, teacher=str(tiny_teacher), loss="alm", seq_len=48, batch_size=2, device="cpu",
                         autocast=autocast, teacher_balance="value")
        task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
        dtypes[autocast] = next(task.teacher.model.parameters()).dtype
        student = load_model(str(tiny_student))
        (batch,) = task.micro_batches(0)
        with torch.no_grad():
            _, mets = task.loss(student, batch, contextlib.nullcontext)  # the student in float32 both times
        kd[autocast] = mets["kd0"]
    assert dtypes == {"off": torch.float32, "bf16": torch.bfloat16}
    assert kd["bf16"] == pytest.approx(kd["off"], rel=0.05) and kd["bf16"] != kd["off"]
    cfg = HealConfig(steps=1, teacher=str(tiny_teacher), autocast="bf16", teacher_dtype="float32", device="cpu")
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    assert next(task.teacher.model.parameters()).dtype == torch.float32  # an explicit dtype wins
