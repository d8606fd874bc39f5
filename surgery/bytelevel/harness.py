"""lm-evaluation-harness models: byte-level LMs, cross-vocabulary ensembles and token LMs.

Two :class:`lm_eval.api.model.LM` classes, registered in lm-eval's model registry:

- ``surgery-bytelm`` (:class:`ByteLevelLM`) wraps a :class:`~surgery.bytelevel.bytelm.ByteLM` or a
  :class:`~surgery.bytelevel.ensemble.ByteEnsemble`. A request ``(context, continuation)`` is scored on
  the UTF-8 bytes of ``context + continuation``: its log-likelihood is the sum of the byte-level
  log-probabilities of the continuation's bytes given everything before them, and it is greedy when
  every one of those bytes is the argmax of its next-byte distribution (257 outcomes, end of text
  included). Tokenization never enters: every model and every ensemble of models with different
  vocabularies answers the same question about the same bytes. Only the continuation's bytes are
  scored (:func:`~surgery.bytelevel.scoring.score` with ``start=len(context)``): the choices of a
  multiple-choice document share a context that costs each of them its trunk tokens only, no
  covering tree per context byte. ``loglikelihood_rolling`` is the prefix log-probability of the
  whole text; ``generate_until`` decodes byte by byte.
- ``surgery-tokenlm`` (:class:`TokenLevelLM`) is the token-level counterpart: one Hugging Face model
  (batched, padded forward passes) or the approximate :class:`~surgery.bytelevel.ensemble.TokenEnsemble`.
  Requests are split into tokens as lm-eval's ``hf`` model splits them (the context's trailing spaces
  move to the continuation; the continuation's tokens are those of the joint text after the context's).

Both condition every text on the document-start token of :func:`surgery.evaluate.document_start_id`
(lm-eval's ``hf`` model adds it only where the tokenizer does, e.g. Gemma but not SmolLM2).
:func:`run_tasks` runs tasks in process (``lm_eval.simple_evaluate`` with a ``TaskManager`` over
``include_path``) and returns lm-eval's results dict.
"""

from __future__ import annotations

import logging

import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry fills itself only while empty
import numpy as np
import torch
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from surgery.bytelevel.bytelm import EOT, ByteLM, sample_index
from surgery.bytelevel.ensemble import ByteEnsemble, TokenEnsemble, mix
from surgery.bytelevel.scoring import score
from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)

BYTES_PER_GEN_TOKEN = 4  # lm-eval's max_gen_toks becomes this many bytes at byte level


def byte_scores(scorer, data: bytes, greedy: bool = True, start: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-byte log-probabilities of ``data[start:]`` given ``data[:start]`` under a ByteLM or ByteEnsemble.

    Args:
        scorer: a :class:`ByteLM` or :class:`ByteEnsemble`.
        data: the text's bytes (conditioned on the document start only).
        greedy: also say, per scored byte, whether it is the argmax of its next-byte distribution
            (needs the full 257-way distributions: slower).
        start: bytes of context, conditioned on and not scored (:func:`~surgery.bytelevel.scoring.score`
            builds nothing for the prefixes inside it).

    Returns:
        ``(n - start,)`` float64 ``log P(data[i] | data[:i])`` for ``i >= start`` and ``(n - start,)``
        bool argmax flags (``None`` unless ``greedy``).
    """
    n = len(data) - start
    if n <= 0:
        return np.zeros(0), (np.zeros(0, dtype=bool) if greedy else None)
    idx = np.frombuffer(data, dtype=np.uint8)[start:].astype(np.int64)
    members = [scorer] if isinstance(scorer, ByteLM) else scorer.members
    if not greedy and (isinstance(scorer, ByteLM) or scorer.mode == "mix"):
        # each member is normalized per byte: a mixture needs only the actual bytes' probabilities
        per = [score(m, data, start=start).byte_logprobs for m in members]
        if isinstance(scorer, ByteLM):
            return per[0], None
        return mix(torch.from_numpy(np.stack(per)), scorer.weights).numpy(), None
    per = [torch.from_numpy(score(m, data, full=True, start=start).dists[:n]) for m in members]  # (n, 257) each
    dists = (per[0] if isinstance(scorer, ByteLM) else scorer.combine(torch.stack(per), scorer.weights)).numpy()
    lp = dists[np.arange(n), idx]
    return lp, (dists.argmax(axis=1) == idx if greedy else None)


def _until(gen_kwargs: dict) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else list(until)


def _cut(text: str, until: list[str]) -> str:
    for s in until:
        if s and s in text:
            text = text.split(s, 1)[0]
    return text


@register_model("surgery-bytelm")
class ByteLevelLM(LM):
    """lm-eval model over a :class:`ByteLM` or :class:`ByteEnsemble` (see module docstring).

    Args:
        scorer: the byte-level LM or ensemble.
        greedy: compute ``is_greedy`` exactly (full next-byte distributions); when False it is
            always reported False and scoring is faster.
        progress: show tqdm bars.
    """

    def __init__(self, scorer, greedy: bool = True, progress: bool = True):
        super().__init__()
        if not isinstance(scorer, (ByteLM, ByteEnsemble)):
            raise SurgeryError(f"surgery-bytelm needs a ByteLM or ByteEnsemble, got {type(scorer).__name__}",
                               "wrap the model with surgery.bytelevel.ByteLM")
        self.scorer = scorer
        self.greedy = greedy
        self.progress = progress

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "ByteLevelLM":
        """``model=A|B,weight=0.5|0.5,mode=mix,byte_mode=canonical,device=cpu`` (lm-eval ``--model_args``)."""
        from lm_eval.utils import simple_parse_args_string

        a = simple_parse_args_string(arg_string)
        return build_lm(str(a["model"]).split("|"), _floats(a.get("weight")), a.get("mode", "mix"),
                        byte_mode=a.get("byte_mode", "canonical"), device=a.get("device"))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [(c.encode("utf-8"), x.encode("utf-8")) for c, x in (r.args for r in requests)]
        order = sorted(set(pairs), key=lambda p: -len(p[0]) - len(p[1]))  # each distinct text once, longest first
        done: dict[tuple[bytes, bytes], tuple[float, bool]] = {}
        for ctx, cont in tqdm(order, desc="loglikelihood (byte level)", disable=disable_tqdm or not self.progress):
            if not cont:
                done[(ctx, cont)] = (0.0, True)
                continue
            lp, top = byte_scores(self.scorer, ctx + cont, self.greedy, start=len(ctx))
            done[(ctx, cont)] = (float(lp.sum()), bool(top.all()) if top is not None else False)
        out = [done[p] for p in pairs]
        for r, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling (byte level)",
                            disable=disable_tqdm or not self.progress):
            data = text.encode("utf-8")
            out.append(float(self.scorer.logprob(data)) if data else 0.0)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for ctx, kw in tqdm([r.args for r in requests], desc="generate_until (byte level)",
                            disable=disable_tqdm or not self.progress):
            kw = dict(kw or {})
            until = _until(kw)
            max_bytes = int(kw.get("max_gen_toks", 256)) * BYTES_PER_GEN_TOKEN
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) else 0.0
            prefix, got = ctx.encode("utf-8"), bytearray()
            for _ in range(max_bytes):
                b = sample_index(self.scorer.next_byte_logprobs(prefix + bytes(got)), temperature,
                                 float(kw.get("top_p", 1.0)))
                if b == EOT:
                    break
                got.append(b)
                if until and any(s and s in got.decode("utf-8", errors="ignore") for s in until):
                    break
            out.append(_cut(got.decode("utf-8", errors="ignore"), until))
        return out


@register_model("surgery-tokenlm")
class TokenLevelLM(TemplateLM):
    """lm-eval model over one token LM (batched) or an approximate :class:`TokenEnsemble`.

    Args:
        models, tokenizers: the members; with one model, plain batched token-level scoring.
        weights, mode: the ensemble's (ignored for one model).
        batch_size: requests per forward pass (one model).
        progress: show tqdm bars.
    """

    backend = "causal"

    def __init__(self, models, tokenizers, weights=None, mode: str = "mix", batch_size: int = 8,
                 progress: bool = True):
        from surgery.evaluate import document_start_id
        from surgery.vocab.surfaces import canonical_vocabulary

        super().__init__()
        self.model, self.tokenizer = models[0], tokenizers[0]
        self.ensemble = TokenEnsemble(models, tokenizers, weights, mode) if len(models) > 1 else None
        start = document_start_id(self.tokenizer)
        if start is None:
            raise SurgeryError("the tokenizer has neither BOS nor EOS to condition on", "set tokenizer.bos_token")
        self.start = int(start)
        self.batch_size = batch_size
        self.progress = progress
        self.surfaces = canonical_vocabulary(self.tokenizer).surfaces
        self.device_ = next(self.model.parameters()).device
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = int(limit) if limit else 2048

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "TokenLevelLM":
        """``model=A|B,weight=0.5|0.5,mode=mix,batch_size=8,device=cpu`` (lm-eval ``--model_args``)."""
        from lm_eval.utils import simple_parse_args_string

        a = simple_parse_args_string(arg_string)
        return build_lm(str(a["model"]).split("|"), _floats(a.get("weight")), a.get("mode", "mix"),
                        token_level=True, device=a.get("device"), batch_size=int(a.get("batch_size", 8)))

    @property
    def eot_token_id(self) -> int:
        return self.start

    @property
    def prefix_token_id(self) -> int:
        return self.start

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=False)["input_ids"]

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        items = []
        for key, ctx, cont in requests:
            ctx = list(ctx)
            if not ctx or ctx[0] != self.start:
                ctx = [self.start] + ctx  # condition on the document start, as the byte-level models do
            items.append((key, ctx, list(cont)))
        if self.ensemble is not None:
            fn = self._ensemble_one
            batches = [[i] for i in range(len(items))]
        else:
            fn = self._batch
            order = sorted(range(len(items)), key=lambda i: -len(items[i][1]) - len(items[i][2]))
            batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        out: list = [None] * len(items)
        for batch in tqdm(batches, desc="loglikelihood (token level)", disable=disable_tqdm or not self.progress):
            for i, res in zip(batch, fn([items[i] for i in batch])):
                out[i] = res
                if items[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", items[i][0], res)
        return out

    @torch.no_grad()
    def _batch(self, items) -> list[tuple[float, bool]]:
        """One padded forward pass of the plain model over ``[ctx + cont]`` rows (right padding)."""
        from surgery.bytelevel.treeattn import logits_from_hidden

        seqs = [(ctx + cont)[-(self.max_length + 1):] for _, ctx, cont in items]
        width = max(len(s) for s in seqs) - 1
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s) - 1] = torch.tensor(s[:-1])
            mask[r, :len(s) - 1] = 1
        hidden = self.model.get_decoder()(input_ids=ids.to(self.device_), attention_mask=mask.to(self.device_),
                                          use_cache=False).last_hidden_state
        out = []
        for r, (s, (_, _, cont)) in enumerate(zip(seqs, items)):
            n = len(s) - 1
            rows = hidden[r, n - len(cont):n]  # predicts the continuation's tokens
            lp = torch.log_softmax(logits_from_hidden(self.model, rows).double(), dim=-1)
            tgt = torch.tensor(cont, device=lp.device)
            out.append((float(lp[torch.arange(len(cont)), tgt].sum()), bool((lp.argmax(-1) == tgt).all())))
        return out

    def _ensemble_one(self, items) -> list[tuple[float, bool]]:
        (_, ctx, cont), = items
        head = ctx[1:]  # TokenEnsemble adds the document start itself
        off = self.ensemble.members[0].offset  # a dummy-prefix space is part of the stream, not of the text
        data = bytearray(b"".join(self.surfaces[t] or b"" for t in head))
        total, greedy = 0.0, True
        for t in cont:
            lp = self.ensemble.next_token_logprobs(bytes(data[off:]), head)
            total += float(lp[t])
            greedy = greedy and int(lp.argmax()) == t
            head = head + [t]
            data.extend(self.surfaces[t] or b"")
        return [(total, greedy)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling (token level)",
                            disable=disable_tqdm or not self.progress):
            if self.ensemble is not None:
                out.append(float(self.ensemble.logprob(text)))
                continue
            wins = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.start, max_seq_len=self.max_length,
                context_len=1)]
            res = self._loglikelihood_tokens([(None, c, x) for c, x in wins], disable_tqdm=True)
            out.append(sum(r[0] for r in res))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for ctx, kw in tqdm([r.args for r in requests], desc="generate_until (token level)",
                            disable=disable_tqdm or not self.progress):
            kw = dict(kw or {})
            until = _until(kw)
            max_new = int(kw.get("max_gen_toks", 256))
            if self.ensemble is not None:
                got = self.ensemble.generate(ctx.encode("utf-8"), max_new * BYTES_PER_GEN_TOKEN, temperature=0.0)
                out.append(_cut(got.decode("utf-8", errors="ignore"), until))
                continue
            ids = torch.tensor([[self.start] + self.tok_encode(ctx)], device=self.device_)
            gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, stop_strings=until or None, tokenizer=self.tokenizer,
                                      pad_token_id=self.tokenizer.pad_token_id or self.start)
            out.append(_cut(self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True), until))
        return out


def _floats(s) -> list[float] | None:
    if s is None or s == "":
        return None
    return [float(x) for x in str(s).split("|")]


def build_lm(models: list[str], weights: list[float] | None = None, mode: str = "mix", *,
             token_level: bool = False, byte_mode: str = "canonical", device: str | None = None,
             batch_size: int = 8, greedy: bool = True, progress: bool = True) -> LM:
    """Load the models and wrap them as an lm-eval model.

    Args:
        models: asset names, local HF folders or hub ids (several: an ensemble).
        weights, mode: ensemble weights (default uniform) and mode (``mix`` or ``product``).
        token_level: :class:`TokenLevelLM` instead of :class:`ByteLevelLM`.
        byte_mode: ByteLM mode (``canonical`` or ``exact``).
        device: ``cpu`` / ``cuda`` (default: CUDA when available).
        batch_size: token-level requests per forward pass.
        greedy: byte level: compute ``is_greedy`` exactly.

    Returns:
        An :class:`lm_eval.api.model.LM`.
    """
    from surgery.loading import default_device, load_model, load_tokenizer

    dev = device or default_device()
    toks = [load_tokenizer(m) for m in models]
    lms = [load_model(m, device=dev, tokenizer=t) for m, t in zip(models, toks)]
    if token_level:
        return TokenLevelLM(lms, toks, weights, mode, batch_size=batch_size, progress=progress)
    members = [ByteLM(m, t, mode=byte_mode) for m, t in zip(lms, toks)]
    scorer = members[0] if len(members) == 1 else ByteEnsemble(members, weights, mode)
    return ByteLevelLM(scorer, greedy=greedy, progress=progress)


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's ``TaskManager`` for ``tasks``, and the names in ``tasks`` it does not know.

    With ``include_path`` the folder alone is indexed first (lm-eval's own ~15k task files take
    seconds to index); lm-eval's tasks are added only when a name is not found there.

    Returns:
        ``(manager, missing)``: missing are names that are neither a task, a group nor a tag.
    """
    from lm_eval.tasks import TaskManager

    if include_path:
        tm = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in set(tm.all_tasks) for t in tasks):
            return tm, []
        tm = TaskManager(include_path=include_path)
    else:
        tm = TaskManager()
    known = set(tm.all_tasks)
    return tm, [t for t in tasks if t not in known]


def run_tasks(lm: LM, tasks: list[str], include_path: str | None = None, limit: int | None = None,
              num_fewshot: int | None = None, seed: int = 0, manager=None, log_samples: bool = False) -> dict:
    """Run lm-eval tasks on ``lm`` in process.

    Args:
        manager: a ``TaskManager`` from :func:`task_manager` to reuse (default: a new one).
        log_samples: keep lm-eval's per-document records (``samples[task]``).

    Returns:
        lm-eval's results dict (``results[task]["acc,none"]`` ...).

    Raises:
        SurgeryError: a task name lm-eval does not know.
    """
    import lm_eval

    tm, missing = (manager, []) if manager is not None else task_manager(tasks, include_path)
    if missing:
        raise SurgeryError(f"unknown lm-eval task(s): {', '.join(missing)}",
                           "check --tasks, or point --include-path at the folder of their YAML files")
    res = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm,
                                  limit=limit, num_fewshot=num_fewshot, log_samples=log_samples, random_seed=seed,
                                  numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if res is None:
        raise SurgeryError("lm-eval returned no results", "run on one process (rank 0)")
    return dict(res)


__all__ = ["ByteLevelLM", "TokenLevelLM", "build_lm", "byte_scores", "run_tasks", "task_manager"]
