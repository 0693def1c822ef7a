"""Fake quantization and the RCO bit-width search against naive computations."""
import lightning as L
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import write_tiny_lm_checkpoint
from toolkit import TextDataModule
from toolkit.models.quant import BitChoiceLinear, bit_costs, fake_quantize, wrap_linears
from toolkit.modules.bitsearch import BitWidthSearch


def _naive_quantize(w, bits):
    levels = 2 ** (bits - 1) - 1
    out = torch.empty_like(w)
    for i in range(w.shape[0]):
        s = max(abs(float(v)) for v in w[i]) / levels
        for j in range(w.shape[1]):
            out[i, j] = min(max(round(float(w[i, j]) / s), -levels), levels) * s
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fake_quantize_matches_naive_loop_and_passes_gradient(bits):
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    q = fake_quantize(w, bits)
    torch.testing.assert_close(q, _naive_quantize(w.detach(), bits))
    assert all(len(torch.unique(q[i].detach())) <= 2 ** bits - 1 for i in range(5))
    (q * torch.arange(35.0, dtype=torch.float64).view(5, 7)).sum().backward()
    torch.testing.assert_close(w.grad, torch.arange(35.0, dtype=torch.float64).view(5, 7))


def test_bit_choice_linear_mixes_quantized_weights_and_its_probability_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4).double().requires_grad_(False)
    layer = BitChoiceLinear(lin, (2, 4, 8))
    x = torch.randn(3, 6, dtype=torch.float64)
    p = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    layer.set_probs(p)
    out = layer(x)
    ref = sum(p[k] * F.linear(x, _naive_quantize(lin.weight, b), lin.bias)
              for k, b in enumerate((2, 4, 8)))
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    for k in range(3):  # central finite differences of the loss in p_k
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = 1e-6
        layer.set_probs(p.detach() + e)
        up = layer(x).square().sum()
        layer.set_probs(p.detach() - e)
        down = layer(x).square().sum()
        assert float(p.grad[k]) == pytest.approx(float(up - down) / 2e-6, rel=1e-6)
    layer.set_choice(None)
    torch.testing.assert_close(layer(x), lin(x))


def test_bit_costs_give_the_parameter_weighted_average():
    model = torch.nn.Sequential(torch.nn.Linear(8, 24), torch.nn.Linear(24, 8), torch.nn.Linear(8, 8))
    layers = wrap_linears(model, (2, 3, 4, 8), skip=())
    costs, g = bit_costs(layers)
    numel = torch.tensor([192.0, 192.0, 64.0])
    for choice in ([0, 1, 3], [2, 2, 2], [3, 0, 1]):
        bits = torch.tensor([(2, 3, 4, 8)[k] for k in choice], dtype=torch.float64)
        avg = float((bits * numel).sum() / numel.sum())
        got = float(costs[torch.arange(3), torch.tensor(choice)].sum() / (numel.sum() / g))
        assert got == pytest.approx(avg, rel=1e-12)


@pytest.mark.parametrize("method", ["rco", "penalty"])
def test_bit_search_runs_and_rco_meets_the_budget_exactly(method, tmp_path):
    ckpt = write_tiny_lm_checkpoint(tmp_path / "tiny.ckpt")
    module = BitWidthSearch(checkpoint=str(ckpt), avg_bits=4.0, method=method, lr=0.1)
    dm = TextDataModule(block_size=32, batch_size=4, val_blocks=8)
    before = module.logits.detach().clone()
    L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, limit_val_batches=2,
              val_check_interval=3, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    assert not torch.equal(before, module.logits.detach())
    choice = module.assignment()
    numel = torch.tensor([float(layer.linear.weight.numel()) for _, layer in module.layers])
    bits = torch.tensor([float(module.hparams.bits[int(k)]) for k in choice])
    assert float((bits * numel).sum() / numel.sum()) == 4.0  # the DP's exact-budget finish
    assert module.final["avg_bits"] == 4.0
    if method == "rco":
        assert module.expected_avg_bits() == pytest.approx(4.0, rel=1e-6)


def test_bit_search_refuses_a_missing_checkpoint_and_an_infeasible_budget(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipes/quickstart.yaml"):
        BitWidthSearch(checkpoint=str(tmp_path / "nothing"))
    ckpt = write_tiny_lm_checkpoint(tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match="strictly between 2.0 and 8.0"):
        BitWidthSearch(checkpoint=str(ckpt), avg_bits=8.0)


class _RunsCode:
    """Unpickling this calls a function: what a hostile checkpoint does."""
    def __reduce__(self):
        return (print, ("a checkpoint ran code",))


def test_bit_search_loads_checkpoints_without_running_their_code(tmp_path, capsys):
    ckpt = write_tiny_lm_checkpoint(tmp_path / "tiny.ckpt")
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["payload"] = _RunsCode()
    torch.save(state, tmp_path / "hostile.ckpt")
    with pytest.raises(ValueError, match="would run code"):
        BitWidthSearch(checkpoint=str(tmp_path / "hostile.ckpt"))
    assert "ran code" not in capsys.readouterr().out
