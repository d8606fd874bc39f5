"""The distillation trainer end to end on tiny models with real tokenizers (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from surgery.config import from_dict
from surgery.errors import SurgeryError

from distill.config import DistillConfig

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def base_config(out: Path, student_dir: Path, teacher_dir: Path | None, text: Path, **sections) -> dict:
    cfg = {
        "output_dir": str(out),
        "student": {"model": str(student_dir)},
        "teachers": [{"model": str(teacher_dir)}] if teacher_dir else [],
        "data": {"train": str(text / "train.txt"), "heldout": str(text / "heldout.txt"), "block_chars": 200,
                 "max_tokens": 64},
        "loss": {"name": "pkl", "top_k": 128, "uld_topk": 32},
        "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 1, "lr": 1e-3, "progress": False,
                  "eval_max_bytes": 400},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    rows = []
    for line in (p.read_text().splitlines() if p.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def saved_alignment(tmp_path_factory, tiny_student, tiny_teacher):
    """The student→teacher projection saved with `surgery.vocab.store` (runs then skip building it)."""
    from surgery.loading import load_tokenizer
    from surgery.vocab.store import save_alignment

    sv, tv = _vocab_pair(load_tokenizer(str(tiny_student)), load_tokenizer(str(tiny_teacher)))
    return save_alignment(_projection(sv, tv), tmp_path_factory.mktemp("align") / "smol-mistral.safetensors")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_student, tiny_teacher, tiny_text, saved_alignment):
    """Deterministic mode: kill -9 mid-run, --resume, and the final weights are bitwise those of a clean run."""
    train = {"steps": 6, "checkpoint_every": 2, "deterministic": True, "threads": 1, "eval_every": 3}
    cfg = base_config(tmp_path / "unused", tiny_student, tiny_teacher, tiny_text, train=train)
    cfg["teachers"][0]["alignment"] = str(saved_alignment)
    recipe = write_yaml(tmp_path / "recipe.yaml", cfg)
    cmd = [str(BIN / "surgery"), "distill", "--config", str(recipe)]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    a = subprocess.Popen(cmd + [f"output_dir={clean}"], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen(cmd + [f"output_dir={killed}"], env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    seen = 0
    while b.poll() is None:
        steps = [r["step"] for r in read_metrics(killed) if r.get("event") == "train"]
        seen = max(steps, default=0)
        if seen >= 3:  # past the step-2 checkpoint, before the end
            b.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    b.wait()
    assert b.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "final").exists()
    assert a.wait(timeout=600) == 0, a.stderr.read().decode()[-2000:]
    r = subprocess.run(cmd + [f"output_dir={killed}", "--resume"], env=env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed at step" in r.stdout
    wa, wb = final_tensors(clean / "final"), final_tensors(killed / "final")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the metrics log has each step exactly once
    steps = [r["step"] for r in read_metrics(killed) if r.get("event") == "train"]
    assert steps == list(range(1, 7))
    assert (killed / "metrics.png").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_two_cpu_processes_match_single_process(tmp_path, tiny_student, tiny_teacher, tiny_text,
                                                         saved_alignment, strategy):
    """DDP / FSDP on gloo: same global batch → same first-step loss and gradient norm as one process, and the
    second step (after an update of replicated or sharded weights and optimizer states) too.

    The gradients are bitwise those of one process (each rank's micro-batch gradient is summed and halved, as
    one process adds the halves; halving is exact) and so are the updated weights (the same fused AdamW kernel on
    FSDP's shards; the per-tensor loop rounds differently), so only the float64 sum of the gradient norm over
    FSDP's row shards is in another order (distill.trainer.policy.grad_norm): 1e-9 leaves room for that and for
    the mean of the ranks' losses. A float32 norm (torch.nn.utils.clip_grad_norm_) differed here by 1.8e-4 under
    FSDP: it drops the squares of the embedding gradient's tiny softmax entries once a large row is in the sum,
    and each shard's sum starts afresh (CONTRIBUTING.md, Tests)."""
    cfg = base_config(tmp_path / "unused", tiny_student, tiny_teacher, tiny_text,
                      train={"steps": 2, "eval_max_bytes": 200}, loss={"name": "hkl"},
                      distributed={"strategy": strategy})
    cfg["teachers"][0]["alignment"] = str(saved_alignment)
    recipe = write_yaml(tmp_path / "recipe.yaml", cfg)
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.Popen([str(BIN / "surgery"), "distill", "--config", str(recipe), f"output_dir={one}"],
                              env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "surgery.cli",
                        "distill", "--config", str(recipe), f"output_dir={two}"],
                       env=env(), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, "\n".join(l for l in r.stderr.splitlines() if "rror" in l)[-3000:]
    assert single.wait(timeout=600) == 0, single.stderr.read().decode()[-2000:]
    m1 = [x for x in read_metrics(one) if x.get("event") == "train"]
    m2 = [x for x in read_metrics(two) if x.get("event") == "train"]
    assert len(m1) == len(m2) == 2
    for a, b in zip(m1, m2):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-9)
    assert (two / "final" / "model.safetensors.index.json").exists()


def _train(cfg_dict, **kw):
    from distill.trainer import train

    return train(from_dict(DistillConfig, cfg_dict), **kw)


def test_lora_adapter_kept_or_merged(tmp_path, tiny_student, tiny_teacher, tiny_text):
    # gold and uld need no projection: the runs stay quick
    lora = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "merge": False}
    cfg = base_config(tmp_path / "adapter", tiny_student, tiny_teacher, tiny_text,
                      student={"model": str(tiny_student), "lora": lora}, loss={"name": "gold"},
                      data={"heldout": None})
    r = _train(cfg)
    assert (r.final_dir / "adapter_config.json").exists()
    assert not (r.final_dir / "model.safetensors.index.json").exists()
    cfg = base_config(tmp_path / "merged", tiny_student, tiny_teacher, tiny_text,
                      student={"model": str(tiny_student), "lora": {**lora, "merge": True}}, data={"heldout": None},
                      loss={"name": "uld"})
    r = _train(cfg)
    w = final_tensors(r.final_dir)
    assert not any("lora" in k for k in w)
    base = final_tensors(tiny_student)
    changed = [k for k in w if "q_proj" in k and not torch.equal(w[k], base[k])]
    untouched = [k for k in w if "mlp" in k]
    assert changed and all(torch.equal(w[k], base[k]) for k in untouched)


def test_bad_lora_target_is_a_clear_error(tmp_path, tiny_student, tiny_teacher, tiny_text):
    cfg = base_config(tmp_path / "x", tiny_student, tiny_teacher, tiny_text,
                      student={"model": str(tiny_student), "lora": {"enabled": True, "target_modules": ["c_attn"]}})
    with pytest.raises(SurgeryError, match="c_attn"):
        _train(cfg)


def test_teacher_cache_built_once_and_matches_live_teacher(tmp_path, tiny_student, tiny_teacher, tiny_text,
                                                           monkeypatch, saved_alignment):
    import distill.trainer as T
    from distill.data import encode_blocks, load_documents, make_blocks
    from distill.teachers import TopKCache
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    cache_dir = tmp_path / "cache"
    cfg = base_config(tmp_path / "run1", tiny_student, tiny_teacher, tiny_text,
                      cache={"enabled": True, "dir": str(cache_dir), "top_k": 16, "batch_size": 4},
                      data={"heldout": None}, weighting={"mode": "dynamic", "score": "entropy"})
    cfg["teachers"][0]["alignment"] = str(saved_alignment)
    _train(cfg)
    cache = TopKCache(cache_dir / "teacher0")
    # compare block 3 with a live forward of the teacher
    blocks = make_blocks(load_documents(cfg["data"]["train"]), cfg["data"]["block_chars"])
    tok = load_tokenizer(str(tiny_teacher))
    enc = encode_blocks([blocks[3]], tok, canonical_vocabulary(tok), cfg["data"]["max_tokens"])
    logits = load_model(str(tiny_teacher))(input_ids=enc.input_ids).logits[0]
    n = int(cache.lengths[3])
    assert n == enc.input_ids.shape[1]
    vals, ids = torch.topk(logits, 16, dim=-1)
    torch.testing.assert_close(torch.from_numpy(cache.logits[3, :n].copy()), vals, rtol=1e-5, atol=1e-5)
    assert (torch.from_numpy(cache.ids[3, :n].astype("int64")) == ids).float().mean() > 0.99  # ties may swap
    torch.testing.assert_close(torch.from_numpy(cache.lse[3, :n].copy()), torch.logsumexp(logits, -1), rtol=1e-5,
                               atol=1e-5)
    # a second run with the same cache never loads the teacher model
    import distill.trainer.distill_task as DT

    monkeypatch.setattr(DT, "load_teacher_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg["output_dir"] = str(tmp_path / "run2")
    r = _train(cfg)
    assert r.steps == 2
    # a cache built for other settings, or cut short, is dropped (and rebuilt by the trainer), never reused
    key = dict(cache.meta)
    key = {k: key[k] for k in ("format", "teacher", "tokenizer_hash", "blocks_hash", "n_blocks", "max_tokens",
                               "top_k", "dtype")}
    assert TopKCache.open_matching(cache_dir / "teacher0", key) is not None
    import shutil

    spare = tmp_path / "spare"
    shutil.copytree(cache_dir / "teacher0", spare)
    assert TopKCache.open_matching(cache_dir / "teacher0", {**key, "max_tokens": 48}) is None
    assert not (cache_dir / "teacher0").exists()
    data = (spare / "logits.npy").read_bytes()
    (spare / "logits.npy").write_bytes(data[: len(data) // 2])  # truncated by a full disk or a kill
    assert TopKCache.open_matching(spare, key) is None and not spare.exists()
    monkeypatch.undo()
    cfg["output_dir"] = str(tmp_path / "run3")
    assert _train(cfg).steps == 2  # the trainer rebuilt the cache
    assert TopKCache.open_matching(cache_dir / "teacher0", key) is not None


def test_two_teachers_dynamic_weights(tmp_path, tiny_student, tiny_teacher, tiny_text, saved_alignment):
    cfg = base_config(tmp_path / "run", tiny_student, tiny_teacher, tiny_text, data={"heldout": None},
                      weighting={"mode": "dynamic", "score": "ce", "alpha": 2.0})
    # the second teacher shares the student's vocabulary (its projection is the identity)
    cfg["teachers"] = [{"model": str(tiny_teacher), "alignment": str(saved_alignment)}, {"model": str(tiny_student)}]
    r = _train(cfg)
    m = [x for x in read_metrics(r.output_dir) if x.get("event") == "train"][-1]
    assert m["w0"] + m["w1"] == pytest.approx(1.0, abs=1e-3)
    assert "kd0" in m and "kd1" in m


def test_kl_needs_the_students_tokenizer(tmp_path, tiny_student, tiny_teacher, tiny_text):
    cfg = base_config(tmp_path / "run", tiny_student, tiny_teacher, tiny_text, loss={"name": "kl"})
    with pytest.raises(SurgeryError, match="share the student's tokenizer"):
        _train(cfg)
    cfg = base_config(tmp_path / "run2", tiny_student, tiny_student, tiny_text, loss={"name": "kl"},
                      data={"heldout": None})
    assert _train(cfg).steps == 2


def test_a_teacher_that_does_not_fit_in_memory_is_a_clear_error(tmp_path, tiny_student, tiny_teacher, tiny_text,
                                                                 monkeypatch):
    """torch's out-of-memory error while the teacher loads becomes one line naming it and the ways out; the run
    folder is removed (nothing half-written)."""
    from helpers import no_memory_for

    no_memory_for(monkeypatch, tiny_teacher)
    cfg = base_config(tmp_path / "run", tiny_student, tiny_teacher, tiny_text, data={"heldout": None})
    with pytest.raises(SurgeryError, match=f"teacher {tiny_teacher} does not fit") as e:
        _train(cfg)
    assert "bfloat16" in e.value.hint and not (tmp_path / "run").exists()


def test_output_dir_rules(tmp_path, tiny_student, tiny_teacher, tiny_text):
    cfg = base_config(tmp_path / "run", tiny_student, None, tiny_text, loss={"name": "ce"}, data={"heldout": None},
                      train={"steps": 1})
    with pytest.raises(SurgeryError, match="no checkpoint"):
        _train(cfg, resume=True)
    _train(cfg)
    with pytest.raises(SurgeryError, match="already exists"):
        _train(cfg)
    marker = tmp_path / "run" / "final" / "config.json"
    assert marker.exists()
    r = _train(cfg, overwrite=True)
    assert r.final_dir.exists() and not list(tmp_path.glob(".run.replaced-*"))


@pytest.mark.parametrize("name", ["pkl", "hkl", "tkl", "uld", "gold", "alm"])
def test_every_cross_vocab_loss_trains_one_micro_batch(name, tiny_student, tiny_teacher, tiny_text):
    """One micro-batch through the real pieces: encode, align, teacher forward, loss, backward."""
    import contextlib

    import distill.trainer as T
    from distill.data import load_documents, make_blocks
    from distill.losses import LossConfig, build_context, make_loss
    from distill.teachers import Teacher
    from surgery.loading import load_model, load_tokenizer
    from surgery.vocab.surfaces import canonical_vocabulary

    cfg = from_dict(DistillConfig, base_config(Path("unused"), tiny_student, tiny_teacher, tiny_text,
                                               loss={"name": name}))
    s_tok, t_tok = load_tokenizer(str(tiny_student)), load_tokenizer(str(tiny_teacher))
    sv, tv = _vocab_pair(s_tok, t_tok)
    student = load_model(str(tiny_student))
    student.train()
    ctx = build_context(name, sv, tv, "cpu", projection=_projection(sv, tv), hkl_threshold=0.6)
    teacher = Teacher(0, "t", t_tok, tv, make_loss(name, LossConfig(top_k=128, uld_topk=32), ctx), 1.0,
                      load_model(str(tiny_teacher)))
    blocks = make_blocks(load_documents(cfg.data.train), 200)
    total, mets = T.micro_loss(cfg, student, s_tok, sv, [teacher], blocks[:2], [0, 1], torch.device("cpu"),
                                contextlib.nullcontext)
    total.backward()
    assert torch.isfinite(total) and mets["kd0"] > 0 and mets["chunks0"] > 10
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0


_CACHE: dict = {}


def _vocab_pair(s_tok, t_tok):
    from surgery.vocab.surfaces import canonical_vocabulary

    if "v" not in _CACHE:
        _CACHE["v"] = (canonical_vocabulary(s_tok), canonical_vocabulary(t_tok))
    return _CACHE["v"]


def _projection(sv, tv):
    from surgery.vocab.projection import build_projection

    if "p" not in _CACHE:
        _CACHE["p"] = build_projection(sv, tv)
    return _CACHE["p"]


@pytest.mark.parametrize("student_asset,teacher_asset", [("smollm2-135m", "gemma3-270m"),
                                                         ("gemma3-270m", "smollm2-135m")])
def test_gemma3_and_smollm2_both_directions(student_asset, teacher_asset, tmp_path_factory, tiny_text):
    """Byte-level BPE ↔ SentencePiece with byte fallback, each way round, through the X-Token losses and GOLD.

    Tiny models carry the real 262k / 49k tokenizers; every chunk must be aligned and every loss finite.
    """
    import contextlib

    import distill.trainer as T
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("distill_test_conftest", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    make_tiny_model = mod.make_tiny_model
    from distill.data import load_documents, make_blocks
    from distill.losses import LossConfig, build_context, make_loss
    from distill.teachers import Teacher
    from helpers import asset_dir
    import helpers
    from surgery.loading import load_model

    key = (student_asset, teacher_asset)
    if key not in _CACHE:
        sdir = make_tiny_model(asset_dir(student_asset), tmp_path_factory.mktemp("s"), seed=3)
        tdir = make_tiny_model(asset_dir(teacher_asset), tmp_path_factory.mktemp("t"), seed=4)
        _CACHE[key] = (sdir, tdir)
    sdir, tdir = _CACHE[key]
    s_tok, t_tok = helpers.tokenizer(student_asset), helpers.tokenizer(teacher_asset)
    sv, tv = helpers.vocab(student_asset), helpers.vocab(teacher_asset)
    from surgery.vocab.projection import build_projection

    P = build_projection(sv, tv)
    student = load_model(str(sdir))
    student.train()
    teacher_model = load_model(str(tdir))
    blocks = make_blocks(load_documents(str(tiny_text / "train.txt")), 200)
    texts = [blocks[0] + " Grüße 😀 中文", blocks[1]]
    for name in ("pkl", "tkl", "hkl", "gold"):
        cfg = from_dict(DistillConfig, base_config(Path("unused"), sdir, tdir, tiny_text, loss={"name": name}))
        ctx = build_context(name, sv, tv, "cpu", projection=P)
        teacher = Teacher(0, "t", t_tok, tv, make_loss(name, LossConfig(top_k=512, uld_topk=32), ctx), 1.0,
                          teacher_model)
        student.zero_grad()
        total, mets = T.micro_loss(cfg, student, s_tok, sv, [teacher], texts, [0, 1], torch.device("cpu"),
                                    contextlib.nullcontext)
        total.backward()
        assert torch.isfinite(total) and mets["kd0"] > 0, name
        assert mets["chunks0"] >= 30, name
    if name == "gold":
        # exact pairs go through canonical bytes: word-initial tokens (" der" = Ġder / ▁der) match
        pairs_s = set(ctx.pairs_s.tolist())
        word = sv.surface_to_id[b" der"]
        assert word in pairs_s


def test_teacher_coarser_is_judged_per_byte_not_per_truncated_block():
    """Both sides hit max_tokens: equal token counts, but the teacher covered twice the bytes."""
    import numpy as np

    from distill.data import EncodedBatch
    from distill.trainer import teacher_is_coarser

    def enc(n_tokens, bytes_per_token):
        ends = np.concatenate([[0], np.arange(1, n_tokens + 1) * bytes_per_token])[None, :]
        valid = np.concatenate([[False], np.ones(n_tokens, bool)])[None, :]
        z = torch.zeros(1, n_tokens + 1, dtype=torch.long)
        return EncodedBatch(z, z, ends, valid, z)

    student, teacher = enc(127, 2), enc(127, 4)
    assert teacher_is_coarser(student, teacher) and not teacher_is_coarser(teacher, student)
    assert not teacher_is_coarser(enc(100, 3), enc(50, 3))  # fewer tokens, but only because it covered less text
    assert teacher_is_coarser(enc(100, 3), enc(80, 4))


def test_max_blocks_trains_on_the_first_blocks_only(tmp_path, tiny_student, tiny_text):
    from distill.data import load_documents, make_blocks

    cfg = base_config(tmp_path / "run", tiny_student, None, tiny_text, loss={"name": "ce"}, data={"max_blocks": 2},
                      train={"steps": 3})
    r = _train(cfg)
    summary = json.loads((r.final_dir / "distill_summary.json").read_text())
    assert summary["blocks"] == 2 < len(make_blocks(load_documents(cfg["data"]["train"]), 200))
    bad = base_config(tmp_path / "run2", tiny_student, None, tiny_text, loss={"name": "ce"}, data={"max_blocks": 0})
    with pytest.raises(SurgeryError, match="max_blocks"):
        _train(bad)
