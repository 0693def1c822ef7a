"""One parameter's per-example gradients, kept in the cheapest exact form.

Every form gives the squared per-example norms (for clipping) and the weighted sum
sum_i c_i g_i (the clipped sum) without storing B copies of the parameter unless that
is the cheaper way. Arithmetic is fp32 or wider whatever the trainer's precision: the
samplers widen activations and output gradients before building a piece, so the norms
that decide clipping and the sum that is released are computed from the same values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 unless it is already fp32/fp64 (bf16 sums drift past C)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rows_norm2(t: torch.Tensor) -> torch.Tensor:
    """Squared norm of each row of ``t`` (B, ...) in one pass."""
    return torch.linalg.vector_norm(t.reshape(len(t), -1), dim=1).square()


class Piece:
    def norm2(self) -> torch.Tensor:  # (B,) squared per-example norms
        raise NotImplementedError

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:  # sum_i c_i g_i
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:  # (B, *param.shape)
        raise NotImplementedError

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Zero the examples not in ``keep`` (B,) in place of what the piece stores, so a
        non-finite example adds exactly 0 to the clipped sum (0 * inf would be NaN)."""
        raise NotImplementedError


def _keep(t: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor | None:
    if t is None:
        return None
    return torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, torch.zeros((), dtype=t.dtype,
                                                                            device=t.device))


@dataclass
class Dense(Piece):
    gs: torch.Tensor

    def __post_init__(self):
        self.gs = wide(self.gs)

    def norm2(self):
        return _rows_norm2(self.gs)

    def weighted_sum(self, c):
        return torch.tensordot(c.to(self.gs.dtype), self.gs, dims=1)

    def materialize(self):
        return self.gs

    def keep_rows(self, keep):
        self.gs = _keep(self.gs, keep)


@dataclass
class LinearLike(Piece):
    """Weight gradient G_i^T A_i with A: (B, T, d), G: (B, T, p), viewed as ``shape``.

    The norm is the ghost norm ||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T> (Goodfellow
    2015; Li et al. 2022) when T (d + p) < d p, else the materialized gradient's; the sum
    is ONE matmul (c * G)^T A over all B*T rows ("book-keeping", Bu et al. 2023).
    ``transposed`` views the result as (d, p), for HF ``Conv1D`` whose weight is (in, out).
    """
    A: torch.Tensor
    G: torch.Tensor
    shape: torch.Size
    transposed: bool = False

    keep: bool = False  # keep A and G after materializing (a Tied piece needs them)

    def __post_init__(self):
        self.A, self.G = wide(self.A), wide(self.G)
        if self.A.dtype != self.G.dtype:
            self.A = self.A.to(self.G.dtype)
        self._gs = None

    def settle(self) -> None:
        """Materialize now if that is the chosen form (no larger than A and G), dropping
        A and G; called as the backward passes the layer."""
        B, T, d = self.A.shape
        p = self.G.shape[-1]
        if T > 1 and T * (d + p) >= d * p and not self.keep:
            self._gs = self.materialize()
            self.A = self.G = None

    def norm2(self):
        if self._gs is not None:
            return _rows_norm2(self._gs)
        B, T, d = self.A.shape
        p = self.G.shape[-1]
        if T == 1:
            return self.A.square().sum((1, 2)) * self.G.square().sum((1, 2))
        if T * (d + p) < d * p:  # (B, p, d) would outweigh A and G: ghost norm
            return (torch.bmm(self.A, self.A.transpose(1, 2))
                    * torch.bmm(self.G, self.G.transpose(1, 2))).sum((1, 2))
        # (B, p, d) is no larger than A and G: materialize once, and the clipped sum is
        # then a (B,) x (B, p, d) contraction instead of a second (B T)-row matmul
        self._gs = self.materialize()
        if not self.keep:
            self.A = self.G = None
        return _rows_norm2(self._gs)

    def weighted_sum(self, c):
        if self._gs is not None:
            return torch.tensordot(c.to(self._gs.dtype), self._gs, dims=1)
        p, d = self.G.shape[-1], self.A.shape[-1]
        c = c.to(self.G.dtype)[:, None, None]
        G, A = (self.G * c, self.A) if p <= d else (self.G, self.A * c)  # scale the smaller
        G, A = G.reshape(-1, p), A.reshape(-1, d)
        return (A.T @ G if self.transposed else G.T @ A).reshape(self.shape)

    def keep_rows(self, keep):
        self.A, self.G, self._gs = _keep(self.A, keep), _keep(self.G, keep), _keep(self._gs, keep)

    def materialize(self):
        if self._gs is not None:
            return self._gs
        if self.transposed:
            return torch.bmm(self.A.transpose(1, 2), self.G).reshape(-1, *self.shape)
        return torch.bmm(self.G.transpose(1, 2), self.A).reshape(-1, *self.shape)


@dataclass
class EmbeddingRows(Piece):
    """Rows idx of the table receive G: norm sum_{t,s} [x_t = x_s] <G_t, G_s>."""
    idx: torch.Tensor  # (B, T) token ids
    G: torch.Tensor    # (B, T, p)
    num_embeddings: int

    def __post_init__(self):
        self.G = wide(self.G)

    def norm2(self):
        if self.idx.shape[1] == 1:
            return self.G.square().sum((1, 2))
        same = (self.idx[:, :, None] == self.idx[:, None, :]).to(self.G.dtype)
        return (torch.bmm(self.G, self.G.transpose(1, 2)) * same).sum((1, 2))

    def weighted_sum(self, c):
        p = self.G.shape[-1]
        out = self.G.new_zeros(self.num_embeddings, p)
        return out.index_add_(0, self.idx.reshape(-1),
                              (self.G * c.to(self.G.dtype)[:, None, None]).reshape(-1, p))

    def keep_rows(self, keep):
        self.G = _keep(self.G, keep)

    def materialize(self):
        B, T, p = self.G.shape
        out = self.G.new_zeros(B, self.num_embeddings, p)
        return out.scatter_add_(1, self.idx[:, :, None].expand(B, T, p), self.G)


@dataclass
class Scaled(Piece):
    """``s`` times a piece: the loss's mean over the batch undone (s = B) without a pass
    over every output gradient."""
    piece: Piece
    s: float

    def norm2(self):
        return self.piece.norm2() * self.s ** 2

    def weighted_sum(self, c):
        return self.piece.weighted_sum(c * self.s)

    def materialize(self):
        return self.piece.materialize() * self.s

    def keep_rows(self, keep):
        self.piece.keep_rows(keep)


def _has_cross(a: Piece, b: Piece) -> bool:
    kinds = {type(a), type(b)}
    return kinds == {EmbeddingRows, LinearLike} and not getattr(a, "transposed", False) \
        and not getattr(b, "transposed", False)


def _cross(a: Piece, b: Piece) -> torch.Tensor | None:
    """Per-example <g_a, g_b> without materializing, where a closed form exists: a table
    used as an Embedding (rows x_t get G_t) and as a Linear head (G'^T A, weight tying):
    <g_e, g_l> = sum_t <G_t, g_l[x_t]> = sum_{s,t} G'[s, x_t] (A_s . G_t)."""
    if not _has_cross(a, b):
        return None
    if isinstance(a, LinearLike):
        a, b = b, a
    B, S, T = b.A.shape[0], b.A.shape[1], a.idx.shape[1]
    M = torch.bmm(b.A, a.G.transpose(1, 2))                                  # (B, S, T)
    H = b.G.gather(2, a.idx[:, None, :].expand(B, S, T))                     # G'[s, x_t]
    return (M * H).sum((1, 2))


@dataclass
class Tied(Piece):
    """One parameter used by modules of different kinds: norms by the cross terms."""
    parts: list

    def __post_init__(self):
        for q in self.parts:
            q.keep = True

    def norm2(self):
        n2 = sum(q.norm2() for q in self.parts)
        for i, a in enumerate(self.parts):
            for b in self.parts[i + 1:]:
                n2 = n2 + 2 * _cross(a, b)
        return n2

    def weighted_sum(self, c):
        return sum(q.weighted_sum(c) for q in self.parts)

    def materialize(self):
        return sum(q.materialize() for q in self.parts)

    def keep_rows(self, keep):
        for q in self.parts:
            q.keep_rows(keep)


def combine(pieces: list[Piece]) -> Piece:
    """One parameter's pieces from several calls (weight tying, recurrence) as one piece:
    per-example gradients add. Linear-like calls concatenate along T, and so do Embedding
    calls; a table tied to a Linear head keeps both forms (:class:`Tied`)."""
    if len(pieces) == 1:
        return pieces[0]
    groups: list[Piece] = []
    def open_(q):  # a linear-like piece still holding A and G
        return isinstance(q, LinearLike) and q._gs is None
    for kind in (True, False):
        lin = [q for q in pieces if open_(q) and q.transposed is kind]
        if lin:
            groups.append(LinearLike(torch.cat([q.A for q in lin], 1),
                                     torch.cat([q.G for q in lin], 1), lin[0].shape, kind))
    emb = [q for q in pieces if isinstance(q, EmbeddingRows)]
    if emb:
        groups.append(EmbeddingRows(torch.cat([q.idx for q in emb], 1),
                                    torch.cat([q.G for q in emb], 1), emb[0].num_embeddings))
    rest = [q for q in pieces if not (open_(q) or isinstance(q, EmbeddingRows))]
    if len(groups) == 1 and not rest:
        return groups[0]
    if not rest and all(_has_cross(a, b) for i, a in enumerate(groups)
                        for b in groups[i + 1:]):
        return Tied(groups)
    return Dense(sum(q.materialize() for q in pieces))
