"""``LangevinNoise``: a callback adding Langevin noise after every optimizer step (core.py)."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import WeightAveraging

from toolkit.seeding import generator, global_seed
from ..step_hooks import StepHookCallback
from .core import add_langevin_noise_, add_sphere_noise_

MANIFOLDS = ("euclidean", "sphere")


class LangevinNoise(StepHookCallback):
    """After each optimizer step add sqrt(2 * lr * T) * xi to the parameters, with the lr each
    param group had for that step (a post-step hook on the optimizer, so it holds for any
    optimizer, lr schedule and for manual optimization; steps skipped by AMP add no noise).

    The noise of step t is drawn from a generator seeded with (seed, t): it is the same on
    every DDP rank (replicas stay identical), reproducible from the seed (None: the
    ``seed_everything`` seed), and the step counter in ``state_dict`` makes a resumed run
    continue the same noise sequence.

    Iterate averaging: add Lightning's weight averaging callback beside this one, e.g.
    ``lightning.pytorch.callbacks.WeightAveraging`` (equal-weight average of all iterates,
    swapped in for validation/test and copied into the model at fit end), or
    :class:`IterateAveraging` below to start averaging after a burn-in.

    ``manifold="sphere"``: each parameter stays on the sphere of its norm, as in spherical
    Langevin dynamics (Wei, Damian & Lee, arXiv 2603.06028): the noise is drawn in the
    tangent space and the parameter is retracted back to its norm (``add_sphere_noise_``).
    """

    def __init__(self, temperature: float = 1e-6, seed: int | None = None,
                 manifold: str = "euclidean"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature={temperature} must be > 0 (T = 1/beta, the Gibbs "
                             "measure exp(-L/T)); for plain SGD drop the LangevinNoise callback, "
                             "keeping IterateAveraging for SGD + averaging")
        if manifold not in MANIFOLDS:
            raise ValueError(f"manifold={manifold!r}: choose one of {MANIFOLDS}")
        self.temperature, self.seed, self.manifold = temperature, seed, manifold

    def on_fit_start(self, trainer, pl_module) -> None:
        self._seed = global_seed(self.seed)
        super().on_fit_start(trainer, pl_module)

    def after_step(self, optimizer) -> None:
        device = next(p.device for g in optimizer.param_groups for p in g["params"])
        gen = generator(self._seed, self.steps, device=device)
        add = add_sphere_noise_ if self.manifold == "sphere" else add_langevin_noise_
        add(optimizer.param_groups, self.temperature, gen)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "temperature": self.temperature, "manifold": self.manifold}


class IterateAveraging(WeightAveraging):
    """Lightning's ``WeightAveraging`` (equal weights, SWA-style) started after ``start_step``
    optimizer steps, so the burn-in of a Langevin run is left out of the average."""

    def __init__(self, start_step: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.start_step = start_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step
