"""Scoring a whole text at byte level on its canonical tokenization.

The definitions are those of :mod:`surgery.bytelevel.bytelm`. To score
``z`` (the text's stream) every prefix ``z[:k]`` needs its covering tree: the
encoding of the pieces before ``B_k`` (the start of the last pre-token piece of
``z[:k]``) plus the nodes inside that piece. Because pre-token boundaries
before the last piece never move, that encoding is a prefix of the
canonical tokenization of the whole text (the *trunk*), and the tree of every
prefix hangs off the trunk as short *branches*. Windows over the trunk (as in
:func:`surgery.evaluate.token_nll`) run as plain sequences; the branches owned by
a window then run in chunks against its KV cache with tree attention
(:func:`~surgery.bytelevel.treeattn.forward_window`), so no byte costs a pass of
its own. In ``exact`` mode there is one tree for the whole text (every
segmentation), hung off the same trunk.

For prefix ``z[:k]`` with nodes ``e`` ending at ``m_e ≤ k`` (probabilities relative
to the tree's root), the next-byte numerator and normalizer are

    num_k(b) = Σ_e p(e) · P_e(surface starts with z[m_e:k]·b)
    N_k      = Σ_{m_e<k} p(e) · (P_e(starts with z[m_e:k]) − P_e(equals z[m_e:k])) + Σ_{m_e=k} p(e)

and ``log P(z[k] | z[:k]) = log num_k(z[k]) − log N_k``; ``N_k`` is the sum of the
257 numerators (the end-of-text one from nodes with ``m_e = k``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from surgery.bytelevel.cover import CoverTree
from surgery.bytelevel.masses import NodeMasses
from surgery.bytelevel.treeattn import forward_window, logits_from_hidden

LOG = logging.getLogger(__name__)


@dataclass
class ScoreResult:
    """Result of :func:`score`.

    Attributes:
        logprob: natural-log prefix probability of the text.
        byte_logprobs: ``(n,)`` log P(byte i | bytes before it).
        dists: ``(n+1, 257)`` next-byte log-probabilities after each prefix (``full=True`` only).
        n_bytes, n_trunk, n_branch: bytes scored, trunk tokens, extra branch tokens evaluated.
        n_windows: forward passes; seconds: wall time.
    """

    logprob: float
    byte_logprobs: np.ndarray
    dists: np.ndarray | None
    n_bytes: int
    n_trunk: int
    n_branch: int
    n_windows: int
    seconds: float


def _logsumexp_at(k: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """``out[i] = log Σ exp(v[k == i])`` (``-inf`` where nothing lands); ``v`` may be ``(N,)`` or ``(N, C)``."""
    out = np.full((size,) + v.shape[1:], -np.inf)
    if len(k) == 0:
        return out
    np.maximum.at(out, k, v)
    ref = np.where(np.isfinite(out), out, 0.0)
    acc = np.zeros(out.shape)
    with np.errstate(invalid="ignore"):
        np.add.at(acc, k, np.exp(v - ref[k]))
    with np.errstate(divide="ignore"):
        return np.where(acc > 0, ref + np.log(np.where(acc > 0, acc, 1.0)), -np.inf)


class _Items:
    """Deduplicated token paths to evaluate: trunk positions plus branch tokens hanging off them."""

    def __init__(self, trunk: list[int], surfaces):
        self.trunk = trunk  # S = [start] + tokens
        K = len(trunk)
        self.end = [0] * K  # byte offset where each item ends
        for i in range(1, K):
            self.end[i] = self.end[i - 1] + len(surfaces[trunk[i]])
        self.parent = list(range(-1, K - 1))
        self.token = list(trunk)
        self.attach = list(range(K))  # deepest trunk ancestor
        self.depth = [0] * K  # tokens after the attach point
        self.key: dict[tuple[int, int], int] = {}
        self.surfaces = surfaces
        self.jmax = [0] * K
        self.rows: dict[int, set[int]] = {}  # item -> offsets j whose full next-byte masses are needed
        self.want: set[int] = set()
        self.child_tokens: dict[int, set[int]] = {}

    def child(self, item: int, token: int) -> int:
        if item < len(self.trunk) - 1 and self.attach[item] == item and self.trunk[item + 1] == token:
            return item + 1
        got = self.key.get((item, token))
        if got is None:
            got = self.key[(item, token)] = len(self.parent)
            self.parent.append(item)
            self.token.append(token)
            self.end.append(self.end[item] + len(self.surfaces[token]))
            self.attach.append(self.attach[item])
            self.depth.append(self.depth[item] + 1)
            self.jmax.append(0)
        return got

    def path_item(self, tokens: list[int]) -> int:
        item = 0
        for t in tokens:
            item = self.child(item, t)
        return item


def _windows(n_trunk: int, max_length: int, stride: int, branch_count: np.ndarray, cap: int):
    """``(begin, own_start, own_end)`` windows over trunk positions; a window owning too many branch
    tokens is split so that each forward pass stays below ``cap`` tokens."""
    out = []
    own = 0
    while own < n_trunk:
        end = min(n_trunk, own + (max_length if not out else stride))
        while end - own > 1 and branch_count[own:end].sum() + min(end, max_length) > cap:
            end = own + (end - own) // 2
        out.append((max(0, end - max_length), own, end))
        own = end
    return out


@torch.no_grad()
def score(blm, data: bytes, full: bool = False, progress: bool = False, start: int = 0) -> ScoreResult:
    """Byte-level log-probabilities of ``data`` under ``blm`` (a :class:`~surgery.bytelevel.bytelm.ByteLM`).

    Args:
        full: also return the full next-byte distribution after every prefix.
        progress: show a progress bar over the windows.
        start: score only ``data[start:]`` given ``data[:start]`` (a context conditioned on, never
            scored): the numbers are those of the whole text from byte ``start`` on, but no covering
            tree, branch token or next-byte mass is built for a prefix shorter than ``start``; the
            context costs its trunk tokens only.

    Returns:
        A :class:`ScoreResult` over the scored bytes: ``byte_logprobs`` ``(n - start,)`` (``n =
        len(data)``), ``dists`` ``(n - start + 1, 257)`` after the prefixes ``data[:start]`` ..
        ``data[:n]``, ``logprob`` their sum (``log P(data[start:] | data[:start])``).

    Raises:
        ValueError: ``start`` outside ``0..len(data)``.
    """
    t0 = time.time()
    if not 0 <= start <= len(data):
        raise ValueError(f"start={start} outside 0..{len(data)}")
    canonical = blm.mode == "canonical"
    z = blm.stream(data)
    off = blm.offset + start  # first prefix length whose next byte is scored
    n = len(z)
    k_hi = n if full else n - 1  # last prefix length whose next-byte distribution is needed

    starts, splits, segments = _segments(blm, z, off, k_hi, canonical)
    trunk, items, trees = _trees(blm, z, segments, starts, splits, full, canonical)
    stats, child_lp, rows_at, n_windows = _evaluate(blm, z, trunk, items, progress, canonical)
    num, norm, dists = _combine(blm, z, trees, stats, child_lp, rows_at, starts, splits, k_hi, full)
    K, n_items = len(trunk), len(items.parent)
    byte_lp = num[off:n] - norm[off:n]
    if full:
        dists = dists[off:] - norm[off:, None]
    seconds = time.time() - t0
    n_branch = n_items - K
    LOG.info("byte-level scoring: %d bytes, %d trunk tokens, %d branch tokens, %d windows, %.1fs",
             n - off, K - 1, n_branch, n_windows, seconds)
    return ScoreResult(float(byte_lp.sum()), byte_lp, dists, n - off, K - 1, n_branch, n_windows, seconds)


def _segments(blm, z: bytes, off: int, k_hi: int, canonical: bool):
    """Step 1 of :func:`score`: the last piece's start and the split points of every scored prefix, and the
    segments of prefixes sharing a last-piece start (one covering tree each).

    Returns:
        ``(starts, splits, segments)``: per prefix length ``k`` (``0..k_hi``) the start of its last piece and its
        split points; ``segments`` as ``(start, k_first, k_last)``.
    """
    starts = [0] * (k_hi + 1)
    splits = [frozenset()] * (k_hi + 1)
    if canonical:
        if off > 1:  # 0 is a piece boundary of every prefix: jump to the first scored one
            starts[off - 1] = blm.canon.last_piece_start(z[:off - 1], 0)
        for k in range(max(1, off), k_hi + 1):
            starts[k] = blm.canon.last_piece_start(z[:k], starts[k - 1])
            splits[k] = blm.canon.split_points(z[:k], starts[k])
    segments: list[tuple[int, int, int]] = []  # (start, k_first, k_last)
    for k in range(off, k_hi + 1):
        if segments and segments[-1][0] == starts[k]:
            segments[-1] = (starts[k], segments[-1][1], k)
        else:
            segments.append((starts[k], k, k))

    return starts, splits, segments


def _trees(blm, z: bytes, segments, starts, splits, full: bool, canonical: bool):
    """Step 2 of :func:`score`: the trunk (the canonical tokens of ``z`` after the start token), one covering tree
    per segment, and the items (token paths) its nodes map to, with the next-byte rows each item must give.

    Returns:
        ``(trunk, items, trees)``: ``trees`` as ``(tree, node_item, k_first, k_last)``.
    """
    index, surfaces = blm.index, blm.vocab.surfaces
    trunk = [blm.start_id] + blm.canon.encode(z)
    items = _Items(trunk, surfaces)
    trunk_at = {e: i for i, e in enumerate(items.end)}
    trees = []
    for seg_start, k_first, k_last in segments:
        root = trunk_at.get(seg_start)
        if root is None:  # the pieces before `start` are tokenized differently in the whole text
            root = items.path_item(blm.canon.last_piece(z[:k_first], 0)[1])
        sets = set(splits[k_first:k_last + 1])
        ahead, acc = {}, frozenset()
        for k in range(k_last, seg_start, -1):  # split points of the prefixes from k on
            acc = acc | splits[k] if k >= k_first else acc
            ahead[k] = acc
        tree = CoverTree(index, blm.canon if canonical else None, seg_start, blm.max_nodes,
                         splits=frozenset().union(*sets), split_sets=sets, splits_from=ahead)
        tree.extend(z[:k_last])
        # a node ending more than the longest token before the tree's first prefix adds nothing to any of its
        # prefixes (no token reaches past it): such nodes are kept only as ancestors of nodes that do (their rows
        # give the path probabilities), the others are never evaluated (a context before ``start``)
        need = [tree.end[i] + index.max_len >= k_first for i in range(len(tree))]
        need[0] = True
        for i in range(len(tree) - 1, 0, -1):
            if need[i]:
                need[tree.parent[i]] = True
        node_item = [root] + [-1] * (len(tree) - 1)
        for i in range(1, len(tree)):
            if need[i]:
                node_item[i] = items.child(node_item[tree.parent[i]], tree.token[i])
        for i in range(len(tree)):
            it = node_item[i]
            if it < 0:
                continue
            m = tree.end[i]
            items.want.add(it)
            items.jmax[it] = max(items.jmax[it], k_last + 1 - m)
            top = min(k_last, m + index.max_len)
            low = max(m, k_first)  # rows for prefixes k in low..top (none for an ancestor-only node)
            if full:
                items.rows.setdefault(it, set()).update(range(low - m, top - m + 1))
            else:
                rows = [k - m for k in range(low, top + 1) if splits[k]]
                if rows:
                    items.rows.setdefault(it, set()).update(rows)
            if tree.parent[i] >= 0:
                items.child_tokens.setdefault(node_item[tree.parent[i]], set()).add(tree.token[i])
        trees.append((tree, node_item, k_first, k_last))

    return trunk, items, trees


def _evaluate(blm, z: bytes, trunk: list[int], items: _Items, progress: bool, canonical: bool):
    """Step 3 of :func:`score`: windows over the trunk, each branch evaluated with the window that owns its attach
    point; every wanted item's next-token distribution becomes :class:`NodeMasses`.

    Returns:
        ``(stats, child_lp, rows_at, n_windows)``: masses per item, the log-probabilities of each item's child
        tokens, the ``(257,)`` next-byte masses per ``(item, j)``, and the number of windows run.
    """
    index = blm.index
    K = len(trunk)
    n_items = len(items.parent)
    branch_of: dict[int, list[int]] = {}
    for it in range(K, n_items):
        branch_of.setdefault(items.attach[it], []).append(it)
    counts = np.zeros(K, dtype=np.int64)
    for a, its in branch_of.items():
        counts[a] = len(its)
    max_length = blm.max_length
    stride = blm.stride or max(1, max_length // 2)
    stride = min(stride, max_length - 1) if max_length > 1 else 1
    wins = _windows(K, max_length, stride, counts, cap=max(16 * max_length, 8192))
    stats: dict[int, NodeMasses] = {}
    child_lp: dict[int, dict[int, float]] = {}
    rows_at: dict[tuple[int, int], np.ndarray] = {}  # (item, j) -> (257,) next-byte masses
    for begin, own0, own1 in tqdm(wins, desc="byte-level scoring", disable=not progress, leave=False):
        local = {i: i - begin for i in range(begin, own1)}
        branches: list[tuple[int, int]] = []
        T = own1 - begin
        for a in range(own0, own1):
            for it in branch_of.get(a, ()):
                local[it] = T + len(branches)
                branches.append((items.token[it], local[items.parent[it]]))
        todo = [i for i in range(own0, own1) if i in items.want]
        todo += [it for a in range(own0, own1) for it in branch_of.get(a, ()) if it in items.want]
        if not todo:
            continue
        h_trunk, h_branch = forward_window(blm.model, trunk[begin:own1], branches)
        hidden = torch.cat([h_trunk, h_branch])
        del h_trunk, h_branch
        for s in range(0, len(todo), blm.batch_size):
            group = todo[s:s + blm.batch_size]
            rows = torch.tensor([local[i] for i in group], device=hidden.device)
            lp = torch.log_softmax(logits_from_hidden(blm.model, hidden[rows]), dim=-1)
            lp = lp.cpu().numpy()
            for it, row in zip(group, lp):
                m = items.end[it]
                nm = NodeMasses(row, index, z, m, items.jmax[it], blm.canon.banned_at(z, m) if canonical else None)
                stats[it] = nm
                kids = items.child_tokens.get(it, ())
                if kids:
                    child_lp[it] = {t: float(row[t]) for t in kids}
                for j in items.rows.get(it, ()):
                    if j and (j > len(nm.M) or nm.M[j - 1] - nm.E[j - 1] <= 0):
                        continue  # dead there: never asked for
                    row = nm.next_bytes(j)
                    rows_at[(it, j)] = row if j == 0 else np.append(row, 0.0)
                nm.lp = nm.cs = None  # keep only the masses
        del hidden

    return stats, child_lp, rows_at, len(wins)


def _combine(blm, z: bytes, trees, stats, child_lp, rows_at, starts, splits, k_hi: int, full: bool):
    """Step 4 of :func:`score`: per prefix, the log numerator of the actual next byte, the log normalizer and (with
    ``full``) the ``(257,)`` log masses, summed over the live nodes of its covering tree.

    Returns:
        ``(num, norm, dists)``: ``(k_hi + 1,)``, ``(k_hi + 1,)`` and ``(k_hi + 1, 257)`` or None.
    """
    n = len(z)
    num = np.full(k_hi + 1, -np.inf)
    norm = np.full(k_hi + 1, -np.inf)
    dists = np.full((k_hi + 1, 257), -np.inf) if full else None
    for tree, node_item, k_first, k_last in trees:
        logp = [0.0] * len(tree)
        for i in range(1, len(tree)):
            if node_item[i] >= 0:
                logp[i] = logp[tree.parent[i]] + child_lp[node_item[tree.parent[i]]][tree.token[i]]
        kn, vn, kz, vz = [], [], [], []  # numerator / normalizer terms (prefix length, log value)
        dk, dv = [], []  # full rows (prefix length, node weight, item, j)
        special: dict[int, list[int]] = {}  # prefix length with split points -> live nodes
        for i in range(len(tree)):
            if node_item[i] < 0:
                continue  # never evaluated: ends too early to reach the tree's first prefix
            nm = stats[node_item[i]]
            m = tree.end[i]
            used = tree.splits_used[i]
            for k in range(max(m, k_first), min(k_last, m + len(nm.M)) + 1):
                j = k - m
                if j and nm.M[j - 1] - nm.E[j - 1] <= 0:
                    break  # no token continues past z[m:k]
                if used and not all(p in splits[k] for p in used):
                    continue  # node i is not in the tree of prefix z[:k]
                if splits[k]:
                    special.setdefault(k, []).append(i)
                    continue
                if j == 0:
                    if nm.Z0 > 0:
                        kz.append(k)
                        vz.append(logp[i] + math.log(nm.Z0))
                else:
                    kz.append(k)
                    vz.append(logp[i] + math.log(nm.M[j - 1] - nm.E[j - 1]))
                if j < len(nm.M) and nm.M[j] > 0:
                    kn.append(k)
                    vn.append(logp[i] + math.log(nm.M[j]))
                if full:
                    dk.append(k)
                    dv.append((logp[i], node_item[i], j))
        sl, width = slice(k_first, k_last + 1), k_last + 1 - k_first  # terms land on this tree's prefixes only
        num[sl] = _logsumexp_at(np.asarray(kn, dtype=np.int64) - k_first, np.asarray(vn), width)
        norm[sl] = _logsumexp_at(np.asarray(kz, dtype=np.int64) - k_first, np.asarray(vz), width)
        if full and dk:
            kk = np.asarray(dk, dtype=np.int64) - k_first
            with np.errstate(divide="ignore"):
                vals = np.stack([w + np.log(rows_at[(it, j)]) for w, it, j in dv])
            dists[sl] = _logsumexp_at(kk, vals, width)
        for k, nodes in special.items():  # the next byte decides which readings of the split points count
            points = tuple(sorted(splits[k]))
            decisions = blm.canon.split_decisions(z[:k], starts[k], points)
            ref = max(logp[i] for i in nodes)
            acc = np.zeros(257)
            for i in nodes:
                row = rows_at[(node_item[i], k - tree.end[i])]
                acc += math.exp(logp[i] - ref) * row * tree.consistency_mask(i, points, decisions)
            with np.errstate(divide="ignore"):
                norm[k] = ref + math.log(acc.sum())
                if k < n:
                    num[k] = ref + math.log(acc[z[k]]) if acc[z[k]] > 0 else -np.inf
                if full:
                    dists[k] = ref + np.log(acc)
    return num, norm, dists
