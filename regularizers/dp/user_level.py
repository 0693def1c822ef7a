"""User-level DP-SGD cores: who owns which example, ULS and ELS sampling, user clipping.

Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla, Rush, "Fine-Tuning Large Language
Models with User-Level Differential Privacy" (arXiv 2407.07737), Sec. 3:

* ULS (user-level sampling, their Alg. 2): Poisson-sample USERS with rate q; each sampled
  user contributes the clipped average gradient of up to k of its examples; noise
  N(0, sigma^2 C^2) on the sum. Removing a user changes the sum by at most C, so the run is
  accounted as DP-SGD over the N users (q, steps, sigma): epsilon is user-level as is.
* ELS (example-level sampling, their Alg. 1): cap every user at k examples once, then run
  example-level DP-SGD; :mod:`.user_accounting` converts its epsilon by group privacy.

The callback wires both in through :mod:`.user_unit` (``DPSGD(privacy_unit="user")``).
"""
from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Callable, Sequence

import torch

from toolkit.seeding import generator


PICK_STREAM, CAP_STREAM = 22, 23


def user_keys(dataset: Any, user_key: str | int | Callable[[Any], Hashable]) -> list[Hashable]:
    """The owner of every example: ``user_key`` is a field name of a dict item, an index
    into a tuple item, or a function of the item."""
    keys = []
    for i in range(len(dataset)):
        item = dataset[i]
        try:
            key = user_key(item) if callable(user_key) else item[user_key]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"example {i} has no user key {user_key!r} ({e!r}); give "
                             f"user_key as a field of every item or a function of the item") from e
        keys.append(_plain(key, i))
    return keys


def _plain(key: Any, i: int) -> Any:
    """A tensor key as its Python value: a tensor hashes by identity, which would make
    every example a user of its own."""
    if isinstance(key, torch.Tensor):
        if key.numel() != 1:
            raise TypeError(f"example {i}'s user key is a tensor of shape {tuple(key.shape)}, "
                            "not one value; use a str/int/tuple id")
        return key.item()
    return key


def group_by_user(keys: Sequence[Hashable], users: Sequence[Hashable] | None = None
                  ) -> tuple[list[Hashable], list[torch.Tensor]]:
    """(users, members): members[u] holds the indices of the examples user u owns.
    ``users``, when given, is the declared population (e.g. the speaker list); each of
    them must own an example, since an empty user would inflate N in the accounting."""
    members: dict[Hashable, list[int]] = {}
    for i, k in enumerate(keys):
        if k is None:
            raise ValueError(f"example {i} has user key None; every example needs an owner")
        try:
            members.setdefault(k, []).append(i)
        except TypeError as e:
            raise TypeError(f"example {i}'s user key {k!r} is unhashable ({type(k).__name__}); "
                            "use a str/int/tuple id") from e
    if users is not None:
        empty = [u for u in users if u not in members]
        if empty:
            raise ValueError(f"users {empty[:5]} own no example; drop them from the population")
        unknown = [u for u in members if u not in set(users)]
        if unknown:
            raise ValueError(f"user keys {unknown[:5]} are not in the declared users")
        order = list(users)
    else:
        order = list(members)
    return order, [torch.tensor(members[u], dtype=torch.long) for u in order]


def _pick(idx: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    return idx if len(idx) <= k else idx[torch.randperm(len(idx), generator=g)[:k]].sort().values


def select_examples(members: Sequence[torch.Tensor], sampled: torch.Tensor, k: int, seed: int,
                    step: int, world: int = 1, rank: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(example indices, owner): up to k examples of every sampled user, uniformly without
    replacement (a user with fewer gives all); owner[i] is the user id of row i. Under DDP
    rank r keeps the users sampled[r::world] whole: a user split across ranks would be
    clipped once per rank and could move the sum by world * C."""
    if k < 1:
        raise ValueError(f"examples_per_user={k}: need >= 1")
    g = generator(seed, PICK_STREAM, step)
    picks = [_pick(members[u], k, g) for u in sampled.tolist()]  # all ranks draw alike
    picks, sampled = picks[rank::world], sampled[rank::world]
    if not picks:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    owner = torch.cat([torch.full((len(p),), u, dtype=torch.long)
                       for p, u in zip(picks, sampled.tolist())])
    return torch.cat(picks), owner


def cap_examples(members: Sequence[torch.Tensor], k: int, seed: int) -> torch.Tensor:
    """ELS: the fixed subset of at most k examples per user (drawn once, seeded)."""
    if k < 1:
        raise ValueError(f"examples_per_user={k}: need >= 1")
    g = generator(seed, CAP_STREAM)
    return torch.cat([_pick(m, k, g) for m in members]).sort().values


def user_clipped_sum(grads: Sequence[torch.Tensor], owner: torch.Tensor, max_norm: float
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sum over users u of clip_C(mean_{i of u} g_i), per parameter, and the users' norms.

    ``grads`` are per-example gradients (row i of each tensor is example i) and ``owner``
    the user of each row (any order: rows of one user may be anywhere in the batch). The
    mean is over the user's rows present, the clipping over all parameters together, so
    one user moves the sum by at most ``max_norm`` (2407.07737, Alg. 2, line 7)."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm}: need > 0")
    if not grads or owner.numel() == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads], \
            torch.zeros(0)
    # torch.unique's output size is data dependent (one sync per step, like the batch size)
    uniq, slot = torch.unique(owner.to(grads[0].device), return_inverse=True)
    U = len(uniq)
    means = []
    for g in grads:  # accumulate in fp32+ whatever the gradients' precision
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32
        shape = (U,) + (1,) * (g.dim() - 1)
        acc = torch.zeros((U,) + g.shape[1:], dtype=dt, device=g.device)
        acc.index_add_(0, slot, g.to(dt))
        count = torch.zeros(U, dtype=dt, device=g.device).index_add_(
            0, slot, torch.ones(len(slot), dtype=dt, device=g.device))
        means.append(acc / count.view(shape))
    norms = torch.sqrt(sum(m.flatten(1).pow(2).sum(1) for m in means))
    # same 64-ulp slack as mechanism.clip_factors, so rounding cannot push a user past C
    c = (max_norm / (norms * (1 + 64 * torch.finfo(norms.dtype).eps) + 1e-6)).clamp(max=1.0)
    sums = [(m * c.view((U,) + (1,) * (m.dim() - 1))).sum(0).to(g.dtype)
            for m, g in zip(means, grads)]
    return sums, norms


def user_clipped_sum_pieces(pieces: dict, params: Sequence[torch.Tensor], owner: torch.Tensor,
                            max_norm: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``user_clipped_sum`` on a per-example gradient engine's pieces (``norm2``,
    ``weighted_sum``, ``materialize``; regularizers/dp/pieces.py), one parameter at a time.

    Pass 1 materializes each parameter's (B, ...) per-example gradients in turn, only to
    accumulate the users' mean-gradient norms; pass 2 is the engine's own clipped sum
    with per-example weights w_i = c_u(i) / n_u(i), i.e. sum_u c_u mean_u. Peak memory is
    one parameter's per-example gradients, not the model's."""
    if max_norm <= 0:
        raise ValueError(f"max_norm={max_norm}: need > 0")
    from .mechanism import finite_clip_factors
    present = [p for p in params if p in pieces]
    if not present or owner.numel() == 0:
        return [torch.zeros_like(p) for p in params], torch.zeros(0)
    # the owners come from the sampler, on the host: grouping them there costs no sync
    uniq, slot = torch.unique(owner.cpu(), return_inverse=True)
    U, device = len(uniq), present[0].device
    slot = slot.to(device)
    n_u = torch.zeros(U, dtype=torch.float64, device=device).index_add_(
        0, slot, torch.ones(len(slot), dtype=torch.float64, device=device))
    norm2 = torch.zeros(U, dtype=torch.float64, device=device)
    eps = torch.finfo(torch.float64).eps  # the rounding of the narrowest gradient, below
    for p in present:
        g = pieces[p].materialize()
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32  # the engine's wide()
        eps = max(eps, torch.finfo(dt).eps)
        acc = torch.zeros((U,) + g.shape[1:], dtype=dt, device=g.device)
        acc.index_add_(0, slot.to(g.device), g.to(dt))
        mean = acc.flatten(1) / n_u.to(g.device, dt)[:, None]
        norm2 += mean.pow(2).sum(1).to(device, torch.float64)
        del g, acc
    norms = norm2.sqrt()
    # a user whose mean is not finite adds exactly 0 (as an example does, mechanism.py):
    # its rows are zeroed, since 0 * inf would be NaN in the sum
    finite = torch.isfinite(norms)
    for p in present:
        pieces[p].keep_rows(finite[slot])
    c = finite_clip_factors(norms * (1 + 64 * eps), max_norm)
    w = (c / n_u)[slot]
    return [pieces[p].weighted_sum(w.to(p.device)).to(p.dtype) if p in pieces
            else torch.zeros_like(p) for p in params], norms


class UserBatchSampler:
    """ULS as a batch sampler with ``sampling.PoissonBatchSampler``'s protocol (so
    ``PoissonLoader`` reads it). ``units`` is any sampler over the users' ids 0..U-1 with
    ``global_batch(step)``, ``steps``, ``world``, ``rank``, ``seed`` and ``first_step``
    (Poisson, or cyclic Poisson for BandMF): it decides which users take part at step t,
    and step t yields this rank's rows of ``select_examples`` for them. ``owners(t)``
    recomputes the users of those rows from (seed, t), so the callback needs no side
    channel from the loader."""

    def __init__(self, members: Sequence[torch.Tensor], k: int, units):
        if k < 1:
            raise ValueError(f"examples_per_user={k}: need >= 1")
        self.members, self.k, self.units = members, k, units
        self.steps, self.world, self.rank = units.steps, units.world, units.rank
        self.seed, self.first_step = units.seed, units.first_step

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return select_examples(self.members, self.units.global_batch(step), self.k, self.seed,
                               step, self.world, self.rank)

    def indices(self, step: int) -> list[int]:
        """This rank's examples at ``step``."""
        return self.batch(step)[0].tolist()

    def owners(self, step: int) -> torch.Tensor:
        return self.batch(step)[1]

    def set_epoch(self, epoch: int) -> None:  # draws key on the step
        pass

    def __iter__(self):
        t = self.first_step()
        for j in range(self.steps):
            yield self.indices(t + j)

    def __len__(self) -> int:
        return self.steps
