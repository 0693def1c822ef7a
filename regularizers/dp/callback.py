"""``DPSGD``: a Lightning callback that trains an unmodified LightningModule with DP-SGD.

Abadi et al. 2016 (Alg. 1) with Poisson sampling: the callback swaps the training loader
for a Poisson one, hooks the module's layers for per-example gradients
(:mod:`.per_sample`), and before every optimizer step replaces ``.grad`` by the clipped,
noised, normalized sum (:func:`.mechanism.privatize_`) -- so any optimizer of
``build_optimizer`` (AdamW, SGD, Muon ...) steps on private gradients. The ledger of
(sigma, q, steps) lives in the checkpoint; epsilon comes from Opacus's accountants.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import (DataLoader, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler)

from . import accounting
from .mechanism import CLIPPING, privatize_
from .per_sample import PerSampleGradients
from .sampling import PoissonBatchSampler, PoissonLoader, fresh_seed, step_generator
from .validate import PrivacyError, check_callbacks, check_model, check_trainer

SHUFFLE_ANALYSIS = ("shuffled fixed-size batches, no privacy amplification by sampling: each "
                    "epoch counted as one full-batch Gaussian release (sensitivity C under "
                    "zero-out adjacency), composed over epochs; assumes the loader shows each "
                    "example at most once per epoch")
POISSON_ANALYSIS = "Poisson-subsampled Gaussian mechanism (add/remove adjacency)"


def _batch_size(loader: DataLoader) -> int | None:
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)


def _why_not_poisson(loader) -> str | None:
    """None if ``loader`` reads a map-style dataset we can Poisson-sample, else why not."""
    if not isinstance(loader, DataLoader):
        return f"the training loader is a {type(loader).__name__}, not a torch DataLoader"
    ds = loader.dataset
    if isinstance(ds, IterableDataset) or not hasattr(ds, "__len__"):
        return "its dataset is iterable (no len / random access)"
    if _batch_size(loader) is None:
        return "its batch size is unknown (custom batch sampler without batch_size)"
    sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
    full = (SequentialSampler, DistributedSampler)
    if isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != len(ds)):
        return "its RandomSampler draws with replacement or a subset"
    if not isinstance(sampler, full + (RandomSampler,)):
        return (f"its sampler {type(sampler).__name__} may select a subset or weight examples "
                "(put the subset into the dataset itself, e.g. torch.utils.data.Subset)")
    return None


class DPSGD(L.Callback):
    """Differentially private training for any LightningModule (automatic optimization).

    Args:
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm.
        target_epsilon: with no ``noise_multiplier``, sigma is calibrated so that the
            planned steps (``trainer.estimated_stepping_batches``) spend at most this; in
            any case training stops before a step would exceed it.
        delta: the delta of (epsilon, delta)-DP; must be below 1/N.
        max_grad_norm: C, the per-example clipping norm.
        accountant: ``prv`` (tight, Gopi et al. 2021) or ``rdp`` (Mironov 2017).
        clipping: ``flat`` (one norm per example) or ``per_layer`` (C/sqrt(K) per tensor).
        sampling: ``poisson`` (default; replaces the training loader) or ``shuffle`` (keep
            the loader; the weaker no-amplification analysis is used and reported).
        loss_reduction: how ``training_step``'s loss reduces over examples (``mean``/``sum``).
        seed: fixes sampling and noise for reproducible runs. Whoever knows it can
            recompute batches and noise, so the guarantee holds only while it is secret;
            the default draws fresh OS entropy.
    """

    def __init__(self, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float = 1e-5, max_grad_norm: float = 1.0, accountant: str = "prv",
                 clipping: str = "flat", sampling: str = "poisson", loss_reduction: str = "mean",
                 seed: int | None = None):
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError("give noise_multiplier (sigma) or target_epsilon (sigma calibrated "
                             "for the planned steps)")
        if noise_multiplier is not None and noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier={noise_multiplier} gives no privacy; use > 0")
        if target_epsilon is not None and target_epsilon <= 0:
            raise ValueError(f"target_epsilon={target_epsilon} must be > 0")
        if not 0 < delta < 1:
            raise ValueError(f"delta={delta} must lie in (0, 1), well below 1/N")
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be > 0")
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant={accountant!r}: choose one of {sorted(accounting.ACCOUNTANTS)}")
        if clipping not in CLIPPING:
            raise ValueError(f"clipping={clipping!r}: choose one of {CLIPPING}")
        if sampling not in ("poisson", "shuffle"):
            raise ValueError(f"sampling={sampling!r}: choose 'poisson' or 'shuffle'")
        self.noise_multiplier, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.max_grad_norm, self.accountant, self.clipping = max_grad_norm, accountant, clipping
        self.sampling, self.loss_reduction, self.seed = sampling, loss_reduction, seed
        if seed is not None:
            warnings.warn("DPSGD(seed=...) makes sampling and noise reproducible: anyone who knows "
                          "the seed can undo the noise, so keep it secret", stacklevel=2)
        self.ledger: list[list] = []  # [sigma, q, steps]; q = 1 and steps = passes for shuffle
        self.sigma: float | None = None
        self.report: dict[str, Any] = {}
        self.last_step: dict[str, Any] = {}  # privatize_ statistics of the last step
        self.engine: PerSampleGradients | None = None
        self._limit = math.inf
        self._pass_counted = False
        self.num_samples: int | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: int | None = None

    # ------------------------------------------------------------------ setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        check_trainer(trainer)
        check_callbacks(trainer.callbacks)
        seed = self.seed if self.seed is not None else fresh_seed()
        self._run_seed = trainer.strategy.broadcast(seed, src=0)  # all ranks draw one batch
        source = trainer.fit_loop._data_source
        if not getattr(source, "_dp_wrapped", False):
            make = source.dataloader
            source.dataloader = lambda: self._private_loader(trainer, make())
            source._dp_wrapped = True

    def _private_loader(self, trainer, loader):
        world, rank = trainer.world_size, trainer.global_rank
        why = _why_not_poisson(loader)
        if self.sampling == "poisson":
            if why is not None:
                raise PrivacyError(f"cannot Poisson-sample the training data: {why}. Give a "
                                   "map-style dataset in a DataLoader, or set DPSGD(sampling="
                                   "'shuffle') to accept the weaker shuffling analysis")
            self.num_samples = len(loader.dataset)
            expected = _batch_size(loader) * world
            if expected > self.num_samples:
                raise PrivacyError(f"expected batch {expected} exceeds the {self.num_samples} examples")
            self.sample_rate = expected / self.num_samples
            self.expected_batch_size = expected
            steps = max(1, round(self.num_samples / expected))
            sampler = PoissonBatchSampler(self.num_samples, self.sample_rate, steps, world, rank,
                                          self._run_seed, first_step=lambda: trainer.global_step)
            return PoissonLoader(loader.dataset, sampler, loader.collate_fn, loader.num_workers,
                                 loader.pin_memory)
        bs = _batch_size(loader) if isinstance(loader, DataLoader) else None
        if bs is None:
            raise PrivacyError("sampling='shuffle' needs a DataLoader with a batch size")
        sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
        if getattr(sampler, "replacement", False):
            raise PrivacyError(f"sampling='shuffle' counts one release per epoch, but the "
                               f"{type(sampler).__name__} can repeat an example within an epoch; "
                               "sample without replacement")
        self.num_samples = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
        self.sample_rate = 1.0  # no amplification is claimed
        self.expected_batch_size = bs * world
        return loader

    def on_fit_start(self, trainer, pl_module) -> None:
        check_model(pl_module)
        if self.num_samples is not None and self.delta >= 1 / self.num_samples:
            raise PrivacyError(f"delta={self.delta} >= 1/N = 1/{self.num_samples}: such a delta "
                               "allows releasing an example outright; choose delta < 1/N "
                               "(e.g. 1e-5 for N = 60000)")
        self.engine = PerSampleGradients(pl_module, self.loss_reduction)

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and not self.ledger:
            raise PrivacyError(f"resuming at step {trainer.global_step} from a checkpoint without a "
                               "DP-SGD ledger: those steps were not private, so no epsilon can be "
                               "claimed. Start from step 0 (load public pretrained weights as "
                               "the initialization instead of resuming)")
        planned = trainer.estimated_stepping_batches
        poisson = self.sampling == "poisson"
        per_epoch = max(1, trainer.num_training_batches)
        # the mechanism's "steps": Poisson steps, or passes over the data when shuffling
        todo = planned - trainer.global_step if poisson else math.ceil(planned / per_epoch)
        if self.sigma is None:
            if self.noise_multiplier is not None:
                self.sigma = float(self.noise_multiplier)
            else:
                if not math.isfinite(planned):
                    raise PrivacyError("target_epsilon needs a known step budget to calibrate sigma: "
                                       "set trainer.max_steps or trainer.max_epochs")
                self.sigma = accounting.calibrate_sigma(self.target_epsilon, self.delta,
                                                        self.sample_rate, int(todo), self.accountant)
        elif self.noise_multiplier is not None and self.noise_multiplier != self.sigma:
            raise PrivacyError(f"the checkpoint's ledger ran at sigma={self.sigma}; resuming with "
                               f"noise_multiplier={self.noise_multiplier} is not supported")
        self._limit = math.inf
        if self.target_epsilon is not None:
            spent = [tuple(s) for s in self.ledger]
            plan = int(min(todo, 1 << 20)) if math.isfinite(todo) else 1 << 20
            if accounting.epsilon(spent + [(self.sigma, self.sample_rate, plan)], self.delta,
                                  self.accountant) > self.target_epsilon:
                self._limit = self._steps() + accounting.max_steps(
                    spent, self.sigma, self.sample_rate, self.target_epsilon, self.delta,
                    self.accountant, upper=plan)
        if self._steps() + 1 > self._limit:
            trainer.should_stop = True
            rank_zero_info(f"DP-SGD: no step fits in target_epsilon={self.target_epsilon} "
                           f"(spent {self.epsilon():.4f}); not training")
        self._pass_counted = False  # a resumed shuffled epoch may revisit examples: new pass
        self._noise_seed = self._run_seed if self.seed is not None else fresh_seed()
        if trainer.is_global_zero:
            rank_zero_info(f"DP-SGD: sigma={self.sigma:.4g} q={self.sample_rate:.5g} "
                           f"C={self.max_grad_norm} {self.accountant} "
                           f"delta={self.delta:g} ({self.sampling}); budget "
                           f"{'unbounded' if self._limit == math.inf else int(self._limit)} "
                           f"{'steps' if poisson else 'passes'}")

    # ------------------------------------------------------------------ per step
    def _steps(self) -> int:
        return sum(int(n) for _, _, n in self.ledger)

    def _add(self) -> None:
        if self.ledger and self.ledger[-1][0] == self.sigma and self.ledger[-1][1] == self.sample_rate:
            self.ledger[-1][2] += 1
        else:
            self.ledger.append([self.sigma, self.sample_rate, 1])

    def _charges_now(self) -> bool:
        return self.sampling == "poisson" or not self._pass_counted

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._pass_counted = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._charges_now() and self._steps() + 1 > self._limit:
            raise PrivacyError(f"one more step would spend more than target_epsilon="
                               f"{self.target_epsilon}; training must stop here")
        self.engine.clear()
        self.engine.capturing = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.engine.capturing = False
        gen = step_generator(self._noise_seed, trainer.global_step, stream=1)
        stats = privatize_(self.engine, self.max_grad_norm, self.sigma, self.expected_batch_size,
                           self.clipping, gen, add_noise=trainer.is_global_zero)
        if self._charges_now():
            self._add()
            self._pass_counted = True
        # Kept for debugging, never logged: the realized batch size and the clipped fraction
        # are statistics of the private data released without noise.
        self.last_step = stats

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.engine.capturing = False
        self.engine.clear()
        poisson = self.sampling == "poisson"
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if (poisson or last_of_epoch) and self._steps() + 1 > self._limit and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_info(f"DP-SGD: stopping after step {trainer.global_step}: the next "
                           f"{'step' if poisson else 'epoch'} would spend more than "
                           f"target_epsilon={self.target_epsilon} (spent {self.epsilon():.4f})")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("dp/epsilon", self.epsilon(), on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ reporting
    def epsilon(self) -> float:
        return accounting.epsilon([tuple(s) for s in self.ledger], self.delta, self.accountant)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.report = {
            "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.sigma,
            "sample_rate": getattr(self, "sample_rate", None), "steps": trainer.global_step,
            "accounted_steps": self._steps(), "accountant": self.accountant,
            "max_grad_norm": self.max_grad_norm, "clipping": self.clipping,
            "expected_batch_size": getattr(self, "expected_batch_size", None),
            "num_samples": getattr(self, "num_samples", None), "sampling": self.sampling,
            "analysis": POISSON_ANALYSIS if self.sampling == "poisson" else SHUFFLE_ANALYSIS,
            "ledger": [list(s) for s in self.ledger]}
        # a collective call under DDP (every rank makes it); no logger, no run folder to write
        log_dir = trainer.log_dir if trainer.logger is not None else None
        if trainer.is_global_zero:
            r = self.report
            rank_zero_info(f"DP-SGD report: epsilon={r['epsilon']:.4f} delta={r['delta']:g} "
                           f"sigma={r['noise_multiplier']:.4g} q={r['sample_rate']:.5g} "
                           f"steps={r['accounted_steps']} accountant={r['accountant']} "
                           f"C={r['max_grad_norm']} ({r['analysis']})")
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                (Path(log_dir) / "dp_report.json").write_text(json.dumps(r, indent=2))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.engine is not None:
            self.engine.remove()
            self.engine = None

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"ledger": [list(s) for s in self.ledger], "sigma": self.sigma,
                "sampling": self.sampling, "delta": self.delta, "accountant": self.accountant}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sampling", self.sampling) != self.sampling:
            raise PrivacyError(f"the checkpoint's ledger was kept under sampling="
                               f"{state_dict['sampling']!r}; resume with the same sampling")
        self.ledger = [list(s) for s in state_dict["ledger"]]
        self.sigma = state_dict["sigma"]
