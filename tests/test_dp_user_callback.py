"""``DPSGD(privacy_unit="user")`` end to end (issue 26, section 2; docs/dp.md, "User-level
privacy"), measured with the black-box yardstick of ``test_dp_adversarial``: one SGD(lr 1)
step with every user sampled (q = 1), on D and on D without ALL of one user's examples,
same seed (so the same noise); the difference of N (w0 - w1) must be <= C."""
import math
import warnings

import dp_accounting
import lightning as L
import pytest
import torch
import torch.nn.functional as F
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from torch.utils.data import DataLoader, TensorDataset

from regularizers import DPSGD
from regularizers.dp import PrivacyError, epsilon
from regularizers.dp.user_unit import check_resume

from .test_dp_adversarial import C, flat, mlp
from .test_dp_user_level import dp_accounting_els

warnings.filterwarnings("ignore", message="DPSGD.seed")


class Owned(L.LightningModule):
    """A module that reads (x, y) and ignores the owner column of the batch."""

    def __init__(self, net, mix=False):
        super().__init__()
        self.net, self.mix = net, mix

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        if self.mix:  # couples the rows in the tracker's eyes (a mean over the batch), not
            x = x + 0 * x.mean(0)  # in value: the step is computed with every example alone
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Spy(L.Callback):
    def __init__(self):
        self.paths, self.rows = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        dp = next(cb for cb in trainer.callbacks if isinstance(cb, DPSGD))
        self.paths.append(dp.guard.path)
        self.rows.append(batch[2].tolist())


def users_data(seed=0):
    """5 users; user 0 owns 11 aligned examples with inputs 1e3 times the others' and its
    rows interleaved with user 3's (one user in several collated rows, not adjacent)."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.tensor([0, 3, 0, 0, 3, 1, 0, 2, 2, 0, 0, 4, 0, 0, 0, 0, 0, 1])
    x = torch.randn(len(owner), 6, generator=g, dtype=torch.float64)
    x[owner == 0] = x[owner == 0][0] * 1e3
    y = torch.arange(len(owner)) % 3
    return x, y, owner


def release(x, y, owner, steps=1, spy=None, mix=False, dtype=torch.float64, **kw):
    """N (w0 - w1) after ``steps`` steps, q = 1 (batch = every user), N = number of users."""
    module = Owned(mlp().to(dtype), mix=mix)
    w0 = flat(module)
    users = len(owner.unique())
    kw = {"noise_multiplier": 1.0, "delta": 1e-3, "max_grad_norm": C, "seed": 7,
          "privacy_unit": "user", "user_key": 2, "examples_per_user": 16, **kw}
    dp = DPSGD(**kw)
    t = L.Trainer(callbacks=[dp] + ([spy] if spy else []), max_steps=steps, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu",
                  precision="64-true" if dtype == torch.float64 else "32-true")
    t.fit(module, DataLoader(TensorDataset(x.to(dtype), y, owner), batch_size=users))
    return (w0 - flat(module)) * users, dp


@pytest.mark.parametrize("k,mix", [(16, False), (3, False), (16, True)])
def test_removing_all_of_one_users_examples_moves_the_release_by_at_most_c(k, mix):
    """Every user in turn, the adversarial one (11 large aligned examples) included, on
    the hooks' path and on the path that computes every example alone."""
    x, y, owner = users_data()
    spy = Spy()
    full, _ = release(x, y, owner, examples_per_user=k, mix=mix, spy=spy)
    assert spy.paths == ["isolated" if mix else "rows"]
    assert spy.rows[0].count(0) == min(k, int((owner == 0).sum()))  # up to k of user 0's
    for u in owner.unique().tolist():
        keep = owner != u
        rest, _ = release(x[keep], y[keep], owner[keep], examples_per_user=k, mix=mix)
        assert float((full - rest).norm()) <= C * (1 + 1e-6)


def test_the_yardstick_sees_example_level_clipping_of_a_user():
    """The same removal under example-level DP-SGD moves the release by far more than C:
    the user's 11 examples are 11 units there."""
    x, y, owner = users_data()
    ds = lambda keep: TensorDataset(x[keep], y[keep])  # noqa: E731

    def one(keep):
        module = Owned(mlp().double())
        w0 = flat(module)
        t = L.Trainer(callbacks=[DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=C,
                                       seed=7)], max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu")
        t.fit(module, DataLoader(ds(keep), batch_size=int(keep.sum())))
        return (w0 - flat(module)) * int(keep.sum())
    moved = one(torch.ones(len(owner), dtype=torch.bool)) - one(owner != 0)
    assert float(moved.norm()) > 5 * C


def naive_user_sum(x, y, owner, max_norm):
    """sum_u clip_C(mean of u's per-example gradients), one example at a time, float64."""
    net = mlp().double()
    total = [torch.zeros_like(p) for p in net.parameters()]
    for u in owner.unique().tolist():
        gs = [torch.autograd.grad(F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]),
                                  list(net.parameters())) for i in (owner == u).nonzero()[:, 0]]
        mean = [torch.stack(g).mean(0) for g in zip(*gs)]
        n = math.sqrt(sum(float(m.square().sum()) for m in mean))
        total = [t + m * min(1.0, max_norm / n) for t, m in zip(total, mean)]
    return torch.cat([t.reshape(-1) for t in total])


@pytest.mark.parametrize("mix", [False, True])
def test_the_released_sum_is_the_per_user_clipped_average_of_a_naive_loop(mix):
    x, y, owner = users_data(1)
    x[owner == 0] /= 1e3  # some users clipped, some not
    spy = Spy()
    got, dp = release(x, y, owner, noise_multiplier=1e-12, max_grad_norm=1.0, mix=mix, spy=spy,
                      accountant="rdp")
    assert spy.paths == ["isolated" if mix else "rows"]
    ref = naive_user_sum(x, y, owner, 1.0)
    # to the clip factor's slack (64 ulp + 1e-6 / norm), which sums that cancel magnify
    assert float((got - ref).norm()) <= 1e-5 * float(ref.norm())
    norms = dp.last_step["norms"]
    assert len(norms) == 5 and (norms > 1.0).any() and (norms < 1.0).any()


def independent_uls_epsilon(sigma, q, steps, delta, pld=False):
    """dp_accounting's RDP (on Opacus's orders, so only the implementations differ) or PLD
    epsilon of `steps` Poisson-subsampled Gaussian steps over the users."""
    from opacus.accountants import RDPAccountant
    acc = PLDAccountant(value_discretization_interval=1e-3) if pld else \
        RdpAccountant(RDPAccountant.DEFAULT_ALPHAS)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def many_users(n_users=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, n_users, (200,), generator=g)
    owner[:n_users] = torch.arange(n_users)  # everyone owns an example
    return torch.randn(200, 6, generator=g), torch.randint(0, 3, (200,), generator=g), owner


def fit_steps(x, y, owner, batch_size, steps, **kw):
    module = Owned(mlp())
    kw = {"delta": 1e-3, "max_grad_norm": C, "privacy_unit": "user", "user_key": 2,
          "examples_per_user": 4, "accountant": "rdp", **kw}
    dp = DPSGD(**kw)
    spy = Spy()
    L.Trainer(callbacks=[dp, spy], max_steps=steps, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
              ).fit(module, DataLoader(TensorDataset(x, y, owner), batch_size=batch_size))
    return dp, spy


def test_uls_is_accounted_over_users_as_an_independent_accountant_says():
    x, y, owner = many_users()
    dp, spy = fit_steps(x, y, owner, batch_size=8, steps=12, target_epsilon=3.0)
    r = dp.report
    assert r["num_samples"] == r["num_users"] == 40 and r["num_examples"] == 200
    assert r["sample_rate"] == pytest.approx(8 / 40) and r["epsilon_level"] == "user-level"
    assert r["privacy_unit"] == "user" and r["adjacency"] == "add/remove-one-user"
    assert r["epsilon"] == pytest.approx(
        independent_uls_epsilon(dp.sigma, 8 / 40, 12, 1e-3), rel=2e-3)
    assert r["epsilon"] <= 3.0 and dp.ledger == [[dp.sigma, 8 / 40, 12]]
    tight = independent_uls_epsilon(dp.sigma, 8 / 40, 12, 1e-3, pld=True)
    prv = epsilon(dp.ledger, 1e-3, "prv")  # the default accountant: an upper bound, close
    assert tight * (1 - 1e-3) <= prv <= tight * 1.02
    for rows in spy.rows:  # no user gives more than k rows a step
        assert max(rows.count(u) for u in set(rows)) <= 4


def test_els_caps_users_once_and_converts_by_group_privacy():
    x, y, owner = many_users()
    dp, spy = fit_steps(x, y, owner, batch_size=16, steps=12, target_epsilon=8.0,
                        user_sampling="els", examples_per_user=3)
    kept = dp.data.loader.dataset.indices
    per_user = torch.bincount(owner[kept], minlength=40)
    counts = torch.bincount(owner, minlength=40)
    assert torch.equal(per_user, counts.clamp(max=3))  # each user capped at k, once
    seen = {i for rows in spy.rows for i in rows}
    assert seen <= set(owner.unique().tolist())
    r = dp.report
    q = 16 / len(kept)
    assert r["sample_rate"] == pytest.approx(q) and r["num_samples"] == 40
    assert r["epsilon"] == pytest.approx(dp_accounting_els(dp.sigma, q, 12, 3, 1e-3), rel=1e-3)
    assert 7.0 < r["epsilon"] <= 8.0 and "group privacy" in r["analysis"]
    assert r["example_level_epsilon"] * 3 == pytest.approx(r["epsilon"])
    assert r["example_level_delta"] * 3 * math.exp(2 * r["example_level_epsilon"]) \
        == pytest.approx(1e-3, rel=1e-4)


class Declared(TensorDataset):
    users = [0, 1, 2, 3]


@pytest.mark.parametrize("dataset,key,match", [
    (TensorDataset(torch.randn(4, 6), torch.zeros(4, dtype=torch.long)), 2, "no user key 2"),
    ([{"x": torch.zeros(6), "y": 0}] * 4, "user", "no user key 'user'"),
    ([{"x": torch.zeros(6), "y": 0, "user": [1]}] * 4, "user", "unhashable"),
    (TensorDataset(torch.randn(4, 6), torch.zeros(4, dtype=torch.long),
                   torch.zeros(4, 2)), 2, "not one value"),
    (Declared(torch.randn(4, 6), torch.zeros(4, dtype=torch.long),
              torch.tensor([0, 1, 1, 0])), 2, r"users \[2, 3\] own no example"),
])
def test_bad_user_keys_are_clear_errors_at_fit_start(dataset, key, match):
    dp = DPSGD(noise_multiplier=1.0, delta=1e-3, privacy_unit="user", user_key=key,
               examples_per_user=2)
    t = L.Trainer(callbacks=[dp], max_steps=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(PrivacyError, match=match):
        t.fit(Owned(mlp()), DataLoader(dataset, batch_size=2))


@pytest.mark.parametrize("kw,match", [
    ({"examples_per_user": 0}, "examples_per_user=0"),
    ({"examples_per_user": 2.5}, "examples_per_user=2.5"),
    ({"user_key": None}, "needs user_key"),
    ({"user_sampling": "els"}, "set accountant='rdp'"),
    ({"user_sampling": "both"}, "user_sampling='both'"),
    ({"clipping": "per_layer"}, "clipping='flat'"),
    ({"sampling": "shuffle"}, "sampling='poisson'"),
    ({"privacy_unit": "person"}, "privacy_unit='person'"),
])
def test_bad_user_options_are_refused_at_construction(kw, match):
    kw = {"noise_multiplier": 1.0, "privacy_unit": "user", "user_key": "user",
          "examples_per_user": 2, **kw}
    with pytest.raises(ValueError, match=match):
        DPSGD(**kw)


def test_a_ledger_resumes_only_under_its_unit():
    uls = DPSGD(noise_multiplier=1.0, privacy_unit="user", user_key=2, examples_per_user=2)
    example = DPSGD(noise_multiplier=1.0)
    check_resume(uls.user_unit, uls.state_dict())
    check_resume(None, example.state_dict())
    with pytest.raises(PrivacyError, match="privacy_unit"):
        example.load_state_dict(uls.state_dict())
    with pytest.raises(PrivacyError, match="examples_per_user"):
        DPSGD(noise_multiplier=1.0, privacy_unit="user", user_key=2,
              examples_per_user=3).load_state_dict(uls.state_dict())

