"""`surgery transplant` end to end from the command line: default tokenadapt (shipped minilm aux model)
and donor OMP, on tiny base models written here; the output is reloaded with plain transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers import asset_dir, tiny_llama, token_bytes
from surgery.checkpoint import save_checkpoint
from surgery.cli import main
from toy_tokenizers import byte_level_toy, sentencepiece_toy

TEXT = "the cat sat on the mat and the dog sat on the log. 1234 international interest\n" * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    asset_dir("minilm")
    root = tmp_path_factory.mktemp("cli-transplant")
    old_tok, new_tok = byte_level_toy(320), sentencepiece_toy(150)
    base = save_checkpoint(tiny_llama(len(old_tok), seed=4), old_tok, root / "base")
    new_tok.save_pretrained(root / "newtok")
    (root / "calib.txt").write_text(TEXT)
    return {"root": root, "base": base, "newtok": root / "newtok", "calib": root / "calib.txt",
            "old_tok": old_tok, "new_tok": new_tok}


def shared_rows(new_tok, old_tok):
    """(new id, old id) of tokens spelling the same bytes, from convert_ids_to_tokens (independent of the core)."""
    nb, ob = token_bytes(new_tok), token_bytes(old_tok)
    where: dict[bytes, list[int]] = {}
    for i, b in enumerate(ob):
        if b:
            where.setdefault(b, []).append(i)
    pairs = [(i, where[b][0]) for i, b in enumerate(nb) if b and len(where.get(b, ())) == 1]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval(), AutoTokenizer.from_pretrained(str(folder))


def _modes(folder):
    """Permission bits of the folder and of everything in it."""
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_tokenadapt_default_from_the_cli(setup, capsys):
    s = setup
    out, cache = s["root"] / "ta", s["root"] / "aux-cache"
    old_umask = os.umask(0o022)
    try:
        code = main(["transplant", str(s["base"]), str(s["newtok"]), str(out), "--cache-dir", str(cache),
                     "--calibration-text", str(s["calib"]), "--device", "cpu"])
    finally:
        os.umask(old_umask)
    assert code == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "tokenadapt" in summary and str(out) in summary

    # shared with the world: folders 0755, files 0644 under umask 022 (not the 0700 of a temporary folder)
    modes = _modes(out)
    assert modes["."] == 0o755 and all(m == (0o755 if (out / k).is_dir() else 0o644) for k, m in modes.items())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".ta.")]  # no temporary leftovers

    rep = json.loads((out / "transplant_report.json").read_text())
    assert rep["method"] == "tokenadapt"
    model, tok = _load(out)
    base, _ = _load(s["base"])
    assert len(tok) == len(s["new_tok"]) and tok.get_vocab() == s["new_tok"].get_vocab()
    new_in = model.get_input_embeddings().weight.detach()
    old_in = base.get_input_embeddings().weight.detach()
    n, o = shared_rows(s["new_tok"], s["old_tok"])
    assert len(n) > 20 and rep["counts"]["exact"] >= len(n)
    assert torch.equal(new_in[torch.as_tensor(n)], old_in[torch.as_tensor(o)])  # copied bit for bit
    others = sorted(set(range(len(tok))) - set(n.tolist()) - set(tok.all_special_ids))
    rows = new_in[torch.as_tensor(others)]
    assert torch.isfinite(rows).all() and (rows.norm(dim=1) > 0).all()
    # tokenadapt rows are built from the old rows: they lie in the span of the old embedding matrix
    q, _ = torch.linalg.qr(old_in.double().T)
    resid = rows.double().T - q @ (q.T @ rows.double().T)
    assert resid.norm() / rows.double().norm() < 1e-3
    ids = tok("the cat sat", return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(input_ids=ids).logits).all()

    # the aux embeddings were cached; a second run reuses them and gives the same weights
    assert list(cache.rglob("*.npz"))
    out2 = s["root"] / "ta2"
    assert main(["transplant", str(s["base"]), str(s["newtok"]), str(out2), "--cache-dir", str(cache),
                 "--calibration-text", str(s["calib"]), "--device", "cpu"]) == 0
    rep2 = json.loads((out2 / "transplant_report.json").read_text())
    stats = json.dumps(rep2)
    assert '"aux_old_computed": 0' in stats and '"aux_new_computed": 0' in stats, stats[:2000]
    assert torch.equal(_load(out2)[0].get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_omp_with_donor_from_the_cli(setup, capsys):
    """A donor row that is an exact combination of shared tokens' donor rows becomes the same combination
    of the base model's rows (OMP with k=4, no ridge term and no logit offset recovers it exactly; the
    donor is 128 wide so that its random rows are nearly orthogonal and OMP's greedy picks are the two atoms)."""
    s = setup
    new_tok = s["new_tok"]
    n, o = shared_rows(new_tok, s["old_tok"])
    donor = tiny_llama(len(new_tok), seed=7, hidden=128)
    w = donor.get_input_embeddings().weight
    shared = set(n.tolist())
    target = next(i for i, b in enumerate(token_bytes(new_tok)) if b and i not in shared)
    with torch.no_grad():
        w[target] = 0.5 * w[int(n[3])] - 0.25 * w[int(n[10])]
    donor_dir = save_checkpoint(donor, new_tok, s["root"] / "donor")
    out = s["root"] / "omp"
    code = main(["transplant", str(s["base"]), str(s["newtok"]), str(out), "--method", "omp", "--donor",
                 str(donor_dir), "--omp-k", "4", "--omp-ridge", "0", "--io-split", "none", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    rep = json.loads((out / "transplant_report.json").read_text())
    assert rep["method"] == "omp" and rep["counts"]["omp"] > 0
    model, _ = _load(out)
    base, _ = _load(s["base"])
    old_in = base.get_input_embeddings().weight.detach()
    got = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(got[target], 0.5 * old_in[int(o[3])] - 0.25 * old_in[int(o[10])], rtol=1e-3, atol=1e-4)
    assert torch.equal(got[torch.as_tensor(n)], old_in[torch.as_tensor(o)])
