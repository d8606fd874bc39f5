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
                     teacher_on="every", batch_size=2, warmup=0, device="cpu")
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
                     teacher_on="every", teacher_balance=balance)
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
                         teacher_on="every", autocast=autocast, teacher_balance="value")
        task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
        dtypes[autocast] = next(task.teacher_model().parameters()).dtype
        student = load_model(str(tiny_student))
        (batch,) = task.micro_batches(0)
        with torch.no_grad():
            _, mets = task.loss(student, batch, contextlib.nullcontext)  # the student in float32 both times
        kd[autocast] = mets["kd0"]
    assert dtypes == {"off": torch.float32, "bf16": torch.bfloat16}
    assert kd["bf16"] == pytest.approx(kd["off"], rel=0.05) and kd["bf16"] != kd["off"]
    cfg = HealConfig(steps=1, teacher=str(tiny_teacher), autocast="bf16", teacher_dtype="float32", device="cpu")
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    assert next(task.teacher_model().parameters()).dtype == torch.float32  # an explicit dtype wins


@pytest.mark.parametrize("decay", ["none", "linear"])
def test_early_teacher_runs_in_the_first_fraction_of_a_step_budget_then_plain_ce(decay, tiny_student, tiny_teacher,
                                                                                 tiny_text):
    """``teacher_fraction=0.5`` of 4 steps: the teacher's model runs a forward pass in steps 1-2 only (counted on
    the teacher object itself, in order with the student's passes); its term weighs 1 (``linear``: 1, then 0.5),
    and afterwards a step's loss is the student's plain next-token CE of the same batch."""
    from distill.data import encode_blocks
    from distill.teaching import heal_teacher_task
    from distill.trainer import heal
    from surgery.loading import load_model, load_tokenizer
    from surgery.transplant.config import HealConfig

    tok = load_tokenizer(str(tiny_student))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    cfg = HealConfig(steps=4, params="all", teacher=str(tiny_teacher), loss="alm", seq_len=48, batch_size=2, warmup=0,
                     teacher_on="every", device="cpu", teacher_balance="value", teacher_fraction=0.5,
                     teacher_decay=decay)
    task = heal_teacher_task(str(tiny_teacher), tok, texts, cfg)
    student = load_model(str(tiny_student))
    calls: list[str] = []
    student.register_forward_hook(lambda *_: calls.append("s"))
    task.teacher_model().register_forward_hook(lambda *_: calls.append("t"))
    student, summary, metrics = heal(student, tok, texts, cfg, progress=False, task=task)
    assert "".join(calls) == "ststss" and summary["teacher_steps"] == 2
    train = [m for m in metrics if m["event"] == "train"]
    weights = [1.0, 1.0] if decay == "none" else [1.0, 0.5]
    assert [m["teacher_weight"] for m in train] == weights + [0.0, 0.0]
    for m, w in zip(train[:2], weights):  # value balance: CE + w · (KD rescaled to CE's value)
        assert m["kd0"] > 0 and m["loss"] == pytest.approx((1 + w) * m["ce"], rel=1e-5)
    assert all("kd0" not in m and m["loss"] == pytest.approx(m["ce"], abs=1e-6) for m in train[2:])

    (batch,) = task.micro_batches(4)  # past the window: the loss is the student's own CE, no teacher pass
    calls.clear()
    enc = encode_blocks(batch[0], tok, task.s_vocab, cfg.seq_len)
    with torch.no_grad():
        loss, mets = task.loss(student, batch, contextlib.nullcontext)
        ce = student(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                     labels=enc.input_ids.masked_fill(enc.attention_mask == 0, -100)).loss  # HF shifts the labels
    assert calls == ["s", "s"] and "kd0" not in mets
    assert loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_budget_fraction_and_teacher_weight():
    from distill.teaching import teacher_weight
    from distill.trainer.schedule import budget_fraction

    assert budget_fraction(3, 100.0, 4, None) == 0.75
    assert budget_fraction(3, 30.0, None, 60.0) == 0.5
    assert budget_fraction(1, 45.0, 4, 60.0) == 0.75  # the larger where both bound the run
    assert [teacher_weight(s, 0.5) for s in (0.0, 0.25, 0.5, 0.75)] == [1.0, 1.0, 0.0, 0.0]
    assert [teacher_weight(s, 0.5, "linear") for s in (0.0, 0.25, 0.5)] == [1.0, 0.5, 0.0]
    assert teacher_weight(0.99, 1.0) == 1.0


def test_heal_config_validates_the_teacher_fraction():
    from surgery.errors import ConfigError
    from surgery.transplant.config import HealConfig

    assert HealConfig(steps=1, teacher="auto", teacher_fraction=0.3).teacher_fraction == 0.3
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="teacher_fraction must be in"):
            HealConfig(steps=1, teacher="auto", teacher_fraction=bad)
    with pytest.raises(ConfigError, match="need a teacher"):
        HealConfig(steps=1, teacher="none", teacher_fraction=0.5)


def test_alm_teacher_runs_once_per_block_and_its_memo_gives_the_live_loss(tiny_student, tiny_teacher, tiny_text):
    """With ``alm`` a block's teacher pass runs once: the same batch again is served from the memo without a teacher
    forward pass, with the loss and gradient of the live teacher; a batch with one unseen block runs the teacher."""
    from surgery.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_student))
    teacher, sv, lc = load_heal_teacher(str(tiny_teacher), tok, "alm", torch.device("cpu"))
    texts = [(tiny_text / "train.txt").read_text(encoding="utf-8")]
    task = TeacherTask(texts, tok, sv, teacher, lc, seq_len=48, batch_size=2, seed=0, device=torch.device("cpu"))
    assert task.teacher.memo is not None and len(task.blocks) >= 3
    student = load_model(str(tiny_student))
    calls: list[str] = []
    task.teacher_model().register_forward_hook(lambda *_: calls.append("t"))
    batch = ([task.blocks[0], task.blocks[1]], [0, 1])
    runs = []
    for _ in range(2):
        student.zero_grad()
        total, mets = task.loss(student, batch, contextlib.nullcontext)
        total.backward()
        runs.append((total.item(), mets["kd0"], student.lm_head.weight.grad.clone()))
    assert calls == ["t"] and task.teacher.memo.hits == 1  # the second pass read the memo
    assert runs[1][0] == runs[0][0] and runs[1][1] == runs[0][1] and torch.equal(runs[1][2], runs[0][2])
    task.loss(student, ([task.blocks[1], task.blocks[2]], [1, 2]), contextlib.nullcontext)
    assert calls == ["t", "t"] and sorted(task.teacher.memo.rows) == [0, 1, 2]


def test_target_memo_layout_and_capacity():
    """Rows come back at the live layout (zeros past a block's length); a block encoded to another length is a miss;
    nothing is kept past the capacity."""
    from distill.teachers import TargetMemo

    memo = TargetMemo(max_tokens=7)
    logp = -torch.rand(2, 5)
    memo.write([4, 9], logp, [5, 3])
    assert memo.tokens == 5 and sorted(memo.rows) == [4]  # block 9 (3 more) would pass 7
    got = memo.read([4], [5], 6, "cpu")
    assert torch.equal(got, torch.cat([logp[0], torch.zeros(1)]))
    assert memo.read([4, 9], [5, 3], 5, "cpu") is None and memo.read([4], [4], 5, "cpu") is None
    assert (memo.hits, memo.misses) == (1, 2)
