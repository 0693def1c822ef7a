"""Optimizer step time of the matrix optimizers against their references.

``muon-step``: ``optimizers.Muon`` vs ``muon.SingleDeviceMuonWithAuxAdam`` and vs
``torch.optim.Muon`` + ``torch.optim.AdamW`` on the parameters of a 12-layer, 768-wide GPT
(GPT-2 small shapes, vocab 50304; ``--quick``: 4 layers, 256 wide, vocab 65). One timed
repetition is one ``step()`` with fixed random gradients. ``optimizers.Muon`` runs with its
default ``ns_matmul="auto"``: on a CPU without bf16 units its bf16 products are fp32 GEMMs
(see optimizers/newton_schulz.py); ``muon-step-bf16`` times it with bf16 GEMMs, the
references' own kernel, to show what that choice buys. ``auon-step`` /
``hybrid-auon-step``: AuON / Hybrid-AuON vs Muon on the same parameters. ``lm-train-step``:
a whole training step (forward, backward, step) of the quickstart 4x128 char GPT with Muon
vs AdamW, i.e. what Newton-Schulz adds to wall-clock per step on this model.
"""
from __future__ import annotations

import muon
import torch
from scripts.harness import Bench, case

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


def _ours(quick: bool, name: str = "muon", **kw):
    model = _gpt(quick)
    opt = optimizers.build_optimizer(model, name, lr=0.02, weight_decay=0.1, adam_lr=3e-4, **kw)
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


@case("muon-step-bf16")
def muon_step_bf16(quick: bool) -> Bench:
    """optimizers.Muon with bf16 GEMMs (ns_matmul=bf16) vs torch.optim.Muon+AdamW: same kernel."""
    model, ours = _ours(quick, ns_matmul="bf16")
    return Bench({"optimizers.Muon(ns_matmul=bf16)": ours,
                  "torch.optim.Muon+AdamW": _reference_torch(quick)}, extra=_extra(model))


@case("auon-step", target=0.5)
def auon_step(quick: bool) -> Bench:
    """AuON (linear time) step vs optimizers.Muon step on the same parameter set."""
    model, ours = _ours(quick, "auon")
    return Bench({"optimizers.AuON": ours, "optimizers.Muon": _ours(quick, "muon")[1]},
                 extra=_extra(model))


@case("hybrid-auon-step", target=0.5)
def hybrid_auon_step(quick: bool) -> Bench:
    """Hybrid-AuON (one Newton-Schulz iteration) step vs optimizers.Muon step (five)."""
    model, ours = _ours(quick, "hybrid_auon")
    return Bench({"optimizers.HybridAuON": ours, "optimizers.Muon": _ours(quick, "muon")[1]},
                 extra=_extra(model))


def _train_step(name: str, lr: float, **kw):
    """One full training step (forward, backward, optimizer) of the quickstart 4x128 char GPT."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128))
    opt = optimizers.build_optimizer(model, name, lr=lr, weight_decay=0.1, **kw)
    x = torch.randint(0, 65, (32, 129), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad()
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()

    return step


@case("lm-train-step", target=1.15)
def lm_train_step(quick: bool) -> Bench:
    """Full training step (fwd+bwd+step) of the quickstart 4x128 LM: Muon (bf16 NS) vs AdamW."""
    return Bench({"muon": _train_step("muon", 0.02, adam_lr=0.01),
                  "adamw": _train_step("adamw", 0.01)})


@case("lm-train-step-fp32ns", target=1.15)
def lm_train_step_fp32(quick: bool) -> Bench:
    """Same, Muon with ns_dtype=float32 (fast on CPUs without bf16 matmul units) vs AdamW."""
    return Bench({"muon-fp32-ns": _train_step("muon", 0.02, adam_lr=0.01, ns_dtype="float32"),
                  "adamw": _train_step("adamw", 0.01)})


@case("lm-train-step-auon", target=1.15)
def lm_train_step_auon(quick: bool) -> Bench:
    """Same, AuON vs AdamW."""
    return Bench({"auon": _train_step("auon", 0.2, adam_lr=0.01),
                  "adamw": _train_step("adamw", 0.01)})
