"""Ensembles across vocabularies, FIM helpers and the two CLI commands (toy tokenizers, tiny models)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_llama
from surgery.bytelevel import ByteLM
from surgery.bytelevel.ensemble import ENSEMBLE_MODES, ByteEnsemble, TokenEnsemble
from surgery.errors import SurgeryError
from toy_tokenizers import byte_level_toy, sentencepiece_toy

TEXT = b"the cat sat on the mat"


@pytest.fixture(scope="module")
def members():
    ta, tb = byte_level_toy(), sentencepiece_toy()
    ma, mb = tiny_llama(len(ta), seed=1), tiny_llama(len(tb), seed=2)
    return (ma, ta, ByteLM(ma, ta)), (mb, tb, ByteLM(mb, tb))


@pytest.mark.parametrize("mode", ["mix", "product"])
def test_byte_ensemble_combines_members(members, mode):
    (_, _, a), (_, _, b) = members
    ens = ByteEnsemble([a, b], [0.25, 0.75], mode)
    chain = 0.0
    for i in range(len(TEXT) + 1):
        pa, pb = a.next_byte_logprobs(TEXT[:i]).exp(), b.next_byte_logprobs(TEXT[:i]).exp()
        want = 0.25 * pa + 0.75 * pb if mode == "mix" else pa ** 0.25 * pb ** 0.75
        want = want / want.sum()
        got = ens.next_byte_logprobs(TEXT[:i]).exp()
        assert torch.allclose(got, want, atol=1e-9)
        if i < len(TEXT):
            chain += math.log(float(got[TEXT[i]]))
    assert abs(ens.logprob(TEXT) - chain) < 1e-6
    out = ens.generate(b"the c", 12, temperature=0.7, seed=0)
    assert 0 < len(out) <= 12


def test_ensemble_validation(members):
    (_, _, a), (_, _, b) = members
    with pytest.raises(SurgeryError, match="weights"):
        ByteEnsemble([a, b], [1.0])
    with pytest.raises(SurgeryError, match="non-negative"):
        ByteEnsemble([a, b], [1.0, -1.0])
    with pytest.raises(SurgeryError, match="unknown ensemble mode"):
        ByteEnsemble([a, b], mode="median")
    assert {"mix", "product"} <= set(ENSEMBLE_MODES)


def test_token_ensemble_reduces_to_its_head(members):
    """With all weight on the first model the token-level ensemble is that model's token log-likelihood."""
    from surgery.evaluate import document_start_id, token_nll

    (ma, ta, _), (mb, tb, _) = members
    text = TEXT.decode()
    ids = ta(text, add_special_tokens=False)["input_ids"]
    nll, _ = token_nll(ma, [document_start_id(ta)] + ids, progress=False)
    head_only = TokenEnsemble([ma, mb], [ta, tb], [1.0, 0.0], "mix")
    assert abs(head_only.logprob(text) + float(nll.sum())) < 1e-4
    both = TokenEnsemble([ma, mb], [ta, tb], [0.5, 0.5], "product")
    assert math.isfinite(both.logprob(text))
    assert len(both.generate(b"the ", 10, seed=0)) <= 10


def test_fim_helpers(members):
    from surgery.bytelevel.fim import complete, continuation_logprobs

    (ma, ta, a), _ = members
    got = continuation_logprobs(ma, ta, "the ca", "t sat", byte_lm=a)
    assert set(got) == {"naive", "healing", "bytes"}
    want = sum(float(a.next_byte_logprobs(b"the cat sat"[:i])[b"the cat sat"[i]]) for i in range(6, 11))
    assert abs(got["bytes"] - want) < 1e-6
    assert all(v < 0 for v in got.values())
    outs = complete(ma, ta, "the ca", max_bytes=6, byte_lm=a)
    assert set(outs) == {"naive", "healing", "bytes"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, members):
    from surgery.checkpoint import save_checkpoint

    (ma, ta, _), (mb, tb, _) = members
    root = tmp_path_factory.mktemp("ckpt")
    return str(save_checkpoint(ma, ta, root / "a")), str(save_checkpoint(mb, tb, root / "b"))


def test_cli_generate_and_ensemble(checkpoints, capsys):
    from surgery.cli import main

    a, b = checkpoints
    assert main(["generate", a, "--prompt", "the ca", "--bytes", "--max-bytes", "8", "--seed", "0",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the ca") and "byte level (canonical mode)" in out
    assert main(["generate", a, "--prompt", "the ca", "--max-bytes", "8", "--device", "cpu"]) == 0
    assert "token level" in capsys.readouterr().out
    for extra in ([], ["--token-level"]):
        assert main(["ensemble", "--model", a, "--model", b, "--weight", "0.3", "--weight", "0.7", "--mode",
                     "product", "--prompt", "the ca", "--max-bytes", "8", "--device", "cpu", *extra]) == 0
        assert "product of" in capsys.readouterr().out


def test_cli_bad_options_exit_2(checkpoints, capsys):
    from surgery.cli import main

    a, b = checkpoints
    assert main(["ensemble", "--model", a, "--model", b, "--weight", "1", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--weight" in err
    assert main(["generate", a, "--prompt", "x", "--top-p", "0", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--top-p" in err and "--temperature" in err
