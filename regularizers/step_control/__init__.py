"""Step controls: callbacks that act on the optimizer step itself rather than on the loss or
the batch. Each is a :class:`~regularizers.step_hooks.StepHookCallback` (torch's optimizer
step pre/post hooks, so it holds for any optimizer and schedule, its step counter kept in
checkpoints):

- :class:`RadiusControl` (P. Sao, "Ghosts of Softmax", arXiv 2603.13552; ``regularizers.ghosts``)
  measures the softmax convergence radius of the proposed step after it is taken and shortens
  it to ``r_max * rho_a``: a replacement for gradient clipping that leaves the optimizer, its
  state and its lr schedule untouched.
- :class:`LRSpike` (the same paper's stress test) multiplies every group's lr by ``factor`` for
  a few steps and puts it back after each, so the schedule is unaffected outside the spike.

- :class:`QKClip` (Kimi K2's MuonClip, arXiv 2507.20534; ``regularizers.qk_clip``) rescales
  the query and key rows of every attention head whose max pre-softmax logit passed ``tau``.

A new step control subclasses ``StepHookCallback``, defines ``before_step``
and/or ``after_step`` and is exported here and from ``regularizers``. The old import paths
(``regularizers.LRSpike``, ``regularizers.lr_spike``, ``regularizers.RadiusControl``) keep
working.
"""
from ..ghosts import RadiusControl
from ..step_hooks import StepHookCallback
from ..qk_clip import QKClip
from .lr_spike import LRSpike

__all__ = ["LRSpike", "QKClip", "RadiusControl", "StepHookCallback"]
