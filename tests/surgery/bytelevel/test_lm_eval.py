"""lm-evaluation-harness models: byte level against brute force, token level against lm-eval's own `hf`
model and a plain forward pass, ensembles, and `surgery lm-eval` end to end on the local task."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from helpers import ROOT, asset_dir, tiny_llama, tokenizer, vocab  # noqa: E402
from surgery.bytelevel import ByteLM  # noqa: E402
from surgery.bytelevel.ensemble import ByteEnsemble, TokenEnsemble  # noqa: E402
from surgery.bytelevel.harness import ByteLevelLM, TokenLevelLM, run_tasks, task_manager  # noqa: E402
from surgery.bytelevel.validity import Canonicalizer  # noqa: E402
from surgery.cli import main  # noqa: E402

TASKS = ROOT / "artifacts" / "tasks"
TOL = 1e-4  # nats


def _reqs(kind: str, pairs) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=tuple(p), idx=i) for i, p in enumerate(pairs)]


@pytest.fixture(scope="module")
def smol():
    tok = tokenizer("smollm2-135m")
    return tok, tiny_llama(len(tok), seed=5)


@pytest.fixture(scope="module")
def canon():
    """One canonicalizer of SmolLM2's tokenizer for every ByteLM here (building one reads the whole vocabulary)."""
    return Canonicalizer(tokenizer("smollm2-135m"), vocab("smollm2-135m"))


def test_byte_level_equals_sum_over_cover_encodings(smol, canon, brute_force):
    """Exact mode: log P(cont | ctx) = log Σ_cover p(ctx+cont) − log Σ_cover p(ctx), by enumeration."""
    tok, model = smol
    v = vocab("smollm2-135m")
    blm = ByteLM(model, tok, mode="exact", canon=canon)
    brute = brute_force(model, tok, v.surfaces, blm.start_id, v.dummy_prefix)
    pairs = [("Hi", " there"), ("", "a b"), ("x\n", "\ny"), ("a ", " b!")]
    got = ByteLevelLM(blm, progress=False).loglikelihood(_reqs("loglikelihood", pairs))
    for (ctx, cont), (ll, _) in zip(pairs, got):
        c, x = ctx.encode(), cont.encode()
        ref = brute.prefix_logprob_exact(c + x) - (brute.prefix_logprob_exact(c) if c else 0.0)
        assert abs(ll - ref) < TOL, (ctx, cont, ll, ref)


def test_byte_level_greedy_and_chain_against_next_byte_path(smol, canon):
    """Canonical mode: the scores (one pass over the text) equal the chain of next_byte_logprobs
    (the incremental covering tree), and is_greedy is the argmax test along that chain."""
    tok, model = smol
    lm = ByteLevelLM(ByteLM(model, tok, canon=canon), progress=False)
    ref_lm = ByteLM(model, tok, canon=canon)
    # a greedy continuation by construction: the argmax ASCII bytes after "ab", while they are the argmax
    greedy, prefix = "", b"ab"
    for _ in range(3):
        b = int(ref_lm.next_byte_logprobs(prefix).argmax())
        if b >= 128:
            break
        greedy, prefix = greedy + chr(b), prefix + bytes([b])
    pairs = [("The cat", " sat."), ("", "it's 12")] + ([("ab", greedy)] if greedy else [])
    got = lm.loglikelihood(_reqs("loglikelihood", pairs))
    for (ctx, cont), (ll, is_greedy) in zip(pairs, got):
        c, x = ctx.encode(), cont.encode()
        total, top = 0.0, True
        for i in range(len(x)):
            row = ref_lm.next_byte_logprobs(c + x[:i])
            total += float(row[x[i]])
            top = top and int(row.argmax()) == x[i]
        assert abs(ll - total) < TOL
        assert is_greedy == top
    assert not got[0][1] or not got[1][1]  # a random tiny model does not produce both texts greedily
    if greedy:
        assert got[2][1] is True


@pytest.mark.parametrize("kind", ["single", "mix", "product"])
@pytest.mark.parametrize("greedy", [False, True])
def test_shared_context_scored_once_equals_whole_text(smol, canon, kind, greedy):
    """Requests sharing a context score only their continuation's bytes (``score(..., start=len(ctx))``); the
    slow path scores every byte of ``ctx + cont`` and sums the continuation's: equal within 1e-5 nats, and the
    same argmax flags."""
    from surgery.bytelevel.scoring import score

    tok, model = smol
    members = [ByteLM(model, tok, canon=canon), ByteLM(tiny_llama(len(tok), seed=9), tok, canon=canon)]
    scorer = members[0] if kind == "single" else ByteEnsemble(members, [0.4, 0.6], kind)
    ctx = "All files and directories are arranged in one big tree  "
    conts = ["rooted at \"/\".", " It is upside down.", "\n\nA named pipe is a file.", "Grüße"]
    got = ByteLevelLM(scorer, greedy=greedy, progress=False).loglikelihood(
        _reqs("loglikelihood", [(ctx, c) for c in conts]))
    k = len(ctx.encode())
    for cont, (ll, top) in zip(conts, got):
        data = (ctx + cont).encode()
        idx = torch.tensor(list(data[k:]))
        rows = [torch.from_numpy(score(m, data, full=True).dists[k:len(data)]) for m in members]
        dist = rows[0] if kind == "single" else scorer.combine(torch.stack(rows), scorer.weights)
        lp = dist[torch.arange(len(idx)), idx]
        assert abs(ll - float(lp.sum())) < 1e-5, (cont, ll, float(lp.sum()))
        assert top == (bool((dist.argmax(-1) == idx).all()) if greedy else False)


def test_rolling_is_prefix_logprob(smol, canon):
    tok, model = smol
    blm = ByteLM(model, tok, canon=canon)
    text = "Files are organized into directories.\n"
    (got,) = ByteLevelLM(blm, progress=False).loglikelihood_rolling(_reqs("loglikelihood_rolling", [(text,)]))
    assert abs(got - blm.logprob(text.encode())) < TOL


def test_generate_until_is_greedy_decoding(smol, canon):
    tok, model = smol
    blm = ByteLM(model, tok, canon=canon)
    ref = blm.generate(b"Hello", max_bytes=12, temperature=0.0).decode("utf-8", errors="ignore")
    (got,) = ByteLevelLM(blm, progress=False).generate_until(
        _reqs("generate_until", [("Hello", {"until": ["\x00never"], "max_gen_toks": 3})]))
    assert got == ref
    stop = ref[2:4] if len(ref) >= 4 else None
    if stop:
        (cut,) = ByteLevelLM(blm, progress=False).generate_until(
            _reqs("generate_until", [("Hello", {"until": [stop], "max_gen_toks": 3})]))
        assert cut == ref.split(stop, 1)[0]


@pytest.mark.parametrize("mode", ["mix", "product"])
def test_ensemble_chain_and_copies(smol, canon, mode):
    """An ensemble's log-likelihood is the difference of its prefix log-probabilities, and an
    ensemble of two copies of one model scores exactly as that model."""
    tok, model = smol
    other = tiny_llama(len(tok), seed=6)
    pair = ByteEnsemble([ByteLM(model, tok, canon=canon), ByteLM(other, tok, canon=canon)], [0.3, 0.7], mode)
    ctx, cont = "a b", " c d"
    ((ll, _),) = ByteLevelLM(pair, progress=False).loglikelihood(_reqs("loglikelihood", [(ctx, cont)]))
    assert abs(ll - (pair.logprob((ctx + cont).encode()) - pair.logprob(ctx.encode()))) < TOL
    twins = ByteEnsemble([ByteLM(model, tok, canon=canon), ByteLM(model, tok, canon=canon)], None, mode)
    ((lt, _),) = ByteLevelLM(twins, progress=False).loglikelihood(_reqs("loglikelihood", [(ctx, cont)]))
    single = ByteLevelLM(ByteLM(model, tok, canon=canon), progress=False)
    ((ls, _),) = single.loglikelihood(_reqs("loglikelihood", [(ctx, cont)]))
    assert abs(lt - ls) < TOL


def _direct(model, ids: list[int], n_ctx: int) -> tuple[float, bool]:
    """log p(ids[n_ctx:] | ids[:n_ctx]) from one plain forward pass (logits of the full model)."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    tgt = torch.tensor(ids[n_ctx:])
    rows = lp[n_ctx - 1:len(ids) - 1]
    return float(rows[torch.arange(len(tgt)), tgt].sum()), bool((rows.argmax(-1) == tgt).all())


@pytest.mark.parametrize("asset", ["smollm2-135m", "mistral-v1-tokenizer"])
def test_token_level_matches_plain_forward_and_lm_eval_hf(asset):
    """Batched token-level scores (padding, batch order) equal one plain forward per request, and
    lm-eval's own HFLM on the same model (BOS added, so both condition on the same start token)."""
    from lm_eval.models.huggingface import HFLM

    tok = tokenizer(asset)
    model = tiny_llama(len(tok), seed=7)
    pairs = [("The cat", " sat on the mat."), ("Files are", " organized"), ("", "Hello world"), ("a  ", "b")]
    lm = TokenLevelLM([model], [tok], batch_size=3, progress=False)
    got = lm.loglikelihood(_reqs("loglikelihood", pairs))
    start = lm.start
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        n_sp = len(ctx) - len(ctx.rstrip())
        c, x = (ctx[:-n_sp], ctx[-n_sp:] + cont) if n_sp else (ctx, cont)
        whole = tok(c + x, add_special_tokens=False)["input_ids"]
        n_ctx = len(tok(c, add_special_tokens=False)["input_ids"]) if c else 0
        ref, ref_greedy = _direct(model, [start] + whole, 1 + n_ctx)
        assert abs(ll - ref) < 1e-3 and greedy == ref_greedy
    if tok("a")["input_ids"][:1] == [start]:  # the tokenizer adds BOS itself (Mistral): HFLM conditions as we do
        # HFLM sets a pad token on the tokenizer it is given: hand it a copy, not the session-cached one
        hf = HFLM(pretrained=model, tokenizer=copy.deepcopy(tok), add_bos_token=True, batch_size=2, device="cpu")
        ref = hf.loglikelihood(_reqs("loglikelihood", pairs[:2] + pairs[3:]), disable_tqdm=True)
        for (ll, g), (rl, rg) in zip(got[:2] + got[3:], ref):
            assert abs(ll - rl) < 1e-3 and g == rg


def test_token_ensemble_path(smol):
    """The token-level ensemble's request score equals the difference of TokenEnsemble.logprob."""
    tok, model = smol
    g = tokenizer("mistral-v1-tokenizer")  # SentencePiece with a dummy-prefix space
    other = tiny_llama(len(g), seed=8)
    lm = TokenLevelLM([model, other], [tok, g], [0.5, 0.5], "mix", progress=False)
    ctx, cont = "The cat", " sat on the mat."
    ((ll, _),) = lm.loglikelihood(_reqs("loglikelihood", [(ctx, cont)]))
    ens = TokenEnsemble([model, other], [tok, g], [0.5, 0.5], "mix")
    assert abs(ll - (ens.logprob(ctx + cont) - ens.logprob(ctx))) < 1e-3


def test_local_task_is_what_the_builder_writes_and_loads():
    """The committed task files are byte for byte what artifacts/tasks/make_tasks.py writes; lm-eval finds them."""
    r = subprocess.run([sys.executable, str(TASKS / "make_tasks.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    _, missing = task_manager(["nextsent", "nextsent_en", "nextsent_zh"], str(TASKS / "nextsent"))
    assert missing == []
    rows = [json.loads(s) for s in (TASKS / "nextsent" / "nextsent_en.jsonl").read_text().splitlines()]
    assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)


def test_run_tasks_on_tiny_model(smol, canon):
    tok, model = smol
    lm = ByteLevelLM(ByteLM(model, tok, canon=canon), progress=False)
    res = run_tasks(lm, ["nextsent_en"], str(TASKS / "nextsent"), limit=1)
    assert 0.0 <= res["results"]["nextsent_en"]["acc,none"] <= 1.0


@pytest.mark.parametrize("extra, needle", [
    (["--weight", "1"], "--weight values"),
    (["--weight", "nan", "--weight", "1"], "finite"),
    (["--limit", "0"], "--limit"),
    (["--tasks", "no_such_task"], "unknown lm-eval task"),
    (["--include-path", "/nonexistent/tasks"], "not a folder"),
])
def test_cli_rejects_bad_input_before_work(tmp_path, capsys, extra, needle):
    out = tmp_path / "r.json"
    argv = ["lm-eval", "--model", "smollm2-135m", "--model", "gemma3-270m", "--tasks", "nextsent_en",
            "--include-path", str(TASKS / "nextsent"), "--output", str(out)]
    for flag in ("--tasks", "--include-path"):
        if flag in extra:
            i = argv.index(flag)
            del argv[i:i + 2]
    assert main(argv + extra) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("{}")
    assert main(["lm-eval", "--model", "smollm2-135m", "--tasks", "nextsent_en", "--include-path",
                 str(TASKS / "nextsent"), "--output", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "{}"


@pytest.mark.integration
@pytest.mark.parametrize("models", [["smollm2-135m"], ["smollm2-135m", "gemma3-270m"]], ids=["single", "ensemble"])
def test_cli_end_to_end_on_shipped_models(tmp_path, models):
    for m in models:
        asset_dir(m)
    out = tmp_path / "results.json"
    argv = ["lm-eval", "--tasks", "nextsent_en", "--include-path", str(TASKS / "nextsent"), "--limit", "1",
            "--no-greedy", "--output", str(out), "--device", "cpu"]
    for m in models:
        argv += ["--model", m]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    acc = res["results"]["nextsent_en"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and math.isfinite(acc)
    assert res["surgery"]["models"] == models
    assert np.isclose(res["n-samples"]["nextsent_en"]["effective"], 1)
