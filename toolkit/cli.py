"""``python -m toolkit`` / ``toolkit``: LightningCLI with the defaults a user expects.

Defaults added unless the config names its own: TensorBoard logger under
``runs/<recipe>/`` (the resolved config saved beside it), a progress bar (rich on a
terminal, plain lines otherwise), ``ModelCheckpoint(save_last=True)``, a learning-rate
monitor, RNG state in checkpoints, a stop at the first non-finite loss or gradient (before
it is applied) and a fixed seed. Recipe callbacks are added to these.
``--ckpt_path last`` resumes the newest ``last.ckpt`` of the recipe and keeps logging into
the same run folder (fit with none starts from scratch; validate/test/predict with none
stop with an error before creating a run folder). ``toolkit recipes`` lists the recipes,
``toolkit optimizers`` the optimizers with their defaults.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import (Callback, LearningRateMonitor, ModelCheckpoint,
                                         ProgressBar, RichProgressBar)
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from .callbacks import FiniteGuard, PlainProgress, RNGState

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
HELP = ("Train and evaluate recipes: toolkit fit --config recipes/quickstart.yaml (then "
        "validate/test --ckpt_path last). Two more commands: 'toolkit recipes' lists every recipe "
        "with its one-line summary; 'toolkit optimizers' lists the registered optimizers with "
        "their descriptions and default hyperparameters (lr included).")


def recipe_summary(path: Path) -> str:
    """First line of a recipe's header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return "(no header comment)"


def list_recipes(folder: Path = RECIPES) -> str:
    rows = [(p.stem, recipe_summary(p)) for p in sorted(folder.glob("*.yaml"))]
    if not rows:
        return f"no recipes in {folder}"
    w = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{w}}  {d}" for n, d in rows)


def _config_name(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            return Path(argv[i + 1]).stem
        if a.startswith("--config="):
            return Path(a.split("=", 1)[1]).stem
    return "default"


def _last_checkpoint(run_dir: Path) -> Path | None:
    found = [p for p in run_dir.glob("version_*/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class CheckpointNotFound(FileNotFoundError):
    """``--ckpt_path last`` named no checkpoint where one is required (validate/test/predict)."""


class ToolkitCLI(LightningCLI):
    def __init__(self, *args, run_name: str = "default", runs_root: str = "runs", **kwargs):
        self.run_name, self.runs_root = run_name, runs_root
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        self._resume_version = None
        if cfg.get("ckpt_path") == "last":
            last = _last_checkpoint(Path(self.runs_root) / self.run_name)
            if last is not None:
                cfg["ckpt_path"] = str(last)
                self._resume_version = last.parent.parent.name
                print(f"resuming from {last}", flush=True)
            elif self.subcommand != "fit":  # evaluating random weights is never what was meant
                raise CheckpointNotFound(
                    f"{self.subcommand} --ckpt_path last: no last.ckpt under "
                    f"{Path(self.runs_root) / self.run_name}/version_*/checkpoints/, so there are "
                    f"no trained weights to {self.subcommand}. Train first (toolkit fit --config "
                    f"...), run from the folder that holds runs/, or pass --ckpt_path PATH.ckpt")
            else:
                print(f"--ckpt_path last: no last.ckpt under {self.runs_root}/{self.run_name}; "
                      "starting from scratch", flush=True)
                cfg["ckpt_path"] = None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        config = dict(config)
        if config.get("logger") in (None, True):
            config["logger"] = TensorBoardLogger(self.runs_root, name=self.run_name,
                                                 version=self._resume_version,
                                                 default_hp_metric=False)
        config["callbacks"] = default_callbacks(config, list(config.get("callbacks") or []) + callbacks)
        config["callbacks"] = [c for c in config["callbacks"] if c not in callbacks]
        return super()._instantiate_trainer(config, callbacks)


def default_callbacks(trainer_kwargs: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` plus the toolkit defaults whose type is not already among them."""
    cbs = list(callbacks)
    have = lambda t: any(isinstance(c, t) for c in cbs)
    if trainer_kwargs.get("enable_checkpointing", True) is not False and not have(ModelCheckpoint):
        cbs.append(ModelCheckpoint(save_last=True))
    if trainer_kwargs.get("logger", True) is not False and not have(LearningRateMonitor):
        cbs.append(LearningRateMonitor(logging_interval="step"))
    if not have(RNGState):
        cbs.append(RNGState())
    if not have(FiniteGuard):
        cbs.append(FiniteGuard())
    if trainer_kwargs.get("enable_progress_bar", True) is not False and not have(ProgressBar):
        cbs.append(RichProgressBar() if sys.stdout.isatty() else PlainProgress())
    return cbs


def trainer(**kwargs: Any) -> L.Trainer:
    """A ``lightning.Trainer`` with the toolkit's default callbacks (for use without the CLI)."""
    kwargs["callbacks"] = default_callbacks(kwargs, list(kwargs.get("callbacks") or []))
    return L.Trainer(**kwargs)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["recipes"]:
        print(list_recipes())
        return
    if args[:1] == ["optimizers"]:
        import optimizers
        print(optimizers.describe_optimizers())
        return
    try:
        ToolkitCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                   subclass_mode_data=True, seed_everything_default=0, args=argv,
                   save_config_kwargs={"overwrite": True}, run_name=_config_name(args),
                   parser_kwargs={"description": HELP})
    except CheckpointNotFound as e:  # a usage error: the message, not a traceback
        print(f"toolkit: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
