"""Differentially private Wasserstein barycenters (Gu, Kunapuli, Bun, Chien & Greenewald, arXiv
2510.03021): output perturbation and private coresets over POT's exact free-support barycenter,
accounted by the DP-SGD accountant (``regularizers.dp.accounting``)."""
from .core import DPBarycenter, barycenter, barycenter_cost, dp_barycenter

__all__ = ["DPBarycenter", "barycenter", "barycenter_cost", "dp_barycenter"]
