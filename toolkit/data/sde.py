"""Snapshots of a population moved by a known SDE (the rotating limit cycle of
``regularizers.dp_trajectories.core.simulate``), for the private-trajectory recipe.

Observed times give ``people_per_time`` points each: independent people per time
(``adjacency="point"``, the paper's one point per person) or the same people followed through
every observed time (``"trajectory"``). ``truth`` holds 500 fresh samples at every time,
observed and held out, for the W2 evaluation. Batches are step indices (the module holds the
snapshots; one training step is one full-batch MFLD step).
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from regularizers.dp_trajectories import simulate


class SDESnapshots(L.LightningDataModule):
    def __init__(self, people_per_time: int = 2000, n_times: int = 9, t_end: float = 2.0,
                 observe_every: int = 2, adjacency: str = "point", n_eval: int = 500, seed: int = 0):
        super().__init__()
        if adjacency not in ("point", "trajectory"):
            raise ValueError(f"adjacency={adjacency!r}: choose 'point' (one point per person) or "
                             f"'trajectory' (each person's whole path)")
        if n_times < 3 or observe_every < 1:
            raise ValueError("need n_times >= 3 and observe_every >= 1 (times 0, k, 2k, ... observed)")
        self.save_hyperparameters()
        self.times = np.linspace(0.0, t_end, n_times)
        self.observed = list(range(0, n_times, observe_every))
        self.held_out = [s for s in range(n_times) if s not in self.observed]
        self.adjacency = adjacency
        n, obs = people_per_time, self.observed
        if adjacency == "point":
            paths = self.simulate(n * len(obs), self.times, seed)
            self.snapshots = {s: torch.tensor(paths[i * n:(i + 1) * n, s]) for i, s in enumerate(obs)}
        else:
            paths = self.simulate(n, self.times, seed)
            self.snapshots = {s: torch.tensor(paths[:, s]) for s in obs}
        self.people = n * (len(obs) if adjacency == "point" else 1)
        self.truth = self.simulate(n_eval, self.times, seed + 10_000)

    def simulate(self, n: int, times: np.ndarray, seed: int) -> np.ndarray:
        """n paths of the population at ``times``: (n, len(times), 2); subclasses swap the SDE."""
        return simulate(n, times, seed)

    def train_dataloader(self):
        return DataLoader(torch.arange(1_000_000), batch_size=1)

    def val_dataloader(self):
        return DataLoader(torch.zeros(1), batch_size=1)
