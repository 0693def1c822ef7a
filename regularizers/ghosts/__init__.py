"""The Ghosts-of-Softmax step controller (P. Sao, arXiv 2603.13552): the pure softmax radius
rho_a = pi / Delta_a of a proposed update (core.py, forward-mode JVP rules in jvp_rules.py) and
the Lightning callback that keeps every optimizer step within r_max * rho_a (callback.py)."""
from .callback import RadiusControl, batch_inputs
from .core import Radius, directional_logits, logit_spread, radius_from_spread, softmax_radius

__all__ = ["Radius", "RadiusControl", "batch_inputs", "directional_logits", "logit_spread",
           "radius_from_spread", "softmax_radius"]
