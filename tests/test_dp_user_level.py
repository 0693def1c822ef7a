"""User-level DP cores (regularizers/dp/user_level.py): the black-box user-sensitivity
yardstick, a float64 naive loop, and ELS group privacy against dp_accounting."""
import math

import dp_accounting
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant
from scipy.optimize import brentq
from scipy.stats import binom

from regularizers.dp.accounting import epsilon
from regularizers.dp.sampling import PoissonBatchSampler
from regularizers.dp.user_accounting import calibrate_els_sigma, els_epsilon, group_epsilon
from regularizers.dp.user_level import (cap_examples, group_by_user, select_examples,
                                        user_clipped_sum, user_clipped_sum_pieces, user_keys)

C = 1.0


def adversarial_batch(seed=0):
    """Users own 1-5 rows scattered through the batch (one user's rows in several
    collated rows); gradients up to 100 C, several users' rows aligned."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([3, 0, 7, 3, 1, 3, 7, 2, 0, 3, 5, 7, 3, 1])
    w = torch.randn(len(owner), 6, 5, generator=g, dtype=torch.float64) * 30
    b = torch.randn(len(owner), 5, generator=g, dtype=torch.float64)
    w[owner == 3] = w[owner == 3][0]  # user 3: five identical, aligned rows
    return [w, b], owner


def naive(grads, owner):
    total = [torch.zeros(g.shape[1:], dtype=torch.float64) for g in grads]
    for u in owner.unique().tolist():
        mean = [g[owner == u].double().mean(0) for g in grads]
        n = math.sqrt(sum(float(m.pow(2).sum()) for m in mean))
        total = [t + m * min(1.0, C / n) for t, m in zip(total, mean)]
    return total


def flat(ts):
    return torch.cat([t.reshape(-1).double() for t in ts])


def test_user_clipped_sum_equals_naive_loop():
    grads, owner = adversarial_batch()
    sums, norms = user_clipped_sum(grads, owner, C)
    torch.testing.assert_close(flat(sums), flat(naive(grads, owner)), rtol=1e-6, atol=1e-8)
    assert len(norms) == len(owner.unique())
    s32, _ = user_clipped_sum([g.float() for g in grads], owner, C)
    assert s32[0].dtype == torch.float32
    torch.testing.assert_close(flat(s32), flat(sums), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_removing_one_user_moves_the_sum_by_at_most_c(seed):
    """The yardstick at user level: drop ALL rows of one user, the clipped sum moves by
    <= C. Per-example clipping (the example-level mechanism) fails the same check."""
    grads, owner = adversarial_batch(seed)
    full = flat(user_clipped_sum(grads, owner, C)[0])
    for u in owner.unique().tolist():
        keep = owner != u
        rest = flat(user_clipped_sum([g[keep] for g in grads], owner[keep], C)[0])
        assert torch.linalg.norm(full - rest) <= C * (1 + 1e-9)
    per_example = torch.arange(len(owner))  # every row its own "user"
    full_ex = flat(user_clipped_sum(grads, per_example, C)[0])
    keep = owner != 3
    rest_ex = flat(user_clipped_sum([g[keep] for g in grads], per_example[keep], C)[0])
    assert torch.linalg.norm(full_ex - rest_ex) > 4 * C


def test_keys_and_bad_keys_are_clear_errors():
    data = [{"x": i, "user": f"u{i % 3}"} for i in range(7)]
    users, members = group_by_user(user_keys(data, "user"))
    assert users == ["u0", "u1", "u2"] and members[0].tolist() == [0, 3, 6]
    assert user_keys([(0, "a"), (1, "b")], 1) == ["a", "b"]
    assert user_keys(data, lambda item: item["x"] // 4) == [0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no user key 'speaker'"):
        user_keys(data, "speaker")
    with pytest.raises(ValueError, match="user key None"):
        group_by_user(["a", None])
    with pytest.raises(TypeError, match="unhashable"):
        group_by_user(["a", ["b"]])
    with pytest.raises(ValueError, match="own no example"):
        group_by_user(["a", "b"], users=["a", "b", "c"])
    with pytest.raises(ValueError, match="not in the declared users"):
        group_by_user(["a", "z"], users=["a"])
    with pytest.raises(ValueError, match="examples_per_user"):
        select_examples(members, torch.tensor([0]), 0, seed=0, step=0)


def test_uls_sampling_and_per_user_selection():
    keys = [i % 50 for i in range(50)] + [0] * 30 + [1] * 3  # user 0 owns 31, user 1 owns 4
    users, members = group_by_user(keys)
    counts = torch.zeros(len(users))
    draw = PoissonBatchSampler(len(users), 0.2, 1, seed=4).global_batch
    for t in range(200):
        s = draw(t)
        assert torch.equal(s, draw(t))
        idx, owner = select_examples(members, s, 5, seed=4, step=t)
        assert torch.equal(owner.unique(), s)
        for u in s.tolist():
            mine = idx[owner == u]
            assert len(mine) == min(5, len(members[u])) and len(mine.unique()) == len(mine)
            assert set(mine.tolist()) <= set(members[u].tolist())
        counts[s] += 1
    assert counts.mean() / 200 == pytest.approx(0.2, abs=4 * math.sqrt(0.2 * 0.8 / 200 / 50))
    s = PoissonBatchSampler(len(users), 0.5, 1, seed=4).global_batch(0)
    whole = select_examples(members, s, 5, seed=4, step=0)
    shards = [select_examples(members, s, 5, seed=4, step=0, world=3, rank=r) for r in range(3)]
    assert sorted(torch.cat([i for i, _ in shards]).tolist()) == sorted(whole[0].tolist())
    owners = [set(o.tolist()) for _, o in shards]  # every user on exactly one rank
    assert sum(len(o) for o in owners) == len(set().union(*owners)) == len(s)
    kept = cap_examples(members, 2, seed=1)
    assert len(kept) == sum(min(2, len(m)) for m in members)
    assert torch.equal(kept, cap_examples(members, 2, seed=1))


def dp_accounting_els(sigma, q, steps, k, delta):
    """Independent transcription: dp_accounting's RDP curve e(d) of the example-level
    mechanism, and scipy's root of log k + (k-1) e(d) + log d = log delta."""
    acc = RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    eps = acc.get_epsilon
    log_d = brentq(lambda x: math.log(k) + (k - 1) * eps(math.exp(x)) + x - math.log(delta),
                   math.log(delta) - 30, math.log(delta / k), xtol=1e-6)
    return k * eps(math.exp(log_d))


def mixture_pld_epsilon(sigma, q, steps, k, delta):
    """A tight (PLD) epsilon of one instance of the user-level neighbour: the user's k
    examples all aligned, each Poisson-sampled, so its shift is Binomial(k, q) x C."""
    pld = privacy_loss_distribution.from_mixture_gaussian_mechanism(
        sigma, list(range(k + 1)), binom.pmf(range(k + 1), k, q).tolist(),
        value_discretization_interval=1e-2)
    return float(pld.self_compose(steps).get_epsilon_for_delta(delta))


@pytest.mark.parametrize("sigma,q,steps,k", [
    (1.0, 0.01, 500, 2), (2.0, 0.02, 300, 4)])
def test_els_group_privacy_against_dp_accounting(sigma, q, steps, k):
    delta = 1e-5
    ours = els_epsilon(sigma, q, steps, k, delta)
    assert ours == pytest.approx(dp_accounting_els(sigma, q, steps, k, delta), rel=1e-3)
    assert ours >= mixture_pld_epsilon(sigma, q, steps, k, delta)  # an upper bound, valid
    assert els_epsilon(sigma, q, steps, 1, delta) == pytest.approx(
        epsilon([(sigma, q, steps)], delta, "rdp"), rel=1e-12)
    halves = [(sigma, q, steps // 2), (sigma, q, steps - steps // 2)]  # a ledger of segments
    assert group_epsilon(halves, k, delta) == pytest.approx(ours, rel=1e-9)
    s = calibrate_els_sigma(3.0, delta, q, steps, k)
    assert els_epsilon(s, q, steps, k, delta) <= 3.0 < els_epsilon(s / 1.002, q, steps, k, delta)


def test_pieces_version_equals_materialized_on_a_real_engine():
    """On the per-example engine's pieces (embedding + linear + bias, a user's rows
    scattered): equal to user_clipped_sum of per-example gradients computed one example
    at a time by autograd, and it passes the removal yardstick."""
    from regularizers.dp import PerSampleGradients
    from regularizers.dp.pieces import Dense

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Flatten(),
                                torch.nn.Linear(18, 3))
    x, y = torch.randint(0, 11, (9, 3)), torch.randint(0, 3, (9,))
    owner = torch.tensor([4, 1, 4, 2, 1, 4, 9, 2, 4])
    params = list(model.parameters())

    def loss_fn(xb, yb):
        return torch.nn.functional.cross_entropy(model(xb), yb) * 40  # norms well above C

    per_ex = [torch.stack(g) for g in zip(*[
        torch.autograd.grad(loss_fn(x[i:i + 1], y[i:i + 1]), params) for i in range(len(y))])]
    ref, ref_norms = user_clipped_sum(per_ex, owner, C)

    engine = PerSampleGradients(model)
    with engine.capture():
        loss_fn(x, y).backward()
    got, norms = user_clipped_sum_pieces(engine.pieces(), params, owner, C)
    torch.testing.assert_close(flat(got), flat(ref), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(norms.float(), ref_norms.float(), rtol=1e-4, atol=1e-6)
    assert (ref_norms > C).all()

    pieces = {p: Dense(g) for p, g in zip(params, per_ex)}
    full = flat(user_clipped_sum_pieces(pieces, params, owner, C)[0])
    for u in owner.unique().tolist():
        keep = owner != u
        rest = {p: Dense(g[keep]) for p, g in zip(params, per_ex)}
        moved = full - flat(user_clipped_sum_pieces(rest, params, owner[keep], C)[0])
        assert torch.linalg.norm(moved) <= C * (1 + 1e-6)


def test_user_batch_sampler_feeds_the_poisson_loader_and_knows_the_owners():
    from torch.utils.data import TensorDataset

    from regularizers.dp.sampling import PoissonLoader
    from regularizers.dp.user_level import UserBatchSampler

    keys = [i % 7 for i in range(40)]
    _, members = group_by_user(keys)
    data = TensorDataset(torch.arange(40))
    sampler = UserBatchSampler(members, 3, PoissonBatchSampler(len(members), 0.5, 4, seed=2))
    for t, (rows,) in enumerate(PoissonLoader(data, sampler)):
        owner = sampler.owners(t)
        assert rows.tolist() == sampler.batch(t)[0].tolist()
        assert [keys[i] for i in rows.tolist()] == owner.tolist()
        assert all((owner == u).sum() <= 3 for u in owner.unique())
