"""``DPSGD(privacy_unit="user")``: the user, not the example, as the unit of privacy.

Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla, Rush, "Fine-Tuning Large Language
Models with User-Level Differential Privacy" (arXiv 2407.07737), Sec. 3:

* ``uls`` (their Alg. 2): the sampler draws USERS (Poisson with rate q = batch x world / U,
  the loader's batch size counting users); each sampled user gives up to k of its examples
  (:func:`.user_level.select_examples`), and the vector clipped to C is the user's AVERAGE
  gradient over them. Removing all of a user's examples moves the sum by at most C, so the
  ordinary accountant over U users at rate q gives a user-level epsilon as is.
* ``els`` (their Alg. 1): every user is capped at k examples once (a fixed public choice
  per user, the same in every fit and resume), then example-level DP-SGD Poisson-samples
  the capped examples; :class:`.user_accounting.GroupLedger` converts its epsilon to user
  level by group privacy.

This module is what the callback consults at the few places where the unit matters: which
examples the loader holds and how its sampler draws (:meth:`UserLevel.dataset`,
:meth:`UserLevel.wrap`), the per-user clipped sum of a step on either path (:meth:`fast_sum`,
:meth:`isolated_sum`), the ledger, and the report.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch
from torch.utils.data import Subset

from .budget import Ledger
from .errors import PrivacyError
from .isolated import add_clipped_, example_gradient
from .pieces import wide
from .user_accounting import GroupLedger
from .user_level import UserBatchSampler, cap_examples, group_by_user, user_clipped_sum_pieces, \
    user_keys

USER_SAMPLING = ("uls", "els")
CAP_SEED = 0  # ELS's cap is public and fixed, so no fit or resume can draw a second one
ANALYSIS = {
    "uls": "user-level Poisson sampling (ULS, Charles et al. 2024 Alg. 2): users sampled "
           "with rate q, each contributes the clipped average gradient of up to k of its "
           "examples; Poisson-subsampled Gaussian mechanism over the N users (add/remove one "
           "user)",
    "els": "example-level sampling (ELS, Charles et al. 2024 Alg. 1): each user capped at k "
           "examples once, example-level Poisson-subsampled Gaussian mechanism accounted by "
           "RDP at example-level delta d, converted to a user by group privacy (Vadhan 2017, "
           "Lemma 2.2): epsilon = k e(d), with k exp((k-1) e(d)) d = delta"}


class UserLevel:
    """The user-level options of one ``DPSGD`` (validated at construction)."""

    def __init__(self, user_key: str | int | Callable[[Any], Hashable] | None,
                 examples_per_user: int | None, user_sampling: str, accountant: str,
                 clipping: str, sampling: str):
        if user_key is None or not (callable(user_key) or isinstance(user_key, (str, int))):
            raise ValueError(f"privacy_unit='user' needs user_key: the field of a dict item, "
                             f"the index into a tuple item, or a function of the item that "
                             f"names its owner (got {user_key!r})")
        if isinstance(examples_per_user, bool) or not isinstance(examples_per_user, int) \
                or examples_per_user < 1:
            raise ValueError(f"examples_per_user={examples_per_user!r}: give an integer k >= 1, "
                             "the most examples one user contributes (per step under uls, in "
                             "all under els)")
        if user_sampling not in USER_SAMPLING:
            raise ValueError(f"user_sampling={user_sampling!r}: choose 'uls' (sample users) or "
                             "'els' (cap users, sample examples)")
        if user_sampling == "els" and accountant != "rdp":
            raise ValueError("user_sampling='els' converts an example-level epsilon to user "
                             "level by group privacy, which needs an example-level delta far "
                             "below what the PRV accountant resolves: set accountant='rdp'")
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: user-level DP clips each user's average "
                             "gradient as one vector; use clipping='flat'")
        if sampling != "poisson":
            raise ValueError(f"sampling={sampling!r}: user-level DP samples users (uls) or "
                             "capped examples (els) by Poisson sampling; use sampling='poisson'")
        self.key, self.k, self.mode = user_key, examples_per_user, user_sampling
        self.users: list[Hashable] = []
        self.members: list[torch.Tensor] = []
        self.num_examples = 0  # the examples the sampler draws from (capped under els)

    @property
    def unit_name(self) -> str:
        return "users" if self.mode == "uls" else "examples left by the cap"

    @property
    def clips_users(self) -> bool:
        """Whether a step's rows are grouped by user before clipping (ULS)."""
        return self.mode == "uls"

    def ledger(self, delta: float, accountant: str, target_epsilon: float | None) -> Ledger:
        return GroupLedger(self.k, delta, target_epsilon) if self.mode == "els" else \
            Ledger(delta, accountant, target_epsilon)

    # ----------------------------------------------------------- the loader
    def dataset(self, dataset):
        """Read every example's owner (fit start: bad keys fail here) and return what the
        sampler draws from: the dataset (uls) or its capped subset (els)."""
        try:
            keys = user_keys(dataset, self.key)
            self.users, self.members = group_by_user(keys, getattr(dataset, "users", None))
        except (TypeError, ValueError) as e:
            raise PrivacyError(f"privacy_unit='user': {e}") from e
        if not self.users:
            raise PrivacyError("privacy_unit='user': the training set has no examples")
        if self.mode == "uls":
            self.num_examples = len(dataset)
            return dataset
        kept = cap_examples(self.members, self.k, CAP_SEED)
        self.num_examples = len(kept)
        return Subset(dataset, kept.tolist())

    def num_units(self) -> int:
        """What the sampler draws with rate q: users (uls) or capped examples (els)."""
        return len(self.users) if self.mode == "uls" else self.num_examples

    def wrap(self, sampler):
        """ULS: the sampler drew user ids; yield up to k examples of each drawn user."""
        return UserBatchSampler(self.members, self.k, sampler) if self.mode == "uls" else sampler

    # ----------------------------------------------------------- a step's clipped sum
    def _owners(self, loader, step: int, rows: int) -> torch.Tensor:
        owner = loader.batch_sampler.owners(step)
        if len(owner) != rows:
            raise PrivacyError(f"the batch has {rows} rows but the sampler's draw of step {step} "
                               f"has {len(owner)} examples: a loader or batch hook changes the "
                               "number of rows, so the rows' owners are unknown")
        return owner

    def fast_sum(self, engine, loader, step: int, max_norm: float):
        """(sum over users of clip_C(mean gradient), users' norms, rows) from the hooks."""
        rows = engine.batch_size or 0  # the step's batch rows (on_train_batch_start)
        owner = self._owners(loader, step, rows)
        sums, norms = user_clipped_sum_pieces(engine.pieces(), engine.params, owner, max_norm)
        return sums, norms, rows

    def isolated_sum(self, loss_of: Callable, singles: list, params: list, loader, step: int,
                     max_norm: float):
        """The same sum with every example's gradient computed alone (:mod:`.isolated`): a
        user's vector is then a function of its own examples whatever the step does."""
        owner = self._owners(loader, step, len(singles)).tolist()
        sums = [torch.zeros_like(p, dtype=wide(p).dtype) for p in params]
        norms = []
        for u in dict.fromkeys(owner):  # users in order of first row
            mine = [i for i, o in enumerate(owner) if o == u]
            mean = [torch.zeros_like(s) for s in sums]
            for i in mine:
                for m, g in zip(mean, example_gradient(loss_of, singles[i], params)):
                    m.add_(g)
            for m in mean:
                m.div_(len(mine))
            norms.append(add_clipped_(sums, mean, max_norm))
        return sums, (torch.stack(norms) if norms else torch.zeros(0)), len(singles)

    # ----------------------------------------------------------- reporting
    def report(self, dp) -> dict:
        out = {"privacy_unit": "user", "epsilon_level": "user-level", "user_sampling": self.mode,
               "examples_per_user": self.k, "num_users": len(self.users),
               "num_examples": self.num_examples, "adjacency": "add/remove-one-user",
               "analysis": ANALYSIS[self.mode]}
        if dp.report.get("noise") == "bandmf":  # the partitions and participations are users'
            out["analysis"] += f"; noise: {dp.report['analysis']}, over the {self.unit_name}"
        if self.mode == "els":
            user_eps, ex_eps, ex_delta = dp.budget.details()
            out.update({"accountant": "rdp", "example_level_epsilon": ex_eps,
                        "example_level_delta": ex_delta,
                        "group_privacy": f"epsilon = k * e = {self.k} * {ex_eps:.4g} = "
                                         f"{user_eps:.4g} at delta = {dp.delta:g} "
                                         f"(k exp((k-1) e) d with d = {ex_delta:.3g})"})
        return out

    def state(self) -> dict:
        return {"privacy_unit": "user", "user_sampling": self.mode, "examples_per_user": self.k}


def check_resume(unit: UserLevel | None, state: dict) -> None:
    """A ledger is resumed only under the unit and (for users) the sampling it was kept in."""
    mine = unit.state() if unit is not None else {"privacy_unit": "example"}
    theirs = {k: state.get(k, "example" if k == "privacy_unit" else None) for k in mine}
    if theirs != mine:
        raise PrivacyError(f"the checkpoint's ledger was kept under {theirs}; resume with the "
                           f"same settings (this run has {mine})")

