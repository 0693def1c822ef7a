"""``DPSGD``: a Lightning callback that trains an unmodified LightningModule with DP-SGD.

Abadi et al. 2016 (Alg. 1) with Poisson sampling. The callback is wiring only: the
loader (:mod:`.loader`), the fit-start probe (:mod:`.probe`), per-example gradients
(:mod:`.per_sample`), the mechanism (:mod:`.mechanism`), the ledger and budget
(:mod:`.budget`) and the refusals (:mod:`.validate`) each live in their own module.
Before every optimizer step ``.grad`` of every trainable parameter is replaced by the
clipped, noised, normalized sum, so any optimizer steps on private gradients.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from toolkit.lightning_internals import wrap_train_dataloader

from . import accounting
from .budget import Ledger
from .correlated import BandMF, check_config
from .errors import PrivacyError
from .loader import private_loader
from .mechanism import CLIPPING, privatize_
from .per_sample import PerSampleGradients
from .probe import batch_rows, probe_module
from .report import ADJACENCY, EPSILON_LOG, build_report, publish, without_training_metrics
from .sampling import fresh_seed, step_generator
from .step import StepGuard
from .user_unit import UserLevel, check_resume
from .validate import (check_callbacks, check_not_sharded, check_number, check_optimizers,
                       check_step)

class DPSGD(L.Callback):
    """Differentially private training for any LightningModule (automatic optimization).

    Args:
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm.
        target_epsilon: with no ``noise_multiplier``, sigma is calibrated so that the
            planned steps spend at most this; in any case no step is taken that would
            exceed it, whatever the sample rate does mid-run.
        delta: the delta of (epsilon, delta)-DP; must be below 1/N.
        max_grad_norm: C, the per-example clipping norm.
        accountant: ``prv`` (tight, Gopi et al. 2021) or ``rdp`` (Mironov 2017).
        clipping: ``flat`` (one norm per example) or ``per_layer`` (C/sqrt(K) per tensor).
        sampling: ``poisson`` (default; add/remove adjacency) or ``shuffle`` (fixed-size
            batches of a secret permutation per pass; no amplification, and only zero-out
            adjacency, as reported and logged: ``dp/epsilon_zero_out``; docs/dp.md).
        loss_reduction: kept for old configs; the reduction is now read from the step that
            runs (:mod:`.rows`): example i's loss is the mean (or sum) of its own entries.
        hide_training_metrics: drop what the module logs from training hooks (the loss of
            a private batch is a release the epsilon does not cover).
        probe_examples: training examples the fit-start probe reads (:mod:`.probe`).
        noise: ``gaussian`` (independent per step: DP-SGD) or ``bandmf``: step t adds
            ``(C^-1 z)_t`` for a ``bands``-banded Toeplitz strategy C, correlated with the
            last ``bands - 1`` steps' noise, and samples cyclically from ``bands`` fixed
            partitions (Choquette-Choo et al. 2023; :mod:`.correlated`). Epsilon is then
            the amplified BandMF bound: DP-SGD on one partition at ``sigma / ||c||``
            (docs/dp_bandmf.md). A checkpoint of a BandMF run holds the last released
            noise vectors (resume continues the recursion with fresh z): keep it private.
        bands: b, the number of bands and of partitions (1 = DP-SGD's noise exactly).
        strategy: ``bsr`` (banded square root, Kalinin & Lampert 2024) or ``optimized``
            (McKenna 2025, optimized for the planned steps).
        seed: fixes sampling and noise of the first fit of a fresh ledger, for reproducible
            runs. Whoever knows it can recompute batches and noise, so the guarantee holds
            only while it is secret and used for one run. Every later fit under the same
            ledger (a second ``trainer.fit`` of this callback, any resume from a checkpoint)
            draws fresh OS entropy whatever the seed: noise already released is never drawn
            again, not even when a run resumes twice from one checkpoint. The default draws
            fresh OS entropy for every fit.
        privacy_unit: ``example`` (default) or ``user`` (:mod:`.user_unit`; docs/dp.md,
            "User-level privacy"): epsilon then covers everything one user contributes, N is
            the number of users, and delta < 1/N is checked against it.
        user_key: with ``privacy_unit="user"``, who owns an example: a field of a dict item,
            an index into a tuple item, or a function of the item (a tensor key is read as
            its value). A dataset attribute ``users`` declares the population; each of them
            must own an example.
        examples_per_user: k >= 1, the most examples of one user a step (``uls``) or the
            whole run (``els``) uses.
        user_sampling: ``uls`` samples users with rate batch x world / N (the loader's batch
            size then counts users) and clips each sampled user's average gradient over up
            to k of its examples; ``els`` caps every user at k examples once and runs
            example-level DP-SGD on them, its epsilon converted to user level by group
            privacy (``accountant: rdp``).
    """

    privatizes_gradients = True  # FiniteGuard then checks only the released update

    def __init__(self, noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 delta: float = 1e-5, max_grad_norm: float = 1.0, accountant: str = "prv",
                 clipping: str = "flat", sampling: str = "poisson", loss_reduction: str = "mean",
                 hide_training_metrics: bool = False, probe_examples: int = 4,
                 seed: int | None = None, noise: str = "gaussian", bands: int = 1,
                 strategy: str = "bsr", privacy_unit: str = "example",
                 user_key: Any = None, examples_per_user: int | None = None,
                 user_sampling: str = "uls"):
        if noise_multiplier is None and target_epsilon is None:
            raise ValueError("give noise_multiplier (sigma) or target_epsilon (sigma calibrated "
                             "for the planned steps)")
        if noise_multiplier is not None:
            noise_multiplier = check_number("noise_multiplier", noise_multiplier)
        if target_epsilon is not None:
            target_epsilon = check_number("target_epsilon", target_epsilon)
        delta = check_number("delta", delta, 0.0, 1.0, high_open=True)
        max_grad_norm = check_number("max_grad_norm", max_grad_norm)
        probe_examples = int(check_number("probe_examples", probe_examples, 2, 1024, low_open=False))
        if accountant not in accounting.ACCOUNTANTS:
            raise ValueError(f"accountant={accountant!r}: choose one of {sorted(accounting.ACCOUNTANTS)}")
        if clipping not in CLIPPING:
            raise ValueError(f"clipping={clipping!r}: choose one of {CLIPPING}")
        if sampling not in ("poisson", "shuffle"):
            raise ValueError(f"sampling={sampling!r}: choose 'poisson' or 'shuffle'")
        check_config(noise, bands, strategy, sampling)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={loss_reduction!r}: choose 'mean' or 'sum'")
        self.noise_multiplier, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.max_grad_norm, self.accountant, self.clipping = max_grad_norm, accountant, clipping
        self.sampling, self.loss_reduction, self.seed = sampling, loss_reduction, seed
        self.hide_training_metrics, self.probe_examples = hide_training_metrics, probe_examples
        if seed is not None:
            warnings.warn("DPSGD(seed=...) makes the first fit's sampling and noise reproducible: "
                          "anyone who knows the seed can undo the noise, so keep it secret and use "
                          "it for one run (later fits and resumes draw fresh noise)", stacklevel=2)
        if privacy_unit not in ("example", "user"):
            raise ValueError(f"privacy_unit={privacy_unit!r}: choose 'example' or 'user'")
        self.user_unit = UserLevel(user_key, examples_per_user, user_sampling, accountant,
                                   clipping, sampling) if privacy_unit == "user" else None
        self.budget = self.user_unit.ledger(delta, accountant, target_epsilon) \
            if self.user_unit else Ledger(delta, accountant, target_epsilon)
        self.noise = noise
        self.bandmf = BandMF(bands, strategy) if noise == "bandmf" else None
        self.sigma: float | None = None
        self.report: dict[str, Any] = {}
        self.last_step: dict[str, Any] = {}  # privatize_ statistics, never logged
        self.engine: PerSampleGradients | None = None
        self.data = None  # loader.PrivateData of the current training loader
        self._pass_counted = False
        self._trainable: frozenset = frozenset()
        self._patched: set[str] = set()  # instance attributes we set on the module
        self._run_seed: int | None = None  # this fit's seed (_fit_seed); None between fits
        self.seeded = False  # whether this fit's noise and batches follow from ``seed``

    @property
    def ledger(self) -> list[list]:
        return self.budget.segments

    @property
    def sample_rate(self) -> float | None:
        return self.data.sample_rate if self.data else None

    @property
    def accounted_sigma(self) -> float | None:
        """The noise multiplier the ledger composes: sigma / ||c|| under BandMF."""
        if self.bandmf is None or self.sigma is None:
            return self.sigma
        return self.sigma / self.bandmf.column_norm

    # ------------------------------------------------------------------ setup
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        check_step(trainer)
        check_callbacks(trainer.callbacks)
        self._entropy = trainer.strategy.broadcast(fresh_seed(), src=0)  # same on every rank
        self._run_seed = None  # chosen once the checkpoint (if any) is restored: _fit_seed
        self._trainer = trainer
        wrap_train_dataloader(trainer, self._wrap)
        if self.hide_training_metrics and "log" not in vars(pl_module):
            pl_module.log = without_training_metrics(pl_module)
            self._patched.add("log")

    def _wrap(self, loader):
        return self._private_loader(self._trainer, loader)

    def _fit_seed(self) -> int:
        """This fit's sampling seed, drawn once per fit after Lightning restored the ledger
        (every strategy DP-SGD accepts restores before building the training loader)."""
        if self._run_seed is None:
            first = self.budget.start_fit() == 0
            self.seeded = first and self.seed is not None
            self._run_seed = self.seed if self.seeded else self._entropy
        return self._run_seed

    def _private_loader(self, trainer, loader):
        if self.bandmf is not None:
            self.data = self.bandmf.loader(loader, trainer.world_size, trainer.global_rank,
                                           self._fit_seed(), first_step=lambda: trainer.global_step,
                                           users=self.user_unit)
        else:
            self.data = private_loader(loader, self.sampling, trainer.world_size,
                                       trainer.global_rank, self._fit_seed(),
                                       first_step=lambda: trainer.global_step,
                                       users=self.user_unit)
        self._check_delta()
        return self.data.loader

    def _check_delta(self) -> None:
        if self.data is None:
            raise PrivacyError("no training loader was built before the first step, so N and "
                               "delta < 1/N cannot be checked")
        if self.delta >= 1 / self.data.num_samples:
            raise PrivacyError(f"delta={self.delta} >= 1/N = 1/{self.data.num_samples}: such a "
                               "delta allows releasing an example outright; choose delta < 1/N "
                               "(e.g. 1e-5 for N = 60000)")

    def on_fit_start(self, trainer, pl_module) -> None:
        if any(isinstance(o, torch.optim.LBFGS) for o in trainer.optimizers):
            raise PrivacyError("LBFGS evaluates the loss several times per step, each evaluation "
                               "a release of its own: use a first-order optimizer with DPSGD")
        check_not_sharded(pl_module, trainer.strategy)
        # the step's loss is canonicalized to a per-example sum (.rows), so no 1/B to undo
        self.engine = PerSampleGradients(pl_module, "sum")
        self.engine.skip_weight_grads = trainer.world_size == 1
        self.guard = StepGuard(self, trainer, pl_module)
        self._recheck_trainable(trainer)

    def _recheck_trainable(self, trainer, probe: bool = False) -> None:
        now = frozenset(id(p) for p in self.engine.params)
        if now != self._trainable:
            self.engine.check()
            if probe:  # a newly trainable weight used outside its module would lose a part
                self._probe(trainer, trainer.lightning_module)
            self._trainable = now
        check_optimizers(trainer.optimizers, self.engine.params)

    def on_train_start(self, trainer, pl_module) -> None:
        self._check_delta()
        if trainer.global_step > 0 and not self.ledger:
            raise PrivacyError(f"resuming at step {trainer.global_step} from a checkpoint without a "
                               "DP-SGD ledger: those steps were not private, so no epsilon can be "
                               "claimed. Start from step 0 (load public pretrained weights as "
                               "the initialization instead of resuming)")
        if self.bandmf is not None:
            self.bandmf.plan(trainer.estimated_stepping_batches)
            self.bandmf.start(trainer.global_step)
        self._calibrate(trainer)
        self._probe(trainer, pl_module)
        self._pass_counted = False  # a resumed shuffled epoch may revisit examples: new pass
        self._noise_seed = self._fit_seed() if self.seeded else fresh_seed()  # rank 0 adds it
        if not self.budget.allows(self.accounted_sigma, self.sample_rate):
            trainer.should_stop = True
            rank_zero_info(f"DP-SGD: no step fits in target_epsilon={self.target_epsilon} "
                           f"(spent {self.epsilon():.4f}); not training")
        left = self.budget.remaining(self.accounted_sigma, self.sample_rate)
        rank_zero_info(f"DP-SGD: sigma={self.sigma:.4g} q={self.sample_rate:.5g} "
                       f"C={self.max_grad_norm} {self.accountant} delta={self.delta:g} "
                       f"({self.sampling}, {ADJACENCY[self.sampling]} adjacency"
                       f"{self._unit_note()}); budget "
                       f"{'unbounded' if left == math.inf else int(left)} "
                       f"more {'steps' if self.sampling == 'poisson' else 'passes'}"
                       + (f"; noise=bandmf bands={self.bandmf.bands} "
                          f"strategy={self.bandmf.strategy} ||c||={self.bandmf.column_norm:.4g}"
                          " (budget in cycles of bands steps)" if self.bandmf else ""))

    def _unit_note(self) -> str:
        u = self.user_unit
        return "" if u is None else (f" of one user among N={self.data.num_samples}, "
                                     f"{u.mode} k={u.k}, user-level epsilon")

    def _calibrate(self, trainer) -> None:
        if self.sigma is not None:
            if self.noise_multiplier is not None and self.noise_multiplier != self.sigma:
                raise PrivacyError(f"the checkpoint's ledger ran at sigma={self.sigma}; resuming "
                                   f"with noise_multiplier={self.noise_multiplier} is not supported")
            return
        if self.noise_multiplier is not None:
            self.sigma = self.noise_multiplier
            return
        planned = trainer.estimated_stepping_batches
        if not math.isfinite(planned):
            raise PrivacyError("target_epsilon needs a known step budget to calibrate sigma: "
                               "set trainer.max_steps or trainer.max_epochs")
        todo = planned if self.sampling == "poisson" else math.ceil(
            planned / max(1, trainer.num_training_batches))
        if self.bandmf is not None:  # one ledger step per cycle, at sigma / ||c||
            todo = math.ceil(planned / self.bandmf.bands)
        self.sigma = self.budget.calibrate_sigma(self.sample_rate, max(1, int(todo)))
        if self.bandmf is not None:
            self.sigma *= self.bandmf.column_norm

    def _probe(self, trainer, pl_module) -> None:
        loader = self.data.loader
        collate = getattr(loader, "_collate", None) or loader.collate_fn

        def to_device(batch):  # the path a training batch takes (true-precision casts too)
            batch = trainer.precision_plugin.convert_input(batch)
            batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
            return trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        with trainer.precision_plugin.train_step_context():
            probe_module(pl_module, self.engine, loader.dataset, collate, self.probe_examples,
                         to_device, step=self.guard.original)

    # ------------------------------------------------------------------ per step
    def _charges_now(self) -> bool:
        if self.bandmf is not None:
            return self.bandmf.charges_next()
        return self.sampling == "poisson" or not self._pass_counted

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._pass_counted = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        check_step(trainer)
        self._check_delta()
        self._recheck_trainable(trainer, probe=True)
        if self._charges_now() and not self.budget.allows(self.accounted_sigma, self.sample_rate):
            raise PrivacyError(f"one more step would spend more than target_epsilon="
                               f"{self.target_epsilon}; training must stop here")
        self._privatized = 0
        self._stepped = False
        self.engine.clear()
        self.engine.capturing = True
        self.engine.batch_size = batch_rows(batch)
        self.guard.begin(batch)

    def on_after_backward(self, trainer, pl_module) -> None:
        # here rather than before the optimizer step: every callback's on_after_backward runs
        # before any on_before_optimizer_step, so nothing (FiniteGuard, a monitor) reads the
        # raw gradient whatever the callback order
        self.engine.capturing = False
        self._privatized += 1
        if self._privatized > 1:
            raise PrivacyError("the optimizer evaluated its closure more than once in one step: "
                               "each evaluation is a release of its own, which one noise draw "
                               "does not cover; use a first-order optimizer")
        clipped = self.guard.finish()  # the isolated path's sum, or None: the hooks' pieces
        if clipped is None and self.user_unit is not None and self.user_unit.clips_users:
            clipped = self.user_unit.fast_sum(self.engine, self.data.loader, trainer.global_step,
                                              self.max_grad_norm)
        gen = step_generator(self._noise_seed, trainer.global_step, stream=1,
                             device=self.engine.params[0].device if self.engine.params else None)
        if self.bandmf is not None:
            self.bandmf.check_aligned(trainer.global_step)
        charges = self._charges_now()
        self.last_step = privatize_(self.engine, self.max_grad_norm, self.sigma,
                                    self.data.expected_batch_size, self.clipping, gen,
                                    add_noise=trainer.is_global_zero,
                                    clipped=clipped,
                                    noise=self.bandmf.draw if self.bandmf else None)
        if self.bandmf is not None:
            self.bandmf.released_one()
        if charges:
            self.budget.add(self.accounted_sigma, self.sample_rate)
            self._pass_counted = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._privatized:
            raise PrivacyError("the optimizer steps without a backward DP-SGD saw (a manual "
                               "backward, or a closure that skips it): nothing was privatized")
        self._stepped = True
        check_optimizers(trainer.optimizers, self.engine.params)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.engine.capturing = False
        backward = any(c.rows is not None for calls in self.engine._calls.values() for c in calls)
        self.engine.clear()
        self.guard.end()
        if backward and not self._stepped:
            raise PrivacyError("a backward pass ran without an optimizer step: the raw gradient "
                               "stays in .grad for the next step; DP-SGD needs one optimizer "
                               "step per batch")
        poisson = self.sampling == "poisson"
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        if (poisson or last_of_epoch) and not trainer.should_stop \
                and (self.bandmf is None or self._charges_now()) \
                and not self.budget.allows(self.accounted_sigma, self.sample_rate):
            trainer.should_stop = True
            rank_zero_info(f"DP-SGD: stopping after step {trainer.global_step}: the next "
                           f"{'step' if poisson else 'pass'} would spend more than "
                           f"target_epsilon={self.target_epsilon} (spent {self.epsilon():.4f})")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        name = "dp/epsilon_user" if self.user_unit else EPSILON_LOG[self.sampling]
        L.LightningModule.log(pl_module, name, self.epsilon(),
                              on_step=False, on_epoch=True, sync_dist=False)

    # ------------------------------------------------------------------ reporting
    def epsilon(self) -> float:
        return self.budget.epsilon()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.report = build_report(self, trainer.global_step)
        if self.user_unit is not None:
            self.report.update(self.user_unit.report(self))
        log_dir = trainer.log_dir if trainer.logger is not None else None  # collective under DDP
        if trainer.is_global_zero:
            publish(self.report, log_dir)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._restore(pl_module)
            self._run_seed = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore(pl_module)  # Lightning skips teardown hooks after an exception
        self._run_seed = None

    def _restore(self, pl_module) -> None:
        """Leave the module as it was: no hooks, no instance attributes of ours."""
        if getattr(self, "guard", None) is not None:
            self.guard.remove()
            self.guard = None
        if self.engine is not None:
            self.engine.remove()
            self.engine = None
        for attr in self._patched:
            vars(pl_module).pop(attr, None)
        self._patched = set()

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {**self.budget.state_dict(), "sigma": self.sigma, "sampling": self.sampling,
                "delta": self.delta, "accountant": self.accountant, "noise": self.noise,
                **({"bandmf": self.bandmf.state_dict()} if self.bandmf else {}),
                **(self.user_unit.state() if self.user_unit else {})}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("sampling", self.sampling) != self.sampling:
            raise PrivacyError(f"the checkpoint's ledger was kept under sampling="
                               f"{state_dict['sampling']!r}; resume with the same sampling")
        check_resume(self.user_unit, state_dict)
        if self._run_seed is not None:
            raise PrivacyError("the training loader was built before the checkpoint's DP-SGD "
                               "ledger was restored, so this fit's noise could repeat an "
                               "earlier fit's; use strategy='ddp' or a single device")
        if state_dict.get("noise", "gaussian") != self.noise:
            raise PrivacyError(f"the checkpoint's run added noise={state_dict['noise']!r}; "
                               f"resume with the same noise (not {self.noise!r})")
        if self.bandmf is not None:
            self.bandmf.load_state_dict(state_dict["bandmf"])
        self.budget.load_state_dict(state_dict)
        self.sigma = state_dict["sigma"]
