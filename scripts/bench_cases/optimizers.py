"""Optimizer step time of the matrix optimizers against their references.

``muon-step``: ``optimizers.Muon`` vs ``muon.SingleDeviceMuonWithAuxAdam`` and vs
``torch.optim.Muon`` + ``torch.optim.AdamW`` on the parameters of a 12-layer, 768-wide GPT
(GPT-2 small shapes, vocab 50304; ``--quick``: 4 layers, 256 wide, vocab 65). One timed
repetition is one ``step()`` with fixed random gradients. ``auon-step``: AuON vs Muon.
"""
from __future__ import annotations

import muon
import torch
from bench import Bench, case

import optimizers
from toolkit.models.gpt import GPT, GPTConfig


def _gpt(quick: bool) -> GPT:
    torch.manual_seed(0)
    cfg = (GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=256) if quick
           else GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    model = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model


def _extra(model: GPT) -> dict:
    groups = optimizers.param_groups(model)
    n_hidden = sum(p.numel() for g in groups if g["use_muon"] for p in g["params"])
    return {"params": sum(p.numel() for p in model.parameters()), "muon_params": n_hidden,
            "threads": torch.get_num_threads()}


def _ours(quick: bool, name: str = "muon"):
    model = _gpt(quick)
    opt = optimizers.build_optimizer(model, name, lr=0.02, weight_decay=0.1, adam_lr=3e-4)
    return model, opt.step


def _reference_muon_pkg(quick: bool):
    model = _gpt(quick)
    groups = [{"params": g["params"], "use_muon": g["use_muon"], "weight_decay": g["weight_decay"],
               "lr": 0.02 if g["use_muon"] else 3e-4} for g in optimizers.param_groups(model, 0.1)]
    return muon.SingleDeviceMuonWithAuxAdam(groups).step


def _reference_torch(quick: bool):
    model = _gpt(quick)
    groups = optimizers.param_groups(model, 0.1)
    hidden = [p for g in groups if g["use_muon"] for p in g["params"]]
    rest = [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in groups if not g["use_muon"]]
    m = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1)
    a = torch.optim.AdamW(rest, lr=3e-4, betas=(0.9, 0.95), eps=1e-10)

    def step():
        m.step()
        a.step()

    return step


@case("muon-step", target=1.0)
def muon_step(quick: bool) -> Bench:
    """optimizers.Muon step vs muon-optimizer and torch.optim.Muon+AdamW (GPT-2 small params)."""
    model, ours = _ours(quick)
    return Bench({"optimizers.Muon": ours,
                  "muon.SingleDeviceMuonWithAuxAdam": _reference_muon_pkg(quick),
                  "torch.optim.Muon+AdamW": _reference_torch(quick)}, extra=_extra(model))


@case("auon-step", target=0.5)
def auon_step(quick: bool) -> Bench:
    """AuON (linear time) step vs optimizers.Muon step on the same parameter set."""
    model, ours = _ours(quick, "auon")
    return Bench({"optimizers.AuON": ours, "optimizers.HybridAuON": _ours(quick, "hybrid_auon")[1],
                  "optimizers.Muon": _ours(quick, "muon")[1]}, extra=_extra(model))
