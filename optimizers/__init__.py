"""Optimizers as plug-ins: a registry, a param-group factory and schedules. Pure torch."""
from .registry import (OPTIMIZERS, OptimizerRecord, check_optimizer_options, default_lr,
                       describe_optimizers, model_optimizers, optimizer_defaults, register)
from .factory import build_optimizer, classify_parameters, param_groups
from .schedules import lr_factor, warmup_decay
from .muon import Muon
from .normuon import NorMuon
from .hyperp import HyperSphere
from .muonpp import MuonPlusPlus
from .auon import AuON, HybridAuON
from .rco import RCO, budget_normal, gumbel_straight_through, retract_, tangent_project
from .rco_dp import budget_dp
from .weight_decay_rules import apply_weight_decay_rule, tau_from_weight_decay, weight_decay_from_tau

__all__ = ["OPTIMIZERS", "OptimizerRecord", "build_optimizer", "check_optimizer_options",
           "classify_parameters", "default_lr", "describe_optimizers", "model_optimizers",
           "optimizer_defaults", "param_groups", "register", "lr_factor", "warmup_decay", "Muon", "NorMuon",
           "HyperSphere", "MuonPlusPlus", "AuON", "HybridAuON", "RCO", "budget_normal",
           "gumbel_straight_through", "retract_", "tangent_project", "budget_dp",
           "apply_weight_decay_rule", "tau_from_weight_decay", "weight_decay_from_tau"]
