"""NorMuon (Li et al. 2025, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491):
Muon's orthogonalized update, then a neuron-wise adaptive step.

With ``O`` the Newton-Schulz output of the Nesterov momentum of a hidden matrix, rows = output
neurons (the layer's ``(fan_out, fan_in)`` map, whichever way it is stored):

    v <- beta2 * v + (1 - beta2) * mean_j(O_ij^2)          (one entry per output neuron i)
    N  = O / (sqrt(v) + eps)
    U  = N * ||O||_F / ||N||_F                               (Frobenius norm of O kept)
    W <- W - lr * s * U                                      (Muon's scale s, decoupled decay)

Orthogonalization equalizes singular values but not row norms; the second moment evens out the
per-neuron step sizes, and the Frobenius rescale keeps Muon's update size, so Muon's lr carries
over. This is microsoft/dion's ``dion/normuon.py`` (``_normuon_normalization_core``: fp32
normalization, lerp EMA, eps 1e-8 after the square root, rescale with the new norm clamped at
1e-8), with v zero-initialized and no bias correction as there.

Layouts: a ``Conv1D`` weight (stored ``(fan_in, fan_out)``) takes the mean over its rows (dim 0),
so v holds one entry per output neuron (a column of the storage); an expert stack
``(E, fan_out, fan_in)`` has one v row per expert neuron and one Frobenius rescale per expert;
conv filters ``(out, in, *k)`` average over everything but ``out``. Under FSDP2 rows are sharded,
so v (sharded like the weight) and the row means are local and the norms are DTensor reductions.
"""
from __future__ import annotations

import torch

from .muon import Muon
from .registry import register


class NorMuon(Muon):
    """Muon + neuron-wise second-moment normalization (``beta2``, ``normuon_eps``) of the update.

    ``beta2`` in [0, 1): EMA factor of v (dion's default 0.95); ``normuon_eps``: added to
    ``sqrt(v)``. Other options are :class:`Muon`'s (``betas``/``eps`` are the AdamW groups').
    """

    def __init__(self, params, lr: float = 0.02, beta2: float = 0.95, normuon_eps: float = 1e-8,
                 **kw):
        if isinstance(beta2, bool) or not isinstance(beta2, (int, float)) or not 0 <= beta2 < 1:
            raise ValueError(f"NorMuon beta2 must be in [0, 1) (the EMA factor of the per-neuron "
                             f"second moment, e.g. 0.95), got {beta2!r}")
        if not normuon_eps > 0:
            raise ValueError(f"normuon_eps must be > 0, got {normuon_eps!r}")
        self._normuon_defaults = dict(beta2=float(beta2), normuon_eps=float(normuon_eps))
        super().__init__(params, lr=lr, **kw)

    def add_param_group(self, param_group: dict) -> None:
        for k, v in getattr(self, "_normuon_defaults", {}).items():
            param_group.setdefault(k, v)
        super().add_param_group(param_group)

    def _reduce_dims(self, p: torch.Tensor) -> tuple[int, ...]:
        """Dims of ``p`` averaged for one neuron's second moment (all but output and expert)."""
        if id(p) in self._transposed:
            return (0,)
        if self.is_stacked(p):
            return (-1,)
        return tuple(range(1, p.ndim))

    def _frobenius_dims(self, p: torch.Tensor) -> tuple[int, ...] | None:
        return (-2, -1) if self.is_stacked(p) else tuple(range(p.ndim))

    def initial_state(self, group: dict, p: torch.Tensor) -> dict:
        st = super().initial_state(group, p)
        if group["use_muon"]:
            st["neuron_second_moment"] = torch.zeros_like(
                p.float().mean(dim=self._reduce_dims(p), keepdim=True))
        return st

    def normalize(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """The NorMuon update ``U`` of direction ``d`` (updates v in the state)."""
        st = self.state[p]
        if "neuron_second_moment" not in st:
            st["neuron_second_moment"] = self.initial_state(group, p)["neuron_second_moment"]
        v = st["neuron_second_moment"]
        o = d.float()
        fro, rows = self._frobenius_dims(p), self._reduce_dims(p)
        # One pass over the update for the row sums of squares; both Frobenius norms follow
        # from them (||N||^2 = sum_i r_i^2 rowsum_i), so N is never materialized.
        rowsum = o.square().sum(dim=rows, keepdim=True)
        v.lerp_(rowsum / (o.numel() // rowsum.numel()), 1 - group["beta2"])
        r = 1 / (v.sqrt() + group["normuon_eps"])
        norm_o = rowsum.sum(dim=fro, keepdim=True).sqrt()
        norm_n = (r.square() * rowsum).sum(dim=fro, keepdim=True).sqrt().clamp_min(1e-8)
        return o * (r * (norm_o / norm_n))

    def apply_update(self, group: dict, p: torch.Tensor, d: torch.Tensor) -> None:
        super().apply_update(group, p, self.normalize(group, p, d))


register("normuon", NorMuon, lr=0.02,
         description="NorMuon (Li et al. 2025): Muon's orthogonalized update with a per-neuron "
                     "second-moment normalization (beta2), Frobenius norm kept; lr as Muon")
