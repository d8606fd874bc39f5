"""Row-sparse training of embedding/head rows: only the rows a batch uses move, with a lazy per-row Adam.

A step gathers the trainable rows its batch uses — input rows of its tokens, head rows of its
targets (a tied matrix: their union, one leaf) — trains them through hooks with the full softmax,
and applies :class:`RowAdam` to those rows only; no dense ``(V, d)`` gradient or optimizer pass is
made (SmolLM2 ← Llama-3: 89k of 128k rows are new; a dense step spent most of its time there).
Rows outside the trainable mask never move (bit-exact).
"""

from __future__ import annotations

import numpy as np
import torch

from surgery.errors import SurgeryError


class RowAdam:
    """Adam on the rows of one matrix that a step touched (lazy, per-row step counts).

    The rows of a step are gathered into a small leaf tensor, trained through hooks (see
    :class:`RowHooks`) and written back; the state lives only for trainable rows
    (``slot[row]``), so neither a dense ``(V, d)`` gradient nor an optimizer pass over all
    ``V`` rows is ever made (SmolLM2 ← Llama-3: 89k of 128k rows are new; a dense step spent
    most of its time there).

    Args:
        weight: ``(V, d)`` the matrix (updated in place).
        trainable: ``(V,)`` bool, rows allowed to move.
    """

    def __init__(self, weight: torch.Tensor, trainable: np.ndarray, betas=(0.9, 0.98), eps: float = 1e-8):
        self.weight = weight
        self.trainable = torch.as_tensor(trainable, dtype=torch.bool)
        n = int(self.trainable.sum())
        self.slot = torch.full((weight.shape[0],), -1, dtype=torch.long)
        self.slot[self.trainable] = torch.arange(n)
        self.m = torch.zeros(n, weight.shape[1], dtype=torch.float32, device=weight.device)
        self.v = torch.zeros_like(self.m)
        self.t = torch.zeros(n, dtype=torch.float32, device=weight.device)
        self.betas, self.eps = betas, eps

    def select(self, ids: torch.Tensor) -> torch.Tensor:
        """Distinct trainable rows among ``ids`` (sorted)."""
        u = torch.unique(ids.reshape(-1).cpu())
        return u[self.trainable[u]]

    @torch.no_grad()
    def step(self, rows: torch.Tensor, leaf: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        b1, b2 = self.betas
        s = self.slot[rows].to(self.m.device)
        g = grad.float()
        self.t[s] += 1
        t = self.t[s][:, None]
        m = self.m[s].mul_(b1).add_(g, alpha=1 - b1)
        v = self.v[s].mul_(b2).addcmul_(g, g, value=1 - b2)
        self.m[s], self.v[s] = m, v
        upd = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt_().add_(self.eps))
        self.weight[rows.to(self.weight.device)] = (leaf.detach().float() - lr * upd).to(self.weight.dtype)

    def state_dict(self) -> dict:
        touched = torch.nonzero(self.t > 0).reshape(-1)
        rows = torch.nonzero(self.trainable).reshape(-1)[touched]
        return {"rows": rows, "weight": self.weight.detach()[rows].cpu().clone(), "m": self.m[touched].cpu(),
                "v": self.v[touched].cpu(), "t": self.t[touched].cpu()}

    @torch.no_grad()
    def load_state_dict(self, st: dict) -> None:
        rows = st["rows"]
        if len(rows) and not bool(self.trainable[rows].all()):
            raise SurgeryError("saved heal state trains rows this model keeps frozen",
                               "resume with the same model and row settings")
        s = self.slot[rows]
        self.weight[rows.to(self.weight.device)] = st["weight"].to(self.weight.device, self.weight.dtype)
        self.m[s], self.v[s], self.t[s] = st["m"].to(self.m.device), st["v"].to(self.m.device), st["t"].to(self.m.device)


class RowHooks:
    """Hooks that make the rows of one step trainable without a gradient for the whole matrix.

    Input side: the embedding's output gets ``scale · (leaf − leaf.detach())[map]`` added (zero
    in value, gradient to the leaf; ``scale`` = Gemma's ``embed_scale`` or 1). Output side: the
    head's logits get ``h · (leaf − leaf.detach())ᵀ`` added at the leaf's columns. The frozen
    matrices themselves never require a gradient; without input rows nothing upstream of the
    head does either, so the body runs forward only.
    """

    def __init__(self, emb, head, negatives: int = 0, trainable: torch.Tensor | None = None):
        self.in_map = self.in_table = self.out_cols = self.out_delta = None
        self.negatives, self.trainable = negatives, trainable
        self.neg_rows = self.neg_leaf = None
        self.head_weight = head.weight if head is not None else None
        scale = getattr(emb, "embed_scale", None)
        self.scale = scale if scale is not None else 1.0
        self.handles = [emb.register_forward_hook(self._emb)]
        if head is not None:
            self.handles.append(head.register_forward_hook(self._head))

    def set(self, in_map=None, in_leaf=None, out_cols=None, out_leaf=None):
        self.in_map = in_map
        self.in_table = None if in_leaf is None else torch.cat([torch.zeros_like(in_leaf[:1]), in_leaf - in_leaf.detach()])
        self.out_cols = out_cols
        self.out_delta = None if out_leaf is None else out_leaf - out_leaf.detach()
        self.neg_rows = self.neg_leaf = None

    def _emb(self, mod, args, out):
        if self.in_table is None:
            return out
        s = self.scale.to(out.dtype) if isinstance(self.scale, torch.Tensor) else self.scale
        return out + (torch.nn.functional.embedding(self.in_map, self.in_table) * s).to(out.dtype)

    def _head(self, mod, args, out):
        if self.out_delta is None:
            return out
        h = args[0]
        out = out.index_add(-1, self.out_cols, (h @ self.out_delta.to(h.dtype).T).to(out.dtype))
        if self.negatives and self.trainable is not None:
            # the trainable rows the batch's softmax wrongly favours most (summed probability): they get
            # the push-down of the full softmax gradient too
            with torch.no_grad():
                mass = torch.softmax(out.detach().float().reshape(-1, out.shape[-1]), -1).sum(0)
                ok = self.trainable[: mass.shape[0]].to(mass.device).clone()
                ok[self.out_cols] = False
                mass = torch.where(ok, mass, torch.full_like(mass, -1.0))
                n = min(self.negatives, int(ok.sum()))
                neg = torch.topk(mass, n).indices if n else mass.new_zeros(0, dtype=torch.long)
            if len(neg):
                self.neg_rows = neg
                self.neg_leaf = self.head_weight.detach()[neg].clone().float().requires_grad_(True)
                d = self.neg_leaf - self.neg_leaf.detach()
                out = out.index_add(-1, neg, (h @ d.to(h.dtype).T).to(out.dtype))
        return out

    def remove(self):
        for h in self.handles:
            h.remove()



def row_mask(n_rows: int, frozen: np.ndarray | None) -> np.ndarray:
    """``(n_rows,)`` bool: every row except the ``frozen`` ids."""
    m = np.ones(n_rows, dtype=bool)
    if frozen is not None and len(frozen):
        m[frozen[frozen < n_rows]] = False
    return m


class RowSparse:
    """The row-sparse part of a parameter policy: trainable rows of the embedding and head of ``model``.

    Args:
        model: a causal LM (``get_input_embeddings`` / ``get_output_embeddings``; a shared matrix is one leaf).
        trainable: ``(V,)`` bool, rows allowed to move.
        input_rows: train input rows too (needs a backward pass through the body); False: head rows only.
        negatives: also train the head rows of the N trainable tokens the batch's softmax favours most.
    """

    def __init__(self, model, trainable: np.ndarray, input_rows: bool = True, negatives: int = 0):
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.tied = head is not None and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr())
        self.untied = head is not None and not self.tied
        self.emb, self.head, self.input_rows = emb, head, input_rows
        self.device = emb.weight.device
        self.trainable = trainable
        self.opt_in = RowAdam(emb.weight.data, trainable)
        self.opt_out = RowAdam(head.weight.data, trainable) if self.untied else None
        self.hooks = RowHooks(emb, head, negatives, torch.as_tensor(trainable))
        self._clear()

    def _clear(self):
        self.rows_in = self.rows_out = self.leaf_in = self.leaf_out = None
        self.n_rows = 0

    def prepare(self, batch: torch.Tensor) -> None:
        """Gather the leaves of the rows ``batch (B, L)`` uses and set the hooks (before the forward pass)."""
        opt_in, device = self.opt_in, self.device
        rows_out = opt_in.select(batch[:, 1:]) if self.tied else \
            (self.opt_out.select(batch[:, 1:]) if self.untied else None)
        rows_in = opt_in.select(batch) if self.input_rows else torch.zeros(0, dtype=torch.long)
        if self.tied:
            rows_in = torch.unique(torch.cat([rows_in, rows_out]))
            rows_out = rows_in
        leaf_in = self.emb.weight.detach()[rows_in.to(device)].clone().float().requires_grad_(True) \
            if len(rows_in) else None
        if self.tied:
            leaf_out = leaf_in
        elif self.untied and len(rows_out):
            leaf_out = self.head.weight.detach()[rows_out.to(device)].clone().float().requires_grad_(True)
        else:
            leaf_out = None
        in_map = None
        if leaf_in is not None and self.input_rows:
            lut = torch.zeros(self.emb.weight.shape[0], dtype=torch.long)
            lut[rows_in] = torch.arange(1, len(rows_in) + 1)
            in_map = lut[batch.cpu()].to(device)
        self.hooks.set(in_map, leaf_in if in_map is not None else None,
                       rows_out.to(device) if leaf_out is not None else None, leaf_out)
        self.rows_in, self.rows_out, self.leaf_in, self.leaf_out = rows_in, rows_out, leaf_in, leaf_out

    def leaves(self) -> list[torch.Tensor]:
        """The distinct leaf tensors of this step (after the forward pass: the negatives' leaf too)."""
        xs = (self.leaf_in, self.leaf_out, self.hooks.neg_leaf)
        return list({id(x): x for x in xs if x is not None}.values())

    def step(self, lr: float) -> None:
        """Apply the per-row Adam to this step's rows (after backward and clipping), then clear the hooks."""
        leaf_in, leaf_out = self.leaf_in, self.leaf_out
        neg_rows, neg_leaf = self.hooks.neg_rows, self.hooks.neg_leaf
        if leaf_in is not None and leaf_in.grad is not None:
            self.opt_in.step(self.rows_in, leaf_in, leaf_in.grad, lr)
        if not self.tied and leaf_out is not None and leaf_out.grad is not None:
            self.opt_out.step(self.rows_out, leaf_out, leaf_out.grad, lr)
        if neg_leaf is not None and neg_leaf.grad is not None:
            (self.opt_in if self.tied else self.opt_out).step(neg_rows.cpu(), neg_leaf, neg_leaf.grad, lr)
        self.n_rows = int(len(self.rows_in) + (len(self.rows_out) if self.untied and self.rows_out is not None else 0)
                          + (len(neg_rows) if neg_rows is not None else 0))
        self.hooks.set()
        self.rows_in = self.rows_out = self.leaf_in = self.leaf_out = None

    @property
    def rows_trained(self) -> int:
        n = int((self.opt_in.t > 0).sum())
        return n + int((self.opt_out.t > 0).sum()) if self.opt_out is not None else n

    def state_dict(self) -> dict:
        return {"rows_in": self.opt_in.state_dict(),
                "rows_out": self.opt_out.state_dict() if self.opt_out is not None else None}

    def load_state_dict(self, st: dict) -> None:
        if (st["rows_out"] is not None) != (self.opt_out is not None):
            raise SurgeryError("saved state has a different head (tied/untied) than this model",
                               "resume with the same model")
        self.opt_in.load_state_dict(st["rows_in"])
        if self.opt_out is not None:
            self.opt_out.load_state_dict(st["rows_out"])

    def remove(self) -> None:
        self.hooks.remove()
