"""Monitor overhead: training with all three monitors at every_n_steps=50 vs without."""
from __future__ import annotations

import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from scripts.harness import Bench, case


class _StepTimes(L.Callback):
    """Wall time of each training batch, keyed by the step it started at."""

    def __init__(self):
        self.times, self._t = {}, None

    def on_train_batch_start(self, trainer, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times[trainer.global_step - 1] = time.perf_counter() - self._t


def _fit(steps: int, size: dict, dm, monitors: bool, root: str, extra_cbs=()) -> None:
    from toolkit import LanguageModel
    from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

    torch.manual_seed(0)
    model = LanguageModel(**size, lr=1e-2, warmup_steps=10)
    # The end-of-fit emergence fit and plots are a one-off cost, timed apart below.
    # probe="fixed" as in the recipe: the costlier setting (one extra forward per logging step)
    cbs = [MassiveActivationMonitor(every_n_steps=50, fit=False, plots=False, out_dir=root,
                                    probe="fixed"),
           StabilityMonitor(every_n_steps=50), SpectralMonitor(every_n_steps=50)] if monitors else []
    cbs += list(extra_cbs)
    L.Trainer(max_steps=steps, callbacks=cbs, logger=TensorBoardLogger(root, name="bench"),
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, accelerator="cpu").fit(model, dm)


def _end_of_fit_cost(n_layer: int, n_points: int = 60) -> float:
    """Seconds for the per-layer emergence fits + plots of a recipe-sized history."""
    import numpy as np
    import matplotlib.pyplot as plt
    from toolkit.monitors.emergence import emergence_law, fit_history, plot_history

    t = np.arange(n_points) * 50
    rows = [dict(step=int(s), layer=i, ratio=float(r), top1=0.0, token=0, dim=0, massive=0)
            for i in range(n_layer)
            for s, r in zip(t, emergence_law(t, 10.0 * (i + 1), 0.1, 0.003, 1.0, 3.0))]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for fig in plot_history(rows, fit_history(rows), d).values():
            plt.close(fig)
    return round(time.perf_counter() - t0, 3)


def _in_run_ratio(steps: int, size: dict, dm, root: str) -> float:
    """Overhead from one monitored run: extra time of the measured batches over the median
    batch, relative to the whole run. Immune to load drift between runs on a shared machine."""
    import statistics
    timer = _StepTimes()
    _fit(steps, size, dm, True, root, [timer])
    t = timer.times
    plain = statistics.median(v for s, v in t.items() if s % 50)
    extra = sum(v - plain for s, v in t.items() if s % 50 == 0)
    return round(1 + extra / sum(t.values()), 4)


@case("monitor-overhead", target=1.03)
def monitor_overhead(quick: bool) -> Bench:
    """GPT training with Massive+Stability+Spectral monitors every 50 steps vs none."""
    from toolkit import TextDataModule

    size = dict(block_size=64, n_layer=3 if quick else 6, n_head=4, n_embd=32 if quick else 64)
    steps = 100 if quick else 300
    dm = TextDataModule(block_size=64, batch_size=32, val_blocks=8)
    root = tempfile.mkdtemp(prefix="bench_monitors_")
    return Bench({"monitors@50": lambda: _fit(steps, size, dm, True, root),
                  "no-monitors": lambda: _fit(steps, size, dm, False, root)},
                 extra={"model": f"{size['n_layer']}x{size['n_embd']} GPT, T=64, B=32",
                        "steps": steps, "measured steps": len(range(0, steps, 50)),
                        "end-of-fit fit+plots (s, one-off)": _end_of_fit_cost(size["n_layer"]),
                        "in-run ratio (measured vs median batch)":
                            _in_run_ratio(steps, size, dm, root)})
