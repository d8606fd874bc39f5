"""Checkpoints too large to load: tensor names from the config alone, forwards one layer at a time.

A transplant only changes the input embedding and the output head. :func:`model_skeleton`
builds the architecture with every parameter on the ``meta`` device (no memory, no
initialization), :func:`embedding_keys` maps its embedding and head modules to the
checkpoint's tensor names (checkpoint prefixes such as ``model.`` or ``language_model.``
are matched by the longest unique name suffix), and :class:`LayerStreamer` runs the
unmodified model forward with only one decoder layer's weights in memory at a time (for
the logit-bias calibration of ``tokenadapt``), reading the next layer in the background while
the current one computes. :meth:`LayerStreamer.head_inputs` runs several sequences together,
so each layer is read once for all of them: sequences of one length as one batch, sequences of
different lengths in lockstep (one thread per length, meeting at every layer). On a Llama-3.1-8B
body (16 GB, seven calibration texts) that took the calibration from 101 s (one thread per text,
reads not overlapped) to the figures in ``benchmarks/results/scale.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from surgery.checkpoint import CheckpointReader
from surgery.errors import SurgeryError
from surgery.transplant.surgery_ops import embedding_modules

LOG = logging.getLogger(__name__)

# forward FLOPs budget of the streamed calibration (2 · params · positions); smaller models use all text
CALIBRATION_FLOPS = 1e12


def model_skeleton(config):
    """The causal LM of ``config`` with parameters on ``meta`` (buffers real, e.g. rotary tables).

    Raises:
        SurgeryError: transformers cannot build a causal LM from this config.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise SurgeryError(f"cannot build a causal LM from this config: {type(e).__name__}: {first}",
                           "pass a Hugging Face causal-LM checkpoint") from e
    model.tie_weights()  # outside the context (it re-creates parameters): the skeleton shows the tie too
    return model.eval()


def match_keys(names: list[str], keys: list[str]) -> dict[str, str]:
    """Map module parameter names to checkpoint tensor names.

    A name found as is wins; otherwise the longest dotted suffix of the name that ends
    exactly one checkpoint key (``model.language_model.embed_tokens.weight`` ↔
    ``language_model.model.embed_tokens.weight`` through ``embed_tokens.weight``). A suffix keeps every index
    of the name (``model.layers.1.mlp.up_proj.weight`` never matches layer 0's tensor through
    ``mlp.up_proj.weight`` when layer 1's is missing).

    Returns:
        ``{name: key}`` for every name that could be matched.
    """
    by_suffix: dict[str, list[str]] = {}
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(k)
    out = {}
    for n in names:
        parts = n.split(".")
        for i in range(len(parts)):
            if i and parts[i - 1].isdigit():  # the suffix would drop an index: another layer's tensor
                break
            hits = by_suffix.get(".".join(parts[i:]), [])
            if n in hits:
                out[n] = n
                break
            if len(hits) == 1:
                out[n] = hits[0]
                break
            if len(hits) > 1:
                break
    return out


def _renamed_keys(skeleton, keys: list[str]) -> list[str] | None:
    """Checkpoint tensor names ``keys`` as transformers renames them when it loads ``skeleton``'s architecture (its
    legacy renames, e.g. ``LayerNorm.gamma`` → ``LayerNorm.weight``), or ``None`` where it converts tensors (merges
    per-expert tensors into one, splits fused ones: Mixtral, Qwen2-MoE) or its mapping cannot be read: then names
    and parameters cannot be compared before loading."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(skeleton)
        if any(isinstance(t, WeightConverter) for t in transforms):
            return None
        out = []
        for k in keys:
            for t in transforms:
                k, _ = t.rename_source_key(k)
            out.append(k)
        return out
    except Exception:  # another transformers version: no judgement before loading
        return None


def check_weights_stored(skeleton, keys: list[str], name) -> None:
    """Refuse a checkpoint (tensor names ``keys``) that provides not every parameter of ``skeleton`` (tied ones
    once; names matched by :func:`match_keys` after transformers' own renames): transformers would initialize the
    others at random. Not judged where transformers converts the architecture's tensors on load (the load itself
    is checked then, :func:`surgery.loading.load_model`).

    Raises:
        SurgeryError: :func:`missing_weights_error`.
    """
    keys = _renamed_keys(skeleton, keys)
    if keys is None:
        return
    names = [n for n, _ in skeleton.named_parameters()]
    found = match_keys(names, keys)
    missing = [n for n in names if n not in found]
    if missing:
        raise missing_weights_error(name, type(skeleton).__name__, missing)


def missing_weights_error(name, architecture: str, missing: list[str]) -> SurgeryError:
    """The error for checkpoint ``name`` lacking parameters ``missing`` of its ``architecture``."""
    return SurgeryError(
        f"{str(name)!r} lacks {len(missing)} weight(s) its architecture ({architecture}) needs, e.g. "
        f"{', '.join(sorted(missing)[:3])}: they would be random",
        "pass a complete causal-LM checkpoint (a language model with its head, not an encoder or a partial save)",
    )


def _module_name(model, module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise SurgeryError("embedding module not found in the model", "this is a bug; please report it")


def embedding_keys(skeleton, reader: CheckpointReader) -> tuple[str, str | None, str, str]:
    """Checkpoint names of the input embedding and the output head.

    Returns:
        ``(embed_key, head_key, head_kind, head_name)``: ``head_key`` is the stored head tensor
        (``None`` when the checkpoint stores none), ``head_kind`` is ``tied``, ``untied`` or
        ``none``, ``head_name`` the name transformers loads an untied head from.

    Raises:
        SurgeryError: the embedding is not in the checkpoint, or an untied head is missing.
    """
    emb, head, tied = embedding_modules(skeleton)
    emb_name = _module_name(skeleton, emb) + ".weight"
    head_name = _module_name(skeleton, head) + ".weight" if head is not None else ""
    found = match_keys([emb_name] + ([head_name] if head_name else []), reader.keys)
    if emb_name not in found:
        raise SurgeryError(f"checkpoint {str(reader.folder)!r} holds no input embedding (looked for {emb_name!r})",
                           "pass a Hugging Face causal-LM checkpoint whose config matches its weights")
    head_key = found.get(head_name) if head is not None else None
    kind = "none" if head is None else ("tied" if tied else "untied")
    if kind == "untied" and head_key is None:
        raise SurgeryError(f"checkpoint {str(reader.folder)!r} has an untied head but no tensor {head_name!r}",
                           "re-download or re-create the checkpoint")
    if head_key == found[emb_name]:
        head_key = None
    return found[emb_name], head_key, kind, head_name


def _layer_lists(model) -> list[nn.ModuleList]:
    n = getattr(model.config, "num_hidden_layers", None) or getattr(
        getattr(model.config, "text_config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return lists[:1]


def layer_parameter_count(model) -> int:
    """Parameters of the decoder layers of ``model`` (a :func:`model_skeleton` works: no weights needed)."""
    return sum(p.numel() for lst in _layer_lists(model) for p in lst.parameters())


def calibration_positions(layer_params: int) -> int:
    """Positions a forward through ``layer_params`` decoder-layer parameters may run within
    :data:`CALIBRATION_FLOPS`."""
    return int(CALIBRATION_FLOPS / max(2 * layer_params, 1))


class _StopAtHead(Exception):
    """Raised by the head's pre-hook in :meth:`LayerStreamer.head_inputs` (no logits are computed)."""


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    sub = module.get_submodule(path) if path else module
    sub._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class LayerStreamer(contextlib.AbstractContextManager):
    """Make a :func:`model_skeleton` runnable, one decoder layer in memory at a time.

    Parameters outside the decoder layers (final norm, ...) are loaded once; the input
    embedding is given (``in_rows``, already read); the head stays on ``meta`` (callers
    stop the forward at the head's input). Each decoder layer loads its weights from the
    checkpoint in a forward pre-hook and drops them in a forward hook.
    """

    def __init__(self, skeleton, reader: CheckpointReader, in_rows: torch.Tensor, device="cpu",
                 dtype: torch.dtype = torch.float32):
        self.model, self.reader, self.device, self.dtype = skeleton, reader, torch.device(device), dtype
        self._barrier: threading.Barrier | None = None  # set while sequences run in lockstep
        self.layer_reads = 0
        self._next: dict[str, tuple[str, nn.Module]] = {}  # layer prefix -> the next layer (prefix, module)
        self._pending: dict[str, Future] = {}  # prefix -> its weights, being read in the background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-prefetch")
        emb, head, _ = embedding_modules(skeleton)
        names = [n for n, _ in skeleton.named_parameters()]
        self.keys = match_keys(names, reader.keys)
        self.hooks = []
        layers = _layer_lists(skeleton)
        in_layer = {f"{_module_name(skeleton, lst)}." for lst in layers}
        emb_name = _module_name(skeleton, emb) + ".weight"
        head_name = _module_name(skeleton, head) + ".weight" if head is not None else None
        self.resident = [n for n in names if n != head_name and not any(n.startswith(p) for p in in_layer)]
        if getattr(emb, "padding_idx", None) is not None:
            # a forward never reads padding_idx (it only masks gradients), but F.embedding checks it against
            # the rows given, which may be only the calibration tokens' (a config pad id of 151643 among 500)
            emb.padding_idx = None
        for n in names:
            if n == emb_name:
                _set_param(skeleton, n, in_rows.to(self.device, dtype))
            elif n != head_name and not any(n.startswith(p) for p in in_layer):
                _set_param(skeleton, n, self._load(n))
        for m in skeleton.modules():
            for b, v in list(m._buffers.items()):
                if v is not None:
                    m._buffers[b] = v.to(self.device)
        for lst in layers:
            prefix = _module_name(skeleton, lst)
            for i, layer in enumerate(lst):
                self.hooks.append(layer.register_forward_pre_hook(self._loader(f"{prefix}.{i}.")))
                self.hooks.append(layer.register_forward_hook(self._dropper()))
                if i + 1 < len(lst):
                    self._next[f"{prefix}.{i}."] = (f"{prefix}.{i + 1}.", lst[i + 1])

    def _once(self, fn) -> None:
        """``fn()`` now (alone), or, in lockstep, by one thread once all have arrived, the others waiting."""
        if self._barrier is None:
            fn()
            return
        if self._barrier.wait() == 0:
            fn()
        self._barrier.wait()

    def _load(self, name: str) -> torch.Tensor:
        key = self.keys.get(name)
        if key is None:
            raise SurgeryError(f"checkpoint {str(self.reader.folder)!r} has no tensor for parameter {name!r}",
                               "pass a checkpoint whose config matches its weights")
        return self.reader.get(key, mapped=True).to(self.device, self.dtype)  # used for one layer, then dropped

    def _read_layer(self, prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
        """The weights of one decoder layer, read (and checked) from the checkpoint."""
        return {n: self._load(prefix + n) for n, _ in module.named_parameters()}

    def _loader(self, prefix: str):
        def load(module):
            pending = self._pending.pop(prefix, None)
            weights = pending.result() if pending is not None else self._read_layer(prefix, module)
            nxt = self._next.get(prefix)
            if nxt is not None and nxt[0] not in self._pending:  # read ahead while this layer computes
                self._pending[nxt[0]] = self._pool.submit(self._read_layer, *nxt)
            for n, w in weights.items():
                _set_param(module, n, w)
            self.layer_reads += 1

        def hook(module, args):
            self._once(lambda: load(module))
        return hook

    def _dropper(self):
        def drop(module):
            for n, p in list(module.named_parameters()):
                _set_param(module, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))

        def hook(module, args, output):
            self._once(lambda: drop(module))
        return hook

    def head_inputs(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Hidden states entering the head for every sequence, each decoder layer read once for all.

        Sequences of one length run as one ``(n, L)`` batch (no padding: one pass over the weights
        instead of ``n``), the batches of
        :func:`surgery.transplant.calibration.head_inputs`; each distinct length runs its own ordinary
        forward in a thread, and the threads meet at every layer, where one of them loads (then
        drops) its weights. Every batch goes through exactly the operations of the in-memory
        forward, so the states equal those of :func:`~surgery.transplant.calibration.head_inputs`
        on the whole model bit for bit.

        Args:
            seqs: ``(1, L_i)`` token ids.

        Returns:
            ``(Σ L_i, d)`` float32, sequence by sequence.
        """
        from surgery.transplant.calibration import length_groups, ungroup

        if not seqs:
            raise ValueError("head_inputs needs at least one sequence")
        groups = length_groups(seqs)
        return ungroup(groups, self._lockstep([torch.cat([seqs[j] for j in g]) for g in groups]))

    def _lockstep(self, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Head inputs ``(n_b · L_b, d)`` of each ``(n_b, L_b)`` batch, one thread per batch in lockstep."""
        head = self.model.get_output_embeddings()
        grabbed: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def grab(mod, inp):
            grabbed[threading.get_ident()] = inp[0].detach().float().reshape(-1, inp[0].shape[-1])
            raise _StopAtHead

        out: list[torch.Tensor | None] = [None] * len(seqs)

        def work(j: int) -> None:
            try:
                with torch.no_grad():
                    try:
                        self.model(input_ids=seqs[j])
                    except _StopAtHead:
                        pass
                out[j] = grabbed[threading.get_ident()]
            except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                errors.append(e)
                self._barrier.abort()

        self._barrier = threading.Barrier(len(seqs))
        hook = head.register_forward_pre_hook(grab)
        try:
            threads = [threading.Thread(target=work, args=(j,), name=f"calibration-{j}") for j in range(len(seqs))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            hook.remove()
            self._barrier = None
        if errors:
            first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
            raise first
        return out

    def __exit__(self, *exc):
        for f in self._pending.values():  # a forward that stopped early leaves a read-ahead behind
            f.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)
        for h in self.hooks:
            h.remove()
        self.hooks.clear()
        for n in self.resident:  # back to meta: the skeleton keeps no reference to the embedding rows
            p = self.model.get_parameter(n)
            _set_param(self.model, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))
        return None
