"""Tree attention: many token paths that share prefixes, evaluated in one forward pass.

Every token is a *slot* in one flat sequence; a slot attends to its ancestors and
to itself, and its position id is its depth in the tree. A 4D mask expresses
this to Hugging Face models (boolean for SDPA, additive for eager attention; a
``{"full_attention", "sliding_attention"}`` pair for models with sliding-window
layers such as Gemma-3, the window measured in positions).

:class:`PathCache` keeps one KV cache for all slots of the live branches of a
byte-level LM: asking for a set of token paths runs at most one forward pass for
the tokens it has not seen, and compacts the cache when dead branches pile up.
"""

from __future__ import annotations

import logging

import torch

from surgery.errors import SurgeryError

LOG = logging.getLogger(__name__)


def _check_attention(model) -> str:
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl not in ("sdpa", "eager"):
        raise SurgeryError(f"tree attention needs a dense attention mask; the model uses {impl!r}",
                           "load the model with attn_implementation='sdpa' (or 'eager')")
    return impl


def sliding_window(model) -> int | None:
    """Window of the model's sliding-window layers (positions), if it has any."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or []
    if "sliding_attention" in types and getattr(cfg, "sliding_window", None):
        return int(cfg.sliding_window)
    return None


def tree_mask(model, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor):
    """The ``attention_mask`` argument for a tree-shaped batch.

    Args:
        allowed: ``(Q, K)`` bool, query slot may attend key slot (ancestor or self).
        q_pos: ``(Q,)`` position ids of the queries; ``k_pos``: ``(K,)`` of the keys.

    Returns:
        A ``(1, 1, Q, K)`` mask, or a dict of them per layer type for sliding-window models.
    """
    impl = _check_attention(model)
    dtype = next(model.parameters()).dtype

    def fmt(a: torch.Tensor) -> torch.Tensor:
        a = a[None, None]
        if impl == "sdpa":
            return a
        return torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill(~a, torch.finfo(dtype).min)

    window = sliding_window(model)
    if window is None:
        return fmt(allowed)
    near = k_pos[None, :] > (q_pos[:, None] - window)
    return {"full_attention": fmt(allowed), "sliding_attention": fmt(allowed & near)}


def cache_kwarg(model) -> str:
    """Name of the decoder's KV-cache argument (``cache`` in recent transformers, else ``past_key_values``)."""
    import inspect

    params = inspect.signature(model.get_decoder().forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def logits_from_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head applied to final hidden states ``(N, H)`` → ``(N, V)`` float32 logits."""
    logits = model.get_output_embeddings()(hidden).float()
    cfg = model.config
    scale = getattr(cfg, "logits_scaling", None)
    if scale:
        logits = logits / scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def forward_tree(model, tokens: list[int], parents: list[int], positions: list[int]) -> torch.Tensor:
    """Final hidden states of a tree of tokens given as one flat list (no cache).

    Args:
        tokens: ``(L,)`` token ids; ``parents[i] < i`` is the slot of token ``i``'s parent (-1 for none).
        positions: ``(L,)`` position ids.

    Returns:
        ``(L, H)`` hidden states.
    """
    device = next(model.parameters()).device
    L = len(tokens)
    par = torch.tensor(parents, dtype=torch.long)
    allowed = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):  # row i = row of its parent + itself (parents come first)
        p = parents[i]
        if p >= 0:
            allowed[i, : p + 1] = allowed[p, : p + 1]
        allowed[i, i] = True
    del par
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    allowed = allowed.to(device)
    mask = tree_mask(model, allowed, pos, pos)
    out = model.get_decoder()(input_ids=torch.tensor([tokens], device=device), attention_mask=mask,
                              position_ids=pos[None], use_cache=False)
    return out.last_hidden_state[0]


def truncate_cache(cache, length: int) -> None:
    """Keep the first ``length`` positions of every layer of a dynamic cache."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys[..., :length, :]
            layer.values = layer.values[..., :length, :]


def chunk_bounds(parents: list[int], T: int, chunk: int) -> list[tuple[int, int]]:
    """Cut branch tokens into chunks ``[b0, b1)`` of about ``chunk`` tokens that never reach back.

    A cut at ``c`` is allowed only when no token at or after ``c`` has a branch parent
    before ``c`` (its ancestors stay in its chunk, whatever order the branches come in).

    Args:
        parents: ``(B,)`` parent of each branch token (``< T`` a trunk index, else branch ``parent - T``).
        T: trunk length; chunk: target chunk size.
    """
    B = len(parents)
    reach = [B] * (B + 1)  # reach[c]: earliest branch parent of the tokens at or after c
    for i in range(B - 1, -1, -1):
        p = parents[i]
        reach[i] = min(reach[i + 1], p - T if p >= T else B)
    pieces, begin = [], 0
    cut = [c for c in range(1, B) if reach[c] >= c] + [B]
    for a, b in zip(cut, cut[1:]):
        if b - begin > chunk and a > begin:
            pieces.append((begin, a))
            begin = a
    pieces.append((begin, B))
    return pieces


@torch.no_grad()
def forward_window(model, trunk: list[int], branches: list[tuple[int, int]], chunk: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states of a trunk (a plain causal sequence) and of branch tokens hanging off it.

    The trunk runs once with a KV cache; the branch tokens then run in chunks against
    that cache with a tree mask, so that the (mostly masked) branch-to-branch attention
    stays small. Chunks run from the one hanging off the latest trunk position to the
    earliest, and each sees only the trunk keys up to its latest attach point (the cache
    is cut there: later keys would be masked anyway), which saves attention work.

    Args:
        trunk: ``(T,)`` token ids at positions ``0..T-1``.
        branches: ``(B,)`` pairs ``(token, parent)``; ``parent < T`` is a trunk index,
            ``parent >= T`` is branch ``parent - T`` (listed before its children; a branch
            token and its branch ancestors are kept in one chunk).

    Returns:
        ``(T, H)`` and ``(B, H)`` final hidden states.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    T = len(trunk)
    decoder = model.get_decoder()
    cache = DynamicCache()
    out = decoder(input_ids=torch.tensor([trunk], device=device),
                  position_ids=torch.arange(T, device=device)[None], use_cache=True, **{cache_kwarg(model): cache})
    h_trunk = out.last_hidden_state[0]
    if not branches:
        return h_trunk, h_trunk[:0]
    pos = [0] * len(branches)
    root = [0] * len(branches)  # trunk attach point of each branch token
    for i, (_, p) in enumerate(branches):
        if p < T:
            pos[i], root[i] = p + 1, p
        else:
            pos[i], root[i] = pos[p - T] + 1, root[p - T]
    pieces = chunk_bounds([p for _, p in branches], T, chunk)
    need = [max(root[b0:b1]) + 1 for b0, b1 in pieces]  # trunk keys each chunk can see
    hidden: list[torch.Tensor | None] = [None] * len(pieces)
    for c in sorted(range(len(pieces)), key=lambda c: -need[c]):
        b0, b1 = pieces[c]
        L = need[c]
        truncate_cache(cache, L)  # drops the previous chunk and the trunk keys no branch here can see
        q = b1 - b0
        allowed = torch.zeros(q, L + q, dtype=torch.bool)
        for j in range(q):
            i = b0 + j
            allowed[j, : root[i] + 1] = True
            p = branches[i][1]
            if p >= T:
                allowed[j, L:] = allowed[p - T - b0, L:]
            allowed[j, L + j] = True
        q_pos = torch.tensor(pos[b0:b1], device=device)
        mask = tree_mask(model, allowed.to(device), q_pos, torch.cat([torch.arange(L, device=device), q_pos]))
        out = decoder(input_ids=torch.tensor([[t for t, _ in branches[b0:b1]]], device=device),
                      attention_mask=mask, position_ids=q_pos[None], use_cache=True, **{cache_kwarg(model): cache})
        hidden[c] = out.last_hidden_state[0]
    return h_trunk, torch.cat(hidden)


class PathCache:
    """Token paths (after a fixed start token) evaluated with one shared KV cache.

    Args:
        model: a Hugging Face causal LM (eval mode).
        start_id: the document-start token every path is conditioned on.
        keep: number of log-probability rows kept (least recently used dropped).

    Attributes:
        forwards: model forward passes run so far.
    """

    def __init__(self, model, start_id: int, keep: int = 256):
        from transformers import DynamicCache

        _check_attention(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.start_id = start_id
        self.keep = keep
        self._cache_cls = DynamicCache
        self.forwards = 0
        self.reset()

    def reset(self) -> None:
        self.cache = self._cache_cls()
        self.token: list[int] = []
        self.parent: list[int] = []
        self.pos: list[int] = []
        self.rows: list[torch.Tensor] = []  # ancestor-or-self mask per slot (length slot+1)
        self.child: dict[tuple[int, int], int] = {}
        self.logp: dict[int, torch.Tensor] = {}
        self._new([(-1, self.start_id)], want={0})

    def __len__(self) -> int:
        return len(self.token)

    def _new(self, items: list[tuple[int, int]], want: set[int]) -> None:
        """Append tokens ``(parent_slot, token)`` (parents first) and run one forward pass."""
        P = len(self.token)
        Q = len(items)
        allowed = torch.zeros(Q, P + Q, dtype=torch.bool)
        for j, (p, t) in enumerate(items):
            slot = P + j
            if p >= 0:
                row = self.rows[p]
                allowed[j, : len(row)] = row
            allowed[j, slot] = True
            self.rows.append(allowed[j, : slot + 1].clone())
            self.token.append(t)
            self.parent.append(p)
            self.pos.append(self.pos[p] + 1 if p >= 0 else 0)
            self.child[(p, t)] = slot
        q_pos = torch.tensor(self.pos[P:], dtype=torch.long, device=self.device)
        k_pos = torch.tensor(self.pos, dtype=torch.long, device=self.device)
        mask = tree_mask(self.model, allowed.to(self.device), q_pos, k_pos)
        keep = sorted(s - P for s in want if s >= P)
        with torch.no_grad():
            out = self.model.get_decoder()(
                input_ids=torch.tensor([[t for _, t in items]], device=self.device), attention_mask=mask,
                position_ids=q_pos[None], use_cache=True, **{cache_kwarg(self.model): self.cache})
            if keep:
                lp = torch.log_softmax(logits_from_hidden(self.model, out.last_hidden_state[0, keep]), dim=-1)
                for j, row in zip(keep, lp):
                    self.logp[P + j] = row
        self.forwards += 1

    def find(self, path: list[int], base: int = 0) -> int | None:
        """Slot of ``path`` (tokens after slot ``base``) if every token of it is cached, else ``None``."""
        s = base
        for t in path:
            s = self.child.get((s, t))
            if s is None:
                return None
        return s

    def ensure(self, paths: list[list[int]], want: list[bool], base: int = 0) -> list[int]:
        """Slots of ``paths`` (token lists after slot ``base``); evaluates what is missing in one forward pass.

        Log-probability rows (``self.logp[slot]``, ``(V,)`` float32) are guaranteed for the
        paths with ``want`` set; a path whose slot lost its row is evaluated again.
        """
        if base not in self.logp and any(w and not p for p, w in zip(paths, want)):
            raise RuntimeError("PathCache.ensure: the base slot lost its log-probability row")
        slots: list[int] = []
        new: list[tuple[int, int]] = []
        new_slot: dict[tuple[int, int], int] = {}
        want_new: set[int] = set()
        P = len(self.token)
        for path, w in zip(paths, want):
            s = base
            for k, t in enumerate(path):
                key = (s, t)
                nxt = self.child.get(key, new_slot.get(key))
                last = k == len(path) - 1
                if nxt is not None and last and w and nxt < P and nxt not in self.logp:
                    nxt = None  # evaluated before, but its row was dropped: evaluate a fresh copy
                    self.child.pop(key, None)
                if nxt is None:
                    nxt = P + len(new)
                    new.append(key)
                    new_slot[key] = nxt
                s = nxt
            slots.append(s)
            if w:
                want_new.add(s)
        if new:
            self._new(new, want_new)
        return slots

    def trim(self, active) -> None:
        """Drop log-probability rows beyond ``keep``, oldest first, never those of ``active`` or slot 0."""
        active = set(active) | {0}
        extra = len(self.logp) - self.keep
        if extra > 0:
            for s in [s for s in sorted(self.logp) if s not in active][:extra]:
                del self.logp[s]

    def compact(self, active: list[int]) -> dict[int, int]:
        """Drop every slot that is not an ancestor of ``active``; returns old → new slot ids."""
        keep = set()
        for s in active:
            while s >= 0 and s not in keep:
                keep.add(s)
                s = self.parent[s]
        order = sorted(keep)
        if len(order) == len(self.token):
            return {s: s for s in order}
        remap = {s: i for i, s in enumerate(order)}
        idx = torch.tensor(order, dtype=torch.long, device=self.device)
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, idx)
                layer.values = layer.values.index_select(-2, idx)
        cpu_idx = idx.cpu()
        self.rows = [self.rows[s][cpu_idx[: i + 1]] for i, s in enumerate(order)]
        self.token = [self.token[s] for s in order]
        self.pos = [self.pos[s] for s in order]
        self.parent = [remap[self.parent[s]] if self.parent[s] >= 0 else -1 for s in order]
        self.child = {(remap.get(p, -2), t): remap[s] for (p, t), s in self.child.items() if s in remap}
        self.logp = {remap[s]: v for s, v in self.logp.items() if s in remap}
        return remap
