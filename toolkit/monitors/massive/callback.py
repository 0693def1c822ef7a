"""``MassiveActivationMonitor``: :mod:`.core` on logging steps, and the emergence-law fit of
Gallego-Feliciano et al. (2025) per layer at the end of fit (:mod:`toolkit.monitors.emergence`).
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from ..base import StepMonitor, log_metrics
from ..layers import resolve_layers
from .core import ABS_THRESHOLD, RATIO_THRESHOLD, MassiveProbe, write_history


class MassiveActivationMonitor(StepMonitor):
    """Logs, per block, the ratio top-1/median |a| and the top-1 |a| every ``every_n_steps``
    (``massive/ratio/layer{i}``, ``massive/top1/layer{i}``). Keeps the history in its checkpoint state, writes it as
    ``massive_activations.csv`` (after every logging step) and, at the end of fit, fits the emergence law of
    Gallego-Feliciano et al. (2025) per layer (:mod:`toolkit.monitors.emergence`) with plots.
    Each fit reports its prediction at ``fit_kwargs["horizon"]`` (default 3) x the last step
    with a bootstrap interval, and whether the window identifies it: the table flags
    ``NOT IDENTIFIABLE`` layers, the plot greys their prediction, and TensorBoard gets
    ``massive/fit_identifiable/layer{i}`` (0/1) and ``massive/fit_prediction{,_lo,_hi}/layer{i}``.

    ``probe="train"`` measures the training forward of the logging step (no extra compute;
    the batch changes every time). ``probe="fixed"`` measures, after the logging step's
    update, one eval-mode forward of the first training batch the monitor saw, the same
    input at every step as Gallego-Feliciano et al. do with their fixed prompts, so the
    curve's noise is the model's, not the batch's (one extra forward per logging step;
    the module must define ``forward``; the batch is kept in the checkpoint state).
    ``out_dir`` defaults to the logger's run folder.
    """

    def __init__(self, every_n_steps: int = 50, layers: str | list[str] = "auto", top_k: int = 5,
                 abs_threshold: float = ABS_THRESHOLD, ratio_threshold: float = RATIO_THRESHOLD,
                 fit: bool = True, plots: bool = True, out_dir: str | None = None,
                 probe: str = "train", fit_kwargs: dict | None = None):
        super().__init__(every_n_steps)
        if probe not in ("train", "fixed"):
            raise ValueError(f"probe={probe!r}: use 'train' (the logging step's training "
                             "forward) or 'fixed' (the same batch at every logging step)")
        self.layers_arg, self.fit, self.plots, self.out_dir = layers, fit, plots, out_dir
        self.probe, self.fit_kwargs = probe, dict(fit_kwargs or {})
        self.fixed_batch = None
        self.stats_kw = dict(top_k=top_k, abs_threshold=abs_threshold,
                             ratio_threshold=ratio_threshold)
        self.history: list[dict] = []
        self.fits: dict[int, dict] = {}
        self._probe: MassiveProbe | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        # Not in setup: LightningModules may build their model later, in configure_model.
        self._probe = MassiveProbe(resolve_layers(pl_module, self.layers_arg), **self.stats_kw)
        if self.probe == "fixed" and type(pl_module).forward is L.LightningModule.forward:
            raise TypeError(f"MassiveActivationMonitor(probe='fixed') runs the module on its "
                            f"saved batch, but {type(pl_module).__name__} defines no forward(): "
                            "add one, or use probe='train'")

    def start(self, trainer, pl_module, batch) -> None:
        if self.probe == "train":
            self._probe.attach(self.hooks)
        elif self.fixed_batch is None:
            self.fixed_batch = _detached_cpu(batch)

    def finish(self, trainer, pl_module, step: int) -> None:
        if self.probe == "fixed":
            from lightning.fabric.utilities.apply_func import move_data_to_device
            self._probe.run(pl_module, move_data_to_device(self.fixed_batch, pl_module.device))
        metrics = {}
        for i, s in sorted(self._probe.stats.items()):
            self.history.append({"step": step, "layer": i, "name": self._probe.layers[i].name,
                                 "top1": s.top1, "median": s.median, "ratio": s.ratio,
                                 "batch": s.batch, "token": s.token, "dim": s.dim,
                                 "massive": int(s.massive)})
            metrics[f"massive/ratio/layer{i}"] = s.ratio
            metrics[f"massive/top1/layer{i}"] = s.top1
        if metrics:
            metrics["massive/ratio/max"] = max(v for k, v in metrics.items() if "/ratio/" in k)
            log_metrics(trainer, metrics, step)
        if trainer.is_global_zero:  # rewritten each time (small) so a cut run leaves its CSV
            self.folder(trainer).mkdir(parents=True, exist_ok=True)
            write_history(self.history, self.folder(trainer) / "massive_activations.csv")

    def state_dict(self) -> dict:
        return {"history": list(self.history), "measured_step": self._measured_step,
                "fixed_batch": self.fixed_batch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])
        self._measured_step = state_dict.get("measured_step", -1)
        self.fixed_batch = state_dict.get("fixed_batch")

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.out_dir or trainer.log_dir or trainer.default_root_dir)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        folder = self.folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        path = write_history(self.history, folder / "massive_activations.csv")
        if not self.fit:
            return
        from ..emergence import fit_history, plot_history, summary_table
        fits = fit_history(self.history, **self.fit_kwargs)
        self.fits = {i: f.to_dict() for i, f in fits.items()}
        (folder / "massive_fit.json").write_text(json.dumps(
            {str(i): f for i, f in self.fits.items()}, indent=2))
        last = self.history[-1]["step"]
        metrics = {}
        for i, f in fits.items():
            metrics[f"massive/fit_r2/layer{i}"] = f.r2
            metrics[f"massive/fit_identifiable/layer{i}"] = float(f.identifiable)
            metrics[f"massive/fit_prediction/layer{i}"] = float(f(f.horizon * f.t_max))
            if "horizon" in f.intervals:
                lo, hi = f.intervals["horizon"]
                metrics[f"massive/fit_prediction_lo/layer{i}"] = lo
                metrics[f"massive/fit_prediction_hi/layer{i}"] = hi
        log_metrics(trainer, {k: v for k, v in metrics.items() if v == v}, last)
        print(f"massive activations: history in {path}\n{summary_table(self.history, fits)}",
              flush=True)
        if self.plots:
            figs = plot_history(self.history, fits, folder)
            for logger in trainer.loggers:  # TensorBoard gets the figures too
                add = getattr(getattr(logger, "experiment", None), "add_figure", None)
                if add is not None:
                    for name, fig in figs.items():
                        add(f"massive/{name}", fig, global_step=last, close=False)
            import matplotlib.pyplot as plt
            for fig in figs.values():
                plt.close(fig)


def _detached_cpu(batch):
    from lightning.fabric.utilities.apply_func import apply_to_collection
    return apply_to_collection(batch, torch.Tensor, lambda t: t.detach().cpu().clone())
