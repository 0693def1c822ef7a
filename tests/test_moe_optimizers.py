"""Every registry matrix optimizer steps a 3-D expert stack (E, fan_out, fan_in) exactly as E
independent (fan_out, fan_in) matrices, and not as the flattened (E, fan_out * fan_in) conv
reading; the factory flags stacks from MoEMLP's ``expert_stacks``."""
import pytest
import torch
from torch import nn

import optimizers
from optimizers import Muon, param_groups
from optimizers.muonpp import hidden_spectral_ratios
from toolkit.models import GPT, GPTConfig

MATRIX = sorted(n for n, b in optimizers.OPTIMIZERS.items()
                if isinstance(getattr(b, "optimizer_class", None), type)
                and issubclass(b.optimizer_class, Muon))
# HyperP both ways: each expert's own initial norm as radius, and the muP radius sqrt(fan_out).
CASES = [(n, {}) for n in MATRIX] + [("hyperp", {"radius_scale": 1.0})]
E, OUT, IN = 3, 8, 12


def run(name, kw, stacked: bool | None, steps=3):
    """``stacked=None``: E separate matrices; True/False: one (E, OUT, IN) stack so flagged."""
    torch.manual_seed(0)
    w0 = torch.randn(E, OUT, IN) * torch.tensor([0.5, 1.0, 2.0]).view(E, 1, 1)  # unequal norms
    if stacked is None:
        params = [nn.Parameter(w0[e].clone()) for e in range(E)]
        groups = [{"params": params, "use_muon": True}]
    else:
        params = [nn.Parameter(w0.clone())]
        groups = [{"params": params, "use_muon": True, "stacked": [stacked]}]
    ns = {} if "ns_dtype" in optimizers.OPTIMIZERS[name].refused else {"ns_dtype": "float32"}
    opt = optimizers.build_optimizer(groups, name, lr=0.05, weight_decay=0.1, **ns, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grad = torch.randn(E, OUT, IN, generator=g)
        for e, p in enumerate(params):
            p.grad = grad[e].clone() if stacked is None else grad.clone()
        opt.step()
    return torch.stack(params) if stacked is None else params[0].detach()


@pytest.mark.parametrize("name,kw", CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_stack_steps_like_separate_matrices(name, kw):
    separate, stack = run(name, kw, None), run(name, kw, True)
    torch.testing.assert_close(stack, separate.detach(), atol=1e-5, rtol=1e-5)
    flat = run(name, kw, False)  # read as one (E, OUT*IN) matrix, the conv convention
    assert (flat - separate).abs().max() > 1e-3


def test_factory_flags_expert_stacks_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, bias=True,
                          moe={"n_experts": 4, "shared_expert": True, "expert_hidden": 8}))
    groups = {g["kind"]: g for g in param_groups(model)}
    hidden = groups["hidden"]
    flagged = {n for n, s in zip(hidden["param_names"], hidden["stacked"]) if s}
    assert flagged == {f"blocks.{i}.mlp.{w}" for i in (0, 1) for w in ("w_in", "w_out")}
    assert {"blocks.0.mlp.b_in", "blocks.0.mlp.b_out"} <= set(groups["bias"]["param_names"])
    opt = optimizers.build_optimizer(model, "hyperp")
    w_in = model.blocks[0].mlp.w_in
    assert opt.fans(w_in) == (8, 16) and opt.fans(model.blocks[0].mlp.w_out) == (16, 8)
    exact = torch.linalg.matrix_norm(w_in.detach(), ord=2).max().item() / (8 / 16) ** 0.5
    assert hidden_spectral_ratios(model)["blocks.0.mlp.w_in"] == pytest.approx(exact, rel=1e-6)


def test_stack_flags_are_checked_and_survive_a_checkpoint():
    p = nn.Parameter(torch.randn(4, 5))
    with pytest.raises(ValueError, match="stacked; only 3-D"):
        Muon([{"params": [p], "use_muon": True, "stacked": [True]}])
    with pytest.raises(ValueError, match="one flag per parameter"):
        Muon([{"params": [p], "use_muon": True, "stacked": [True, False]}])
    q = nn.Parameter(torch.randn(E, OUT, IN))
    q.grad = torch.randn_like(q)
    opt = optimizers.build_optimizer([{"params": [q], "use_muon": True, "stacked": [True]}],
                                     "hyperp")
    opt.step()
    assert opt.state[q]["radius"].shape == (E, 1, 1)  # one sphere per expert
    again = optimizers.build_optimizer([{"params": [q], "use_muon": True, "stacked": [True]}],
                                       "hyperp")
    again.load_state_dict(opt.state_dict())
    assert again.fans(q) == (OUT, IN) and again.param_groups[0]["stacked"] == [True]
