"""User-level DP-SGD cores: who owns which example, ULS and ELS sampling, user clipping.

Charles, Ganesh, McKenna, McMahan, Mitchell, Pillutla, Rush, "Fine-Tuning Large Language
Models with User-Level Differential Privacy" (arXiv 2407.07737), Sec. 3:

* ULS (user-level sampling, their Alg. 2): Poisson-sample USERS with rate q; each sampled
  user contributes the clipped average gradient of up to k of its examples; noise
  N(0, sigma^2 C^2) on the sum. Removing a user changes the sum by at most C, so the run is
  accounted as DP-SGD over the N users (q, steps, sigma): epsilon is user-level as is.
* ELS (example-level sampling, their Alg. 1): cap every user at k examples once, then run
  example-level DP-SGD. A user is then a group of <= k examples; ``els_epsilon`` converts
  with the (epsilon, delta) group-privacy lemma (Dwork & Roth 2014; Vadhan 2017, Lemma
  2.2): an (e, d)-DP mechanism is (k e, k exp((k-1) e) d)-DP for groups of k.
"""
from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, Callable, Sequence

import torch

from toolkit.seeding import generator


USER_STREAM, PICK_STREAM, CAP_STREAM = 21, 22, 23


def user_keys(dataset: Any, user_key: str | int | Callable[[Any], Hashable]) -> list[Hashable]:
    """The owner of every example: ``user_key`` is a field name of a dict item, an index
    into a tuple item, or a function of the item."""
    keys = []
    for i in range(len(dataset)):
        item = dataset[i]
        try:
            keys.append(user_key(item) if callable(user_key) else item[user_key])
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"example {i} has no user key {user_key!r} ({e!r}); give "
                             f"user_key as a field of every item or a function of the item") from e
    return keys


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


def sample_users(num_users: int, sample_rate: float, seed: int, step: int) -> torch.Tensor:
    """ULS: each user independently with probability q; depends on (seed, step) only."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"user sample rate {sample_rate} must lie in (0, 1]")
    u = torch.rand(num_users, generator=generator(seed, USER_STREAM, step))
    return (u < sample_rate).nonzero().squeeze(1)


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
    present = [p for p in params if p in pieces]
    if not present or owner.numel() == 0:
        return [torch.zeros_like(p) for p in params], torch.zeros(0)
    device = owner.device
    uniq, slot = torch.unique(owner, return_inverse=True)
    U = len(uniq)
    n_u = torch.zeros(U, dtype=torch.float64, device=device).index_add_(
        0, slot, torch.ones(len(slot), dtype=torch.float64, device=device))
    norm2 = torch.zeros(U, dtype=torch.float64, device=device)
    for p in present:
        g = pieces[p].materialize()
        dt = torch.float64 if g.dtype == torch.float64 else torch.float32  # the engine's wide()
        acc = torch.zeros((U,) + g.shape[1:], dtype=dt, device=g.device)
        acc.index_add_(0, slot.to(g.device), g.to(dt))
        mean = acc.flatten(1) / n_u.to(g.device, dt)[:, None]
        norm2 += mean.pow(2).sum(1).to(device, torch.float64)
        del g, acc
    norms = norm2.sqrt()
    c = (max_norm / (norms * (1 + 64 * torch.finfo(torch.float32).eps) + 1e-6)).clamp(max=1.0)
    w = (c / n_u)[slot]
    return [pieces[p].weighted_sum(w.to(p.device)).to(p.dtype) if p in pieces
            else torch.zeros_like(p) for p in params], norms


def _rdp_epsilon_at(noise_multiplier: float, sample_rate: float, steps: int):
    """delta -> RDP epsilon of the example-level run; the RDP curve (Opacus's orders and
    formula, as ``accounting.epsilon(..., "rdp")``) is computed once, the conversion
    (Balle et al. 2020) per delta, so the bisections below stay cheap."""
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis
    orders = RDPAccountant.DEFAULT_ALPHAS
    curve = analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                 steps=steps, orders=orders)

    def at(delta: float) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return float(analysis.get_privacy_spent(orders=orders, rdp=curve, delta=delta)[0])
    return at


def els_epsilon(noise_multiplier: float, sample_rate: float, steps: int, k: int,
                delta: float) -> float:
    """User-level epsilon of ELS at user-level ``delta``: example-level DP-SGD (sigma, q,
    steps) is (e, d)-DP for every d; group privacy makes it (k e, k exp((k-1) e) d) for a
    user of <= k examples. We pick the example-level d with k exp((k-1) e(d)) d = delta
    (bisection on log d; the left side grows with d) and return k e(d). RDP accounting:
    the search goes down to d = delta e^-30, where Opacus's PRV accountant gives up
    ("floating point errors will dominate"). inf when no such d exists."""
    if k < 1:
        raise ValueError(f"examples_per_user={k}: need >= 1")
    eps_at = _rdp_epsilon_at(noise_multiplier, sample_rate, steps)
    if k == 1:
        return eps_at(delta)

    def log_user_delta(log_d: float) -> float:
        return math.log(k) + (k - 1) * eps_at(math.exp(log_d)) + log_d

    lo, hi = math.log(delta) - 30.0, math.log(delta / k)  # log_user_delta(hi) >= log delta
    if log_user_delta(lo) > math.log(delta):
        return math.inf
    for _ in range(30):  # log d to 3e-8
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_user_delta(mid) <= math.log(delta) else (lo, mid)
    return k * eps_at(math.exp(lo))


def calibrate_els_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                        k: int) -> float:
    """Smallest sigma (to 0.1%) whose ELS user-level epsilon is <= target (bisection;
    epsilon falls as sigma grows)."""
    lo, hi = 0.1, 1.0
    while els_epsilon(hi, sample_rate, steps, k, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"no sigma <= 1e4 reaches user-level epsilon {target_epsilon} "
                             f"with k={k}; raise the target or lower k")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if els_epsilon(mid, sample_rate, steps, k, delta) <= target_epsilon \
            else (mid, hi)
    return hi


class UserBatchSampler:
    """ULS as a batch sampler with ``sampling.PoissonBatchSampler``'s protocol (so
    ``PoissonLoader`` reads it): step t yields this rank's rows of ``select_examples``
    for the users ``sample_users`` draws. ``owners(t)`` recomputes the users of those rows
    from (seed, t), so the callback needs no side channel from the loader."""

    def __init__(self, members: Sequence[torch.Tensor], sample_rate: float, steps: int, k: int,
                 world: int = 1, rank: int = 0, seed: int | None = None,
                 first_step: Callable[[], int] | None = None):
        from .sampling import fresh_seed
        if not 0 < sample_rate <= 1:
            raise ValueError(f"user sample rate {sample_rate} must lie in (0, 1]")
        self.members, self.q, self.steps, self.k = members, sample_rate, steps, k
        self.world, self.rank = world, rank
        self.seed = fresh_seed() if seed is None else seed
        self.first_step = first_step or (lambda: 0)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        users = sample_users(len(self.members), self.q, self.seed, step)
        return select_examples(self.members, users, self.k, self.seed, step, self.world,
                               self.rank)

    def owners(self, step: int) -> torch.Tensor:
        return self.batch(step)[1]

    def set_epoch(self, epoch: int) -> None:  # draws key on the step
        pass

    def __iter__(self):
        t = self.first_step()
        for j in range(self.steps):
            yield self.batch(t + j)[0].tolist()

    def __len__(self) -> int:
        return self.steps
