"""Heal: only new rows move, copied rows stay bit-exact, resume reproduces an uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import tiny_llama
from surgery.errors import SurgeryError
from surgery.transplant import HealConfig, TransplantConfig, transplant_checkpoint
from distill.trainer import heal_run as heal_mod
from distill.trainer.heal_run import heal
from surgery.commands.heal import heal_checkpoint, state_dir_for
from surgery.transplant.heal import decode_ranges, encode_ranges, read_copied_rows
from toy_tokenizers import CORPUS, byte_level_toy, sentencepiece_toy


@pytest.fixture(scope="module")
def transplanted(tmp_path_factory):
    from surgery.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("heal")
    old_tok, new_tok = byte_level_toy(320), sentencepiece_toy(150)
    base = save_checkpoint(tiny_llama(len(old_tok)), old_tok, tmp / "base")
    new_tok.save_pretrained(tmp / "tok")
    out = tmp / "transplanted"
    transplant_checkpoint(str(base), str(tmp / "tok"), str(out), TransplantConfig(method="mean"), progress=False)
    text = tmp / "train.txt"
    text.write_text("\n".join(CORPUS))
    return out, text


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def test_ranges_round_trip():
    ids = np.array([0, 1, 2, 5, 7, 8, 100])
    assert encode_ranges(ids) == [[0, 3], [5, 6], [7, 9], [100, 101]]
    np.testing.assert_array_equal(decode_ranges(encode_ranges(ids)), ids)


def test_heal_moves_only_new_rows(transplanted, tmp_path):
    src, text = transplanted
    out = tmp_path / "healed"
    cfg = HealConfig(steps=3, lr=1e-2, seq_len=16, batch_size=2, warmup=1, device="cpu")
    s = heal_checkpoint(str(src), [str(text)], str(out), cfg, eval_path=str(text), progress=False)
    before, _ = _load(src)
    after, _ = _load(out)
    copied = read_copied_rows(src)
    w0, w1 = before.get_input_embeddings().weight, after.get_input_embeddings().weight
    assert torch.equal(w0[torch.as_tensor(copied)], w1[torch.as_tensor(copied)])
    new = np.setdiff1d(np.arange(w0.shape[0]), copied)
    assert not torch.equal(w0[torch.as_tensor(new)], w1[torch.as_tensor(new)])
    body0 = dict(before.named_parameters())
    for n, p in after.named_parameters():
        if "embed" not in n and "lm_head" not in n:
            assert torch.equal(p, body0[n]), n
    lines = (out / "heal_metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["step"] == 3
    summary = json.loads((out / "heal_summary.json").read_text())
    assert summary["steps"] == 3 and summary["bits_per_byte_after"] is not None
    assert s["steps"] == 3
    assert (out / "transplant_rows.json").exists() and (out / "heal_metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert not state_dir_for(out).exists()


@pytest.mark.parametrize("params", ["new-rows", "lora", "all"])
def test_resume_reproduces_uninterrupted_run(transplanted, tmp_path, monkeypatch, params):
    src, text = transplanted
    texts = [text.read_text()]
    copied = read_copied_rows(src)
    cfg = HealConfig(steps=4, lr=1e-2, seq_len=16, batch_size=2, warmup=1, checkpoint_every=2, device="cpu",
                     params=params, lora_lr=1e-2, all_lr=1e-3)
    m, tok = _load(src)
    straight, _, _ = heal(m, tok, texts, cfg, tmp_path / "s1", copied, progress=False)

    calls = {"n": 0}
    real = heal_mod.BlocksTask.micro_batches

    def dying(self, step):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(heal_mod.BlocksTask, "micro_batches", dying)
    m, tok = _load(src)
    with pytest.raises(KeyboardInterrupt):
        heal(m, tok, texts, cfg, tmp_path / "s2", copied, progress=False)
    monkeypatch.setattr(heal_mod.BlocksTask, "micro_batches", real)
    m, tok = _load(src)
    resumed, summary, metrics = heal(m, tok, texts, cfg, tmp_path / "s2", copied, resume=True, progress=False)
    assert summary["steps"] == 4 and [r["step"] for r in metrics] == [1, 2, 3, 4]
    want = dict(straight.named_parameters())
    for n, p in resumed.named_parameters():
        assert torch.equal(p, want[n]), [k for k, q in resumed.named_parameters() if not torch.equal(q, want[k])]


@pytest.mark.parametrize("params", ["new-rows", "head", "lora", "all"])
def test_plain_heal_trains_on_token_blocks_with_the_models_own_loss(transplanted, params, monkeypatch):
    """A CE-only heal's batch is random token blocks: each row is the document-start token, then the tokens of the
    block's own text (at most ``seq_len`` in all), then padding; the first step's loss is Hugging Face's own ``labels=`` loss on that batch
    (padding ignored), and a row-sparse policy is handed those ids."""
    from surgery.evaluate import document_start_id

    src, text = transplanted
    m, tok = _load(src)
    m.resize_token_embeddings(len(tok))  # no padding rows: the heal's softmax spans the vocabulary (fit_vocab)
    texts = [text.read_text(), "\n".join(reversed(CORPUS))]
    seen, prepared = [], []
    real_loss, real_prepare = heal_mod.BlocksTask.loss, heal_mod.Policy.prepare

    def loss(self, model, batch, autocast):
        total, mets = real_loss(self, model, batch, autocast)
        seen.append((batch[0], self.token_ids(batch), total.item()))
        return total, mets

    def prepare(self, ids):
        prepared.append(ids.clone())
        return real_prepare(self, ids)

    monkeypatch.setattr(heal_mod.BlocksTask, "loss", loss)
    monkeypatch.setattr(heal_mod.Policy, "prepare", prepare)
    cfg = HealConfig(steps=2, lr=1e-2, seq_len=16, batch_size=3, warmup=0, device="cpu", params=params,
                     lora_lr=1e-2, all_lr=1e-3)
    heal(m, tok, texts, cfg, None, read_copied_rows(src), progress=False)
    assert len(seen) == 2
    start = document_start_id(tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    assert start is not None
    masks = []
    for blocks, ids, _ in seen:
        assert ids.shape[0] == 3 and ids.shape[1] <= 16
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for b, (row, block) in enumerate(zip(ids.tolist(), blocks)):
            assert any(block in t for t in texts)
            want = ([start] + tok(block, add_special_tokens=False)["input_ids"])[:16]  # cut at seq_len
            assert row == want + [pad] * (len(row) - len(want))
            mask[b, :len(want)] = True
        masks.append(mask)
    assert any(len(set(blocks)) > 1 for blocks, _, _ in seen)
    if params in ("new-rows", "head"):
        assert len(prepared) == 2 and all(torch.equal(p, s[1]) for p, s in zip(prepared, seen))
    (_, ids, total), mask = seen[0], masks[0]
    ref, _ = _load(src)  # the first step's forward pass sees the untrained weights (LoRA starts at zero)
    ref.resize_token_embeddings(len(tok))
    with torch.no_grad():
        hf = ref(input_ids=ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
    assert total == pytest.approx(hf.item(), rel=1e-5)


def test_heal_with_lora_merges_adapters(transplanted, tmp_path):
    src, text = transplanted
    m, tok = _load(src)
    body0 = {n: p.clone() for n, p in m.named_parameters() if "q_proj" in n}
    cfg = HealConfig(steps=2, lr=1e-2, params="lora", lora_lr=1e-2, seq_len=16, batch_size=2, warmup=0, device="cpu")
    healed, summary, _ = heal(m, tok, [text.read_text()], cfg, None, read_copied_rows(src), progress=False)
    names = dict(healed.named_parameters())
    assert not any("lora_" in n for n in names)
    assert any(not torch.equal(names[n], p) for n, p in body0.items())


class _Payload:
    """Anything but tensors, numbers, strings and containers: a pickle that would run code on load."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_resume_refuses_another_config_and_a_state_that_is_not_plain_data(transplanted, tmp_path):
    """A resumed heal may change its budget and teacher, not what defines its state (here seq_len): one clear error.
    Its trainer state loads with ``weights_only=True``: a pickle of anything else is refused, not run."""
    src, text = transplanted
    texts = [text.read_text()]
    cfg = HealConfig(steps=2, seq_len=16, batch_size=2, warmup=0, checkpoint_every=1, device="cpu")
    m, tok = _load(src)
    heal(m, tok, texts, cfg, tmp_path / "s", read_copied_rows(src), progress=False)
    m, tok = _load(src)  # a longer budget resumes
    _, summary, _ = heal(m, tok, texts, HealConfig(**{**cfg.to_dict(), "steps": 3}), tmp_path / "s",
                         read_copied_rows(src), resume=True, progress=False)
    assert summary["steps"] == 3
    m, tok = _load(src)
    with pytest.raises(SurgeryError, match=r"different heal config \(seq_len: 16 → 32\)"):
        heal(m, tok, texts, HealConfig(**{**cfg.to_dict(), "steps": 4, "seq_len": 32}), tmp_path / "s",
             read_copied_rows(src), resume=True, progress=False)
    state = sorted((tmp_path / "s" / "checkpoints").glob("step-*"))[-1] / "trainer_state.pt"
    st = torch.load(state, weights_only=True)
    torch.save({**st, "extra": _Payload()}, state)
    m, tok = _load(src)
    with pytest.raises(SurgeryError, match="unreadable"):
        heal(m, tok, texts, HealConfig(**{**cfg.to_dict(), "steps": 4}), tmp_path / "s", read_copied_rows(src),
             resume=True, progress=False)


def test_heal_needs_row_list_and_enough_text(transplanted, tmp_path):
    src, text = transplanted
    m, tok = _load(src)
    with pytest.raises(SurgeryError, match="copied rows"):
        heal(m, tok, [text.read_text()], HealConfig(steps=1), None, None, progress=False)
    with pytest.raises(SurgeryError, match="fewer than seq_len"):
        heal(m, tok, ["tiny"], HealConfig(steps=1, seq_len=64), None, np.arange(3), progress=False)
    with pytest.raises(SurgeryError, match="nothing to resume"):
        heal(m, tok, [text.read_text()], HealConfig(steps=1, seq_len=16), tmp_path / "none", np.arange(3),
             resume=True, progress=False)


def test_cli_heal(transplanted, tmp_path, capsys):
    from surgery.cli import main

    src, text = transplanted
    out = tmp_path / "cli-healed"
    rc = main(["heal", str(src), "--text", str(text), "--steps", "2", "--out", str(out), "--seq-len", "16",
               "--batch-size", "2", "--device", "cpu"])
    assert rc == 0 and (out / "heal_summary.json").exists()
    assert "Healed" in capsys.readouterr().out
    assert main(["heal", str(src), "--text", str(text), "--steps", "2", "--out", str(out)]) == 2


@pytest.mark.parametrize("tie", [True, False])
def test_row_hooks_give_the_dense_gradient_rows(tie):
    """The row-sparse step's leaf gradients equal the rows of the dense gradient (reference)."""
    from distill.trainer.rows import RowHooks

    model = tiny_llama(300, seed=3, tie=tie).float()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    batch = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    # dense reference
    for p in model.parameters():
        p.requires_grad_(False)
    emb.weight.requires_grad_(True)
    head.weight.requires_grad_(True)
    model(input_ids=batch, labels=batch).loss.backward()
    g_in, g_out = emb.weight.grad.clone(), head.weight.grad.clone()
    emb.weight.grad = head.weight.grad = None
    emb.weight.requires_grad_(False)
    head.weight.requires_grad_(False)
    # row-sparse: rows of the batch only
    rows_in = torch.unique(batch)
    rows_out = torch.unique(torch.cat([rows_in, torch.tensor([5, 77])])) if tie else torch.unique(batch[:, 1:])
    if tie:
        rows_in = rows_out
    leaf_in = emb.weight.detach()[rows_in].clone().requires_grad_(True)
    leaf_out = leaf_in if tie else head.weight.detach()[rows_out].clone().requires_grad_(True)
    lut = torch.zeros(300, dtype=torch.long)
    lut[rows_in] = torch.arange(1, len(rows_in) + 1)
    hooks = RowHooks(emb, head)
    hooks.set(lut[batch], leaf_in, rows_out, leaf_out)
    try:
        model(input_ids=batch, labels=batch).loss.backward()
    finally:
        hooks.remove()
    if tie:
        torch.testing.assert_close(leaf_in.grad, g_in[rows_in], rtol=1e-4, atol=1e-6)
    else:
        torch.testing.assert_close(leaf_in.grad, g_in[rows_in], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(leaf_out.grad, g_out[rows_out], rtol=1e-4, atol=1e-6)


def test_cli_config_params_and_legacy_flags(transplanted, tmp_path, capsys):
    """--config YAML + flags, --params all moves the body; --head-only maps onto --params head."""
    from surgery.cli import main

    src, text = transplanted
    recipe = tmp_path / "heal.yaml"
    recipe.write_text("steps: 2\nparams: all\nall_lr: 1.0e-3\nseq_len: 16\nbatch_size: 2\nwarmup: 0\n")
    out = tmp_path / "all"
    assert main(["heal", str(src), "--text", str(text), "--out", str(out), "--config", str(recipe),
                 "--device", "cpu"]) == 0
    before, _ = _load(src)
    after, _ = _load(out)
    body0 = dict(before.named_parameters())
    assert all(not torch.equal(p, body0[n]) for n, p in after.named_parameters() if "q_proj" in n)
    assert json.loads((out / "heal_summary.json").read_text())["params"] == "all"
    out2 = tmp_path / "head"
    assert main(["heal", str(src), "--text", str(text), "--out", str(out2), "--config", str(recipe), "--head-only",
                 "--params", "head", "--steps", "1"]) == 0
    s = json.loads((out2 / "heal_summary.json").read_text())
    assert s["params"] == "head" and s["steps"] == 1  # the flags win over the YAML
    assert main(["heal", str(src), "--text", str(text), "--out", str(tmp_path / "x"), "--steps", "1", "--lora",
                 "--params", "all"]) == 2
    capsys.readouterr()
    assert main(["heal", str(src), "--text", str(text), "--out", str(tmp_path / "x"), "--steps", "0", "--lr", "-1",
                 "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "steps must be >= 1" in err[0] and "batch_size must be >= 1" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["heal", "--help-config"]) == 0
    assert "params (" in capsys.readouterr().out


def test_non_finite_loss_is_one_line_exit_2(transplanted, tmp_path, capsys):
    from surgery.cli import main

    src, text = transplanted
    out = tmp_path / "nan"
    rc = main(["heal", str(src), "--text", str(text), "--out", str(out), "--steps", "4", "--params", "all",
               "--all-lr", "1e30", "--grad-clip", "0", "--seq-len", "16", "--batch-size", "2", "--warmup", "0",
               "--device", "cpu"])
    err = [l for l in capsys.readouterr().err.splitlines() if "error" in l.lower()]
    assert rc == 2 and len(err) == 1 and "the training loss became" in err[0], err
    assert not out.exists()


def test_sigkill_then_resume_is_bit_exact(transplanted, tmp_path):
    """kill -9 a `surgery heal` run once it has a resumable state; --resume ends bitwise where a clean run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from safetensors.torch import load_file

    src, text = transplanted
    bin_ = Path(sys.executable).parent / "surgery"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = [str(src), "--text", str(text), "--steps", "80", "--checkpoint-every", "3", "--seq-len", "16",
            "--batch-size", "2", "--device", "cpu", "--params", "lora", "--lr", "1e-2"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    a = subprocess.Popen([str(bin_), "heal", *args, "--out", str(clean)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    b = subprocess.Popen([str(bin_), "heal", *args, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    states = state_dir_for(killed) / "checkpoints"
    while b.poll() is None:
        if states.exists() and any(states.glob("step-*/trainer_state.pt")):
            b.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    b.wait()
    assert b.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not killed.exists()
    assert a.wait(timeout=600) == 0, a.stderr.read().decode()[-2000:]
    r = subprocess.run([str(bin_), "heal", *args, "--out", str(killed), "--resume"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    def tensors(folder):
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    wa, wb = tensors(clean), tensors(killed)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    steps = [json.loads(l)["step"] for l in (killed / "heal_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 81))


def test_periodic_heldout_bits_per_byte(transplanted, tmp_path):
    src, text = transplanted
    m, tok = _load(src)
    cfg = HealConfig(steps=4, lr=1e-2, seq_len=16, batch_size=2, warmup=0, eval_every=2, device="cpu")
    _, summary, metrics = heal(m, tok, [text.read_text()], cfg, None, read_copied_rows(src), eval_text=text.read_text(),
                               progress=False)
    evals = [r for r in metrics if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2] and evals[0]["heldout_bpb"] > 0  # not at the last step: `after` is
    assert summary["steps"] == 4 and summary["bits_per_byte_after"] < summary["bits_per_byte_before"]


def test_heal_config_accepts_every_registered_teacher_loss_and_only_those():
    from distill.teaching import TEACHER_LOSSES
    from surgery.errors import ConfigError
    from surgery.transplant.config import HealConfig

    assert "hidden" in TEACHER_LOSSES
    for name in TEACHER_LOSSES:
        assert HealConfig(loss=name, steps=1).loss == name
    with pytest.raises(ConfigError, match="cross-vocabulary loss"):
        HealConfig(loss="kl", steps=1)
