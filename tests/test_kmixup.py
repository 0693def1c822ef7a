"""k-mixup / mixup: matching against scipy and POT, mixing algebra, the callbacks."""
from __future__ import annotations

import lightning as L
import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.stats import beta, kstest
from torch.utils.data import DataLoader, Dataset, TensorDataset

from regularizers import KMixup, Mixup, assignment, kmixup_batch, kmixup_partners, mixup_batch
from regularizers.kmixup import pairwise_cost, sample_lambda


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- matching -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 7, 32, 100])
def test_assignment_equals_scipy_and_pot_and_beats_identity(k):
    rng = np.random.default_rng(k)
    for cost in ("sqeuclidean", "euclidean"):
        a, b = torch.randn(3, k, 5, dtype=torch.float64), torch.randn(3, k, 5, dtype=torch.float64)
        c = pairwise_cost(a, b, cost)
        ours, emd = assignment(c, "lsa"), assignment(c, "emd")
        for j in range(3):
            cj = c[j].numpy()
            ref = linear_sum_assignment(cj)[1]
            plan = ot.emd(np.full(k, 1 / k), np.full(k, 1 / k), cj)
            assert np.array_equal(ours[j], ref)
            assert np.array_equal(emd[j], ref)
            assert np.allclose(plan, np.eye(k)[ref] / k)  # the OT plan is that permutation / k
            total = cj[np.arange(k), ours[j]].sum()
            assert total <= np.trace(cj) + 1e-12
            assert total <= cj[np.arange(k), rng.permutation(k)].sum() + 1e-12


def test_euclidean_and_sqeuclidean_costs():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    d = torch.tensor([[np.linalg.norm(p - q) for q in b.numpy()] for p in a.numpy()])
    assert torch.allclose(pairwise_cost(a, b, "euclidean"), d, atol=1e-5)
    assert torch.allclose(pairwise_cost(a, b, "sqeuclidean"), d ** 2, atol=1e-4)
    # the two costs are different problems: on small random 2-D sets their optima differ often
    g = _gen(0)
    differ = 0
    for _ in range(50):
        a, b = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
        differ += not np.array_equal(assignment(pairwise_cost(a, b, "euclidean")),
                                     assignment(pairwise_cost(a, b, "sqeuclidean")))
    assert differ >= 3
    with pytest.raises(ValueError, match="unknown cost"):
        pairwise_cost(a, b, "cosine")


@pytest.mark.parametrize("n,k", [(64, 8), (64, 32), (70, 16), (9, 4)])
def test_partners_are_optimal_between_disjoint_blocks(n, k):
    x = torch.randn(n, 3, 4, 4)
    g = _gen(1)
    partner = kmixup_partners(x, k, g)
    order = torch.randperm(n, generator=_gen(1))  # the shuffle kmixup_partners drew first
    m, r = divmod(n, k)
    blocks = order[:m * k].view(m, k)
    flat = x.reshape(n, -1)
    for j in range(m):
        own, nxt = blocks[j], blocks[(j + 1) % m]
        assert set(partner[own].tolist()) == set(nxt.tolist())  # a bijection onto the next block
        c = pairwise_cost(flat[own], flat[nxt]).numpy()
        ref = nxt[linear_sum_assignment(c)[1]]
        assert torch.equal(partner[own], ref)
    if r:  # leftovers matched optimally against the first r of block 0
        rest, target = order[m * k:], blocks[0, :r]
        assert torch.equal(partner[rest],
                           target[linear_sum_assignment(pairwise_cost(flat[rest], flat[target]).numpy())[1]])
    assert (partner != torch.arange(n)).all()  # nobody is mixed with itself, even at k = n/2


def test_matching_reduces_transport_cost_and_uses_features():
    x = torch.randn(128, 10)
    cost = lambda p: (x - x[p]).pow(2).sum(1).mean()
    assert cost(kmixup_partners(x, 64, _gen())) < 0.8 * cost(kmixup_partners(x, 1, _gen()))
    # features decide the matching: features = x reversed on the batch axis permute the answer
    feats = torch.randn(128, 2)
    p_feat = kmixup_partners(x, 16, _gen(3), features=feats)
    p_direct = kmixup_partners(feats, 16, _gen(3))
    assert torch.equal(p_feat, p_direct)


# ---- mixing -------------------------------------------------------------------------------
def test_k1_is_mixup_with_the_same_permutation_and_lambda():
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 5, (32,))
    xm, ym = kmixup_batch(x, y, 1, 0.4, 5, _gen(7))
    xr, yr = mixup_batch(x, y, 0.4, 5, _gen(7))
    g = _gen(7)
    perm = kmixup_partners(x, 1, g)
    lam = sample_lambda(0.4, g)
    assert torch.equal(xm, xr) and torch.equal(ym, yr)
    assert torch.allclose(xm, lam * x + (1 - lam) * x[perm])
    assert torch.allclose(ym, lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y[perm], 5).float())
    assert sorted(perm.tolist()) == list(range(32))  # a permutation


def test_soft_targets_convex_rows_sum_to_one():
    x = torch.randn(50, 6)
    y_idx = torch.randint(0, 4, (50,))
    y_soft = torch.softmax(torch.randn(50, 4), 1)
    for y in (y_idx, y_soft):
        xm, ym = kmixup_batch(x, y, 8, 1.0, 4, _gen(2))
        assert ym.shape == (50, 4) and (ym >= 0).all() and (ym <= 1).all()
        assert torch.allclose(ym.sum(1), torch.ones(50), atol=1e-6)
        # mixed points lie on segments between two batch points, targets on the same segments
        g = _gen(2)
        p = kmixup_partners(x, 8, g)
        lam = sample_lambda(1.0, g)
        t = F.one_hot(y, 4).float() if y is y_idx else y
        assert torch.allclose(xm, lam * x + (1 - lam) * x[p], atol=1e-6)
        assert torch.allclose(ym, lam * t + (1 - lam) * t[p], atol=1e-6)


def test_lambda_is_beta_alpha_alpha():
    g = _gen(0)
    draws = [sample_lambda(0.3, g) for _ in range(3000)]
    assert kstest(draws, beta(0.3, 0.3).cdf).pvalue > 1e-3
    assert kstest(draws, beta(1.0, 1.0).cdf).pvalue < 1e-6


def test_clear_errors():
    x = torch.randn(16, 3)
    with pytest.raises(ValueError, match="k <= batch//2"):
        kmixup_batch(x, torch.arange(16) % 3, 9, 1.0, 3)
    with pytest.raises(ValueError, match="k <= batch//2"):
        kmixup_batch(x, torch.arange(16) % 3, 17, 1.0, 3)
    with pytest.raises(ValueError, match="unknown number of classes"):
        kmixup_batch(x, torch.arange(16) % 3, 4, 1.0)
    with pytest.raises(ValueError, match="neither class indices"):
        kmixup_batch(x, torch.rand(16), 4, 1.0, 3)
    with pytest.raises(ValueError, match="probability rows"):
        kmixup_batch(x, torch.randn(16, 3), 4, 1.0, 3)
    with pytest.raises(ValueError, match="outside"):
        kmixup_batch(x, torch.arange(16), 4, 1.0, 3)
    with pytest.raises(ValueError, match="alpha"):
        kmixup_batch(x, torch.arange(16) % 3, 4, 0.0, 3)


# ---- callbacks on a LightningModule that knows nothing of them ----------------------------
class Plain(L.LightningModule):
    """Written without mixing in mind: F.cross_entropy on whatever target it gets."""

    def __init__(self, dict_batch=False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                       torch.nn.Linear(32, 4))
        self.dict_batch, self.seen = dict_batch, {"train": [], "val": []}

    def forward(self, x):
        return self.net(x)

    def _xy(self, batch):
        return (batch["image"], batch["label"]) if self.dict_batch else batch

    def training_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.seen["train"].append((x.clone(), y.clone()))
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._xy(batch)
        self.seen["val"].append((x.clone(), y.clone()))
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


def _data(n=128, seed=0):
    g = _gen(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 1, 4, 4, generator=g) * 0.5
    x[:, 0, 0, :] += F.one_hot(y, 4).float() * 2  # learnable
    return x, y


def _trainer(callbacks, steps=None, epochs=None, **kw):
    return L.Trainer(max_steps=steps or -1, max_epochs=epochs, callbacks=callbacks, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


@pytest.mark.parametrize("dict_batch", [False, True])
@pytest.mark.parametrize("make", [lambda: KMixup(k=8, alpha=1.0, num_classes=4, seed=0),
                                  lambda: Mixup(alpha=0.5, num_classes=4, seed=0)])
def test_callback_trains_plain_module_and_never_mixes_validation(make, dict_batch):
    cb = make()
    x, y = _data()
    ds = DictData(x, y) if dict_batch else TensorDataset(x, y)
    model = Plain(dict_batch)
    before = F.cross_entropy(model(x), y).item()
    _trainer([cb], epochs=6, limit_val_batches=2).fit(
        model, DataLoader(ds, batch_size=32, shuffle=True), DataLoader(ds, batch_size=32))
    assert "training_step" not in vars(model)  # restored at fit end
    assert F.cross_entropy(model(x), y).item() < 0.7 * before
    train, val = model.seen["train"], model.seen["val"]
    assert len(train) == 24 and len(val) == 2 * 6
    for xb, yb in train:  # mixed: soft targets, inputs not rows of the dataset
        assert yb.shape == (32, 4) and yb.is_floating_point()
        assert torch.allclose(yb.sum(1), torch.ones(32))
        assert not torch.isin(xb.reshape(32, -1)[:, 0], x.reshape(128, -1)[:, 0]).all()
    for i, (xb, yb) in enumerate(val):  # validation batches are exactly the loader's
        j = i % 2
        assert torch.equal(xb, x[32 * j:32 * (j + 1)]) and torch.equal(yb, y[32 * j:32 * (j + 1)])


def test_classifier_with_kmixup_on_tiny_mnist(tiny_mnist):
    from toolkit import Classifier
    from toolkit.data import ImageDataModule
    dm = ImageDataModule(root=str(tiny_mnist), batch_size=64, val_size=100, seed=0)
    model = Classifier(arch="cnn", width=4, norm="group", lr=3e-3, lr_decay="constant")
    cb = KMixup(k=16, alpha=1.0)  # num_classes found from the module's hparams
    _trainer([cb], steps=20, limit_val_batches=1).fit(model, dm)
    assert cb.batches_mixed == 20 and cb._classes == 10
    res = _trainer([]).test(model, dm, verbose=False)[0]
    assert res["test/acc"] > 0.5  # fake digits are easy; mixing must not break learning


def test_callback_errors():
    x, y = _data(64)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(ValueError, match="k=9 is too large for this batch of 16"):
        _trainer([KMixup(k=9, num_classes=4)], steps=1).fit(Plain(), loader)
    with pytest.raises(ValueError, match="cannot tell the number of classes"):
        _trainer([KMixup(k=4)], steps=1).fit(Plain(), loader)
    bad = DataLoader(TensorDataset(x, torch.rand(64)), batch_size=16)
    with pytest.raises(ValueError, match="neither class indices"):
        _trainer([KMixup(k=4, num_classes=4)], steps=1).fit(Plain(), bad)


def test_mixing_is_seeded_and_resumes_exactly(tmp_path):
    x, y = _data(96)
    loader = lambda: DataLoader(TensorDataset(x, y), batch_size=32)  # 3 batches per epoch

    def run(epochs, ckpt=None, seed=0):
        model = Plain()
        cb = KMixup(k=8, num_classes=4, seed=seed)
        tr = L.Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_progress_bar=False,
                       enable_model_summary=False, default_root_dir=tmp_path,
                       enable_checkpointing=False)
        tr.fit(model, loader(), ckpt_path=ckpt)
        return model, tr

    full, _ = run(2)
    first, tr = run(1)
    tr.save_checkpoint(tmp_path / "one.ckpt")
    resumed, _ = run(2, ckpt=str(tmp_path / "one.ckpt"))
    assert len(full.seen["train"]) == 6 and len(resumed.seen["train"]) == 3
    for (xa, ya), (xb, yb) in zip(full.seen["train"][3:], resumed.seen["train"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, _), (xb, _) in zip(full.seen["train"][:3], first.seen["train"]):
        assert torch.equal(xa, xb)
    other, _ = run(1, seed=1)
    assert not torch.equal(other.seen["train"][0][0], first.seen["train"][0][0])


def test_feature_layer_matching_runs_and_keeps_batchnorm_stats():
    x, y = _data(64)

    class WithBN(Plain):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8),
                                           torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                           torch.nn.Linear(8, 4))

    model = WithBN()
    cb = KMixup(k=8, num_classes=4, feature_layer="net.2", seed=0)
    _trainer([cb], steps=2).fit(model, DataLoader(TensorDataset(x, y), batch_size=32))
    # two training forwards only (momentum 0.1 twice): the feature forwards ran in eval mode
    assert model.net[2].num_batches_tracked.item() == 2
    with pytest.raises(AttributeError):
        _trainer([KMixup(k=8, num_classes=4, feature_layer="net.nope")], steps=1).fit(
            WithBN(), DataLoader(TensorDataset(x, y), batch_size=32))
