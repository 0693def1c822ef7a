"""``python -m toolkit`` / ``toolkit``: LightningCLI with the defaults a user expects.

Defaults added unless the config names its own: TensorBoard logger under
``runs/<recipe>/`` (the resolved config saved beside it), a progress bar (rich on a
terminal, plain lines otherwise), ``ModelCheckpoint(save_last=True)``, a learning-rate
monitor, RNG state in checkpoints, a stop at the first non-finite loss or gradient (before
it is applied), checkpoints written to a temporary file and renamed (a kill mid-write
never leaves a broken last.ckpt) and a fixed seed. Recipe callbacks are added to these.
``--ckpt_path last`` resumes the newest ``last.ckpt`` of the recipe and keeps logging into
the same run folder (fit with none starts from scratch; validate/test/predict with none
stop with an error before creating a run folder). ``toolkit recipes`` lists the recipes,
``toolkit optimizers`` the optimizers with their defaults. ``data.block_size`` sets the
model's ``block_size`` too (a LightningCLI argument link), so a recipe writes it once.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import (Callback, LearningRateMonitor, ModelCheckpoint,
                                         ProgressBar, RichProgressBar)
from jsonargparse import Namespace
from jsonargparse.typing import import_object
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from .callbacks import FiniteGuard, PlainProgress, RNGState
from .checkpoint_io import AtomicCheckpointIO, last_checkpoint
from .runtime import check_threads, quiet_known_noise

quiet_known_noise()

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


class UsageError(ValueError):
    """A config the CLI refuses before building anything: the message, not a traceback."""


class CheckpointNotFound(UsageError):
    """``--ckpt_path last`` named no checkpoint where one is required (validate/test/predict)."""


def check_optimizer_config(cfg) -> None:
    """A misspelt or unused optimizer option fails while the config is read, before any class
    is built or a run folder made, naming the options the optimizer accepts."""
    import optimizers
    model = cfg.get("model")
    args = model.get("init_args") if isinstance(model, Namespace) else None
    if not isinstance(args, Namespace) or "optimizer" not in args:
        return
    try:
        optimizers.check_optimizer_options(args.optimizer, dict(args.get("optimizer_kwargs") or {}))
    except ValueError as e:
        raise UsageError(f"model.init_args: {e}") from e


class ToolkitCLI(LightningCLI):
    def __init__(self, *args, run_name: str = "default", runs_root: str = "runs",
                 print_applied: bool = False, **kwargs):
        self.run_name, self.runs_root, self.print_applied = run_name, runs_root, print_applied
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # a recipe writes the context length once, under data: the model takes the data's
        # (a model.block_size given beside it is overwritten by data.block_size)
        parser.link_arguments("data.init_args.block_size", "model.init_args.block_size",
                              apply_on="parse")

    def _print_applied_config(self, cfg) -> None:
        """The resolved config with the defaults this CLI adds written in, so --print_config
        shows the logger and callbacks a run really gets (Lightning's shows null for both)."""
        t = cfg.trainer
        if t.get("logger") in (None, True):
            t.logger = _spec(TensorBoardLogger, {"save_dir": self.runs_root, "name": self.run_name,
                                                 "default_hp_metric": False})
        given = [import_object(c.class_path) for c in (t.get("callbacks") or [])]
        have = lambda kind: any(issubclass(c, kind) for c in given)
        t.callbacks = list(t.get("callbacks") or []) + [
            _spec(cls, args) for cls, args in _default_specs(dict(t), have)]
        print(self._subcommand_parsers[self.subcommand].dump(cfg, skip_unset=False), end="")
        raise SystemExit(0)

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        check_optimizer_config(cfg)
        if self.print_applied:
            self._print_applied_config(cfg)
        self._resume_version = None
        if cfg.get("ckpt_path") == "last":
            last = last_checkpoint(Path(self.runs_root) / self.run_name)
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

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "fit" and (msg := check_threads()):
            print(f"warning: {msg}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            if self._resume_version is not None:  # resuming into its own folder is the point
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            super()._run_subcommand(subcommand)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        config = {**dict(cfg.get("trainer") or {}), **kwargs}
        if config.get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger(self.runs_root, name=self.run_name,
                                                 version=self._resume_version,
                                                 default_hp_metric=False)
        kwargs["callbacks"] = default_callbacks(config, list(config.get("callbacks") or []))
        kwargs["plugins"] = default_plugins(config.get("plugins"))
        return super().instantiate_trainer(**kwargs)


def _default_specs(trainer_kwargs: dict[str, Any], have) -> list[tuple[type, dict[str, Any]]]:
    """(class, init args) of each toolkit default that ``trainer_kwargs`` leaves on and that
    ``have(type)`` says the user's callbacks do not already provide."""
    progress = RichProgressBar if sys.stdout.isatty() else PlainProgress
    table = [(ModelCheckpoint, ModelCheckpoint, {"save_last": True}, "enable_checkpointing"),
             (LearningRateMonitor, LearningRateMonitor, {"logging_interval": "step"}, "logger"),
             (RNGState, RNGState, {}, None), (FiniteGuard, FiniteGuard, {}, None),
             (ProgressBar, progress, {}, "enable_progress_bar")]
    return [(cls, args) for kind, cls, args, switch in table
            if (switch is None or trainer_kwargs.get(switch, True) is not False) and not have(kind)]


def default_callbacks(trainer_kwargs: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
    """``callbacks`` plus the toolkit defaults whose type is not already among them."""
    cbs = list(callbacks)
    have = lambda t: any(isinstance(c, t) for c in cbs)
    return cbs + [cls(**args) for cls, args in _default_specs(trainer_kwargs, have)]


def _spec(cls: type, init_args: dict[str, Any]) -> Namespace:
    return Namespace(class_path=f"{cls.__module__}.{cls.__qualname__}", init_args=Namespace(**init_args))


def default_plugins(plugins: Any) -> list:
    """``plugins`` plus :class:`AtomicCheckpointIO` unless they name a checkpoint IO."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def trainer(**kwargs: Any) -> L.Trainer:
    """A ``lightning.Trainer`` with the toolkit's default callbacks (for use without the CLI)."""
    quiet_known_noise()
    kwargs["callbacks"] = default_callbacks(kwargs, list(kwargs.get("callbacks") or []))
    kwargs["plugins"] = default_plugins(kwargs.get("plugins"))
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
    # Lightning's --print_config shows logger/callbacks as null although defaults are added:
    # print after parsing instead, with them written in.
    print_applied = "--print_config" in args
    if print_applied:
        args = [a for a in args if a != "--print_config"]
        argv = args
        # we hand LightningCLI argv without the flag; its warning that argv and sys.argv differ
        # is about this, not about the user's command
        warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    try:
        ToolkitCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                   subclass_mode_data=True, seed_everything_default=0, args=argv,
                   save_config_kwargs={"overwrite": True}, run_name=_config_name(args),
                   parser_kwargs={"description": HELP}, print_applied=print_applied)
    except UsageError as e:  # the message, not a traceback
        print(f"toolkit: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from e
