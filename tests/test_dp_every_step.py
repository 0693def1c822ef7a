"""Issue 23: the guarantee holds at every step, whatever the step does on that step.

Each class of the second audit, measured with the black-box yardstick of
``test_dp_adversarial`` (one SGD step, lr 1, q = 1, on D and on D minus example 0, same
noise; the difference of N (w0 - w1) must be <= C), or refused before any step. Which
path computed a step (``rows``: the hooks after the row check; ``isolated``: every example
alone) is read from the callback's guard, so a test also fails when a cheap path is lost.
"""
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regularizers import DPSGD
from regularizers.dp import PrivacyError
from regularizers.dp.rows import RowTracker
from toolkit.callbacks import FiniteGuard

from .test_dp_adversarial import C, X, Y, Plain, dp, flat, mlp

warnings.filterwarnings("ignore", message="DPSGD.seed")


class Spy(L.Callback):
    """Records which path each step took (read before the guard is removed)."""

    def __init__(self):
        self.paths = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, DPSGD)).guard
        self.paths.append(guard.path)


def release(module, x, y, callbacks=(), steps=1, batch_size=None, collate_fn=None,
            precision="32-true", dataset=None, **dpkw):
    """N (w0 - w1) after ``steps`` SGD(lr 1) steps with q = 1, and the paths taken."""
    spy = Spy()
    ds = dataset if dataset is not None else TensorDataset(x, y)
    dl = DataLoader(ds, batch_size=batch_size or len(ds), collate_fn=collate_fn)
    w0 = flat(module)
    t = L.Trainer(callbacks=[dp(**dpkw), spy, *callbacks], max_steps=steps, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", precision=precision)
    t.fit(module, dl)
    return (w0 - flat(module)) * len(ds), spy.paths


def sens(make, x, y, drop=0, **kw):
    a, pa = release(make(), x, y, **kw)
    keep = [i for i in range(len(x)) if i != drop]
    b, pb = release(make(), x[keep], y[keep], **kw)
    return float((a - b).norm()), pa + pb


# ------------------------------------------------------------ the tracker on plain functions
lin = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 3))


@pytest.mark.parametrize("fn,separable", [
    (lambda x, y: F.cross_entropy(lin(x), y), True),
    (lambda x, y: 0.5 * F.cross_entropy(lin(x), y), True),
    (lambda x, y: F.cross_entropy(lin(x), y, reduction="none").sum() / len(x), True),
    (lambda x, y: F.cross_entropy(lin(x), y, weight=torch.tensor([1., 5, 9])), True),
    (lambda x, y: F.mse_loss(lin(x), y.float()[:, None].expand(-1, 3)), True),
    (lambda x, y: F.cross_entropy(lin(x - x.mean(0)), y), False),
    (lambda x, y: F.cross_entropy(lin(0.5 * x + 0.5 * x[torch.randperm(len(x))]), y), False),
    (lambda x, y: F.cross_entropy(lin(x * (x.sum() > 0)), y), False),
    (lambda x, y: F.cross_entropy(lin(x), y) * (2 if x.sum() > 0 else 1), False),
    (lambda x, y: torch.log(F.cross_entropy(lin(x), y)), False),
    (lambda x, y: F.cross_entropy(lin(x), y, reduction="none").sum() / (y >= 0).sum(), False),
    (lambda x, y: F.cross_entropy(lin(x), y) + lin(x).square().mean(), False),
    (lambda x, y: F.cross_entropy(lin(F.normalize(x, dim=0)), y), False),
    (lambda x, y: F.cross_entropy(lin(F.normalize(x, dim=1)), y), True),
])
def test_the_tracker_separates_exactly_the_row_wise_steps(fn, separable):
    tracker = RowTracker(len(X))
    tracker.mark((X, Y))
    with tracker:
        loss = fn(X, Y)
    assert tracker.verdict(loss).separable is separable


def test_a_write_through_a_view_couples_what_shares_its_storage():
    tracker = RowTracker(len(X))
    tracker.mark((X, Y))
    with tracker:
        h = lin(X)
        out = torch.zeros(len(X), 6)
        out[:, :3] = h
        out[:, 3:] = h.mean(0)  # every row now holds the batch mean
        loss = F.cross_entropy(out[:, :3], Y)
    assert not tracker.verdict(loss).separable


def test_the_canonical_gradient_is_the_per_example_mean_whatever_the_batch_scale():
    """Class weights normalized over the batch, ignored tokens counted over the batch:
    after the hook, example i's gradient is that of its own weighted mean."""
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 3, requires_grad=True)  # 4 examples x 5 tokens
    target = torch.randint(0, 3, (4, 5))
    target[0, 3:] = -100
    target[1, 4] = -100
    w = torch.tensor([1.0, 4.0, 0.5])
    tracker = RowTracker(4)
    tracker.mark((logits, target))
    with tracker:
        loss = F.cross_entropy(logits.view(-1, 3), target.view(-1), weight=w,
                               ignore_index=-100) * 7.0
    v = tracker.verdict(loss)
    handles = v.install()
    (g,) = torch.autograd.grad(loss, [logits])
    for h in handles:
        h.remove()
    want = torch.zeros_like(logits)
    for i in range(4):
        li = F.cross_entropy(logits[i], target[i], weight=w, ignore_index=-100)
        want[i] = torch.autograd.grad(li, [logits])[0][i]
    assert v.red is not None and v.red.kind == "nll"
    torch.testing.assert_close(g, want)


# ------------------------------------------------------------ 1. one non-finite example
class NormFeature(nn.Module):
    """x / ||x||: a zero row has a finite loss and a NaN gradient."""

    def forward(self, x):
        return x / x.norm(dim=1, keepdim=True)


def test_one_example_with_a_non_finite_gradient_adds_zero_and_stops_nothing():
    x = X.clone()
    x[0] = 0.0
    def make():
        torch.manual_seed(0)
        return Plain(nn.Sequential(nn.Linear(6, 6), NormFeature(), nn.Linear(6, 3)))
    a, paths = release(make(), x, Y, callbacks=[FiniteGuard()], steps=1)
    assert torch.isfinite(a).all() and paths == ["rows"]
    s, _ = sens(make, x, Y, callbacks=[FiniteGuard()])
    assert s <= C * (1 + 1e-4)


def test_a_huge_finite_input_adds_zero_or_at_most_c():
    x = X.clone()
    x[0] = 3e38
    s, _ = sens(lambda: Plain(mlp()), x, Y)
    assert s <= C * (1 + 1e-4)


# ------------------------------------------------------------ 2. coupling not active at fit start
class SometimesMixup(Plain):
    """mixup with probability p drawn per batch, from step ``after`` on, in train mode only
    (a fit-start check in eval mode never sees it)."""

    def __init__(self, p=1.0, after=0):
        super().__init__(mlp())
        self.p, self.after = p, after

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.training and self.trainer.global_step >= self.after and \
                torch.rand(()) < self.p and len(x) > 1:
            perm = torch.randperm(len(x))
            x = 0.6 * x + 0.4 * x[perm]
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_mixup_with_probability_is_computed_alone_on_its_steps(p):
    torch.manual_seed(0)
    s, paths = sens(lambda: SometimesMixup(p), X, Y)
    assert s <= C * (1 + 1e-4)
    if p == 1.0:
        assert paths == ["isolated", "isolated"]


def test_a_late_branch_is_caught_on_the_step_it_first_runs():
    torch.manual_seed(1)
    m = SometimesMixup(1.0, after=2)
    _, paths = release(m, X, Y, steps=4)
    assert paths == ["rows", "rows", "isolated", "isolated"]


# ------------------------------------------------------------ 3. coupling invisible in the first items
class Weighted(Plain):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y, weight=torch.tensor([1.0, 10.0, 0.1]))


def test_a_class_weighted_mean_on_class_sorted_data_stays_within_c():
    order = torch.argsort(Y, stable=True)
    s, paths = sens(lambda: Weighted(mlp()), X[order], Y[order], drop=len(X) - 1)
    assert s <= C * (1 + 1e-4) and set(paths) == {"rows"}


class Ragged(torch.utils.data.Dataset):
    def __init__(self, n=8, drop=None):
        g = torch.Generator().manual_seed(0)
        xs = [torch.randint(1, 20, (2 + i % 5,), generator=g) for i in range(n)]
        self.items = [(x, torch.tensor(i % 3)) for i, x in enumerate(xs) if i != drop]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_to_longest(items):
    return (nn.utils.rnn.pad_sequence([i[0] for i in items], batch_first=True),
            torch.stack([i[1] for i in items]))


class MeanPool(L.LightningModule):
    """Unmasked padding: the pads of the batch's longest example enter everyone's mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(20, 8), nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.emb(x).mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_unmasked_padding_to_the_longest_item_is_computed_alone():
    longest = 4  # Ragged's example 4 has 6 tokens, the most
    a, pa = release(MeanPool(), None, None, dataset=Ragged(), collate_fn=pad_to_longest)
    b, pb = release(MeanPool(), None, None, dataset=Ragged(drop=longest),
                    collate_fn=pad_to_longest)
    assert pa == pb == ["isolated"]
    assert float((a - b).norm()) <= C * (1 + 1e-4)


# ------------------------------------------------------------ 5. precision
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_clipping_does_not_depend_on_the_batch_in_low_precision(precision):
    """A large batch (the 1/B rounding grows with N) with small per-example norms, so few
    are clipped and a batch-dependent scale would show in the sum."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3000, 6, generator=g) * 0.1, torch.randint(0, 3, (3000,), generator=g)
    s, paths = sens(lambda: Plain(mlp()), x, y, precision=precision, max_grad_norm=50.0,
                    delta=1e-4)
    assert set(paths) == {"rows"}
    assert s <= 50.0 * (1 + 1e-3)


def test_true_precision_modes_train():
    for precision in ("bf16-true", "64-true"):
        a, paths = release(Plain(mlp()), X, Y, precision=precision, steps=2)
        assert torch.isfinite(a).all() and paths == ["rows", "rows"]


# ------------------------------------------------------------ refusals that remain
class RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(6))

    def forward(self, x):
        if self.training and getattr(self, "on", False):
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x


class LateWrite(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.net[0].on = trainer.global_step >= 1


def test_a_buffer_written_from_the_data_on_a_later_step_is_refused_before_that_update():
    m = Plain(nn.Sequential(RunningMean(), nn.Linear(6, 3)))
    with pytest.raises(PrivacyError, match="outlives the step"):
        release(m, X, Y, callbacks=[LateWrite()], steps=3)
    assert torch.equal(m.net[0].mean, torch.zeros(6))


# ------------------------------------------------------------ Hugging Face: labels=, padding, empty
class HFLabels(L.LightningModule):
    """The Hugging Face way: ``model(input_ids, attention_mask, labels=...)`` with -100 on
    the pads, whose mean runs over the batch's label tokens."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def training_step(self, batch, batch_idx):
        return self.hf(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


class Texts(torch.utils.data.Dataset):
    def __init__(self, n=8, drop=None, length=None):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            ids = torch.randint(1, 40, (length or 3 + i % 4,), generator=g)
            if i != drop:
                self.items.append(ids)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def hf_collate(items):
    T = max(len(i) for i in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for k, i in enumerate(items):
        ids[k, :len(i)], mask[k, :len(i)] = i, 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100)}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0))
    return HFLabels(m)


def test_the_hugging_face_labels_loss_on_padded_batches_stays_within_c():
    a, pa = release(gpt2(), None, None, dataset=Texts(), collate_fn=hf_collate)
    b, pb = release(gpt2(), None, None, dataset=Texts(drop=3), collate_fn=hf_collate)
    assert float((a - b).norm()) <= C * (1 + 1e-4)


def fixed_length(items):
    """Fixed-length blocks need no attention_mask (given one, the model branches on the
    whole batch's mask, and such steps run with every example alone)."""
    ids = torch.stack(items)
    return {"input_ids": ids, "labels": ids}


def test_the_hugging_face_labels_loss_at_fixed_length_takes_the_fast_path():
    a, pa = release(gpt2(), None, None, dataset=Texts(length=5), collate_fn=fixed_length)
    b, pb = release(gpt2(), None, None, dataset=Texts(length=5, drop=3), collate_fn=fixed_length)
    assert pa == pb == ["rows"]
    assert float((a - b).norm()) <= C * (1 + 1e-4)


def test_an_empty_poisson_batch_releases_noise_without_calling_the_model():
    """(1-q)^N per step: a tiny q makes empty batches the rule; GPT-2 never sees zero rows."""
    m = gpt2()
    spy = Spy()
    t = L.Trainer(callbacks=[DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=C, seed=3),
                             spy], max_steps=4, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    w0 = flat(m)
    t.fit(m, DataLoader(Texts(n=400, length=4), batch_size=1, collate_fn=hf_collate))
    assert "empty" in spy.paths and t.global_step == 4
    assert not torch.equal(flat(m), w0)  # noise was released on every step


# ------------------------------------------------------------ item 8: things users do
def test_bitfit_biases_only_trains_within_c():
    def make():
        m = Plain(mlp())
        for n, p in m.named_parameters():
            p.requires_grad_(n.endswith("bias"))
        return m
    s, paths = sens(make, X, Y)
    assert s <= C * (1 + 1e-4) and set(paths) == {"rows"}


def test_sixteen_bit_true_precision_trains():
    a, paths = release(Plain(mlp()), X, Y, precision="16-true")
    assert torch.isfinite(a).all() and paths == ["rows"]


@pytest.mark.parametrize("layer,match", [
    (lambda: nn.Bilinear(6, 6, 3), "Bilinear"),
    (lambda: nn.EmbeddingBag(20, 3), "EmbeddingBag"),
    (lambda: nn.Embedding(20, 3, sparse=True), "sparse=True"),
])
def test_layers_without_a_private_rule_are_refused_with_the_fix(layer, match):
    class One(Plain):
        def training_step(self, batch, batch_idx):
            x, y = batch
            if isinstance(self.net, nn.Bilinear):
                out = self.net(x, x)
            else:
                out = self.net(x.abs().long() % 20).reshape(len(x), -1)[:, :3]
            return F.cross_entropy(out, y)
    with pytest.raises(PrivacyError, match=match):
        fit_one = release(One(layer()), X, Y)
        del fit_one


class Adversarial(Plain):
    """Per-example adversarial training (FGSM on the input): an inner autograd.grad inside
    the step, which fires the per-example hooks too."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(F.cross_entropy(self.net(x), y, reduction="sum"), [x],
                                    create_graph=True)
        return F.cross_entropy(self.net(x + 0.1 * gx.sign()), y)


def test_per_example_adversarial_training_is_accepted_and_computed_alone():
    s, paths = sens(lambda: Adversarial(mlp()), X, Y)
    assert s <= C * (1 + 1e-4) and set(paths) == {"isolated"}


def bart():
    from transformers import BartConfig, BartForConditionalGeneration
    torch.manual_seed(0)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=16, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))


def test_bart_is_refused_naming_its_embeddings_and_trains_with_them_frozen():
    """BART's scaled word and learned position embeddings subclass nn.Embedding with their own
    forward: a clear refusal with the fix, not a vmap error; frozen, the rest trains."""
    with pytest.raises(PrivacyError, match="BartScaledWordEmbedding.*freeze it"):
        release(HFLabels(bart()), None, None, dataset=Texts(length=5), collate_fn=fixed_length)

    def frozen():
        m = bart()
        for mod in m.modules():
            if isinstance(mod, nn.Embedding):
                mod.requires_grad_(False)
        return HFLabels(m)
    a, paths = release(frozen(), None, None, dataset=Texts(length=5), collate_fn=fixed_length)
    b, _ = release(frozen(), None, None, dataset=Texts(length=5, drop=3), collate_fn=fixed_length)
    assert torch.isfinite(a).all() and len(paths) == 1
    assert float((a - b).norm()) <= C * (1 + 1e-4)
