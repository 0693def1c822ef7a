"""Optimizer step time of the matrix optimizers against their references.

``muon-step``: ``optimizers.Muon`` vs ``muon.SingleDeviceMuonWithAuxAdam`` and vs
``torch.optim.Muon`` + ``torch.optim.AdamW`` on the parameters of a 12-layer, 768-wide GPT
(GPT-2 small shapes, vocab 50304; ``--quick``: 4 layers, 256 wide, vocab 65). One timed
repetition is one ``step()`` with fixed random gradients. Equal kernels: ``optimizers.Muon``
runs with ``ns_matmul="bf16"`` (the muon package's own iteration: bf16 GEMMs, quintic, 5
steps), as both references do on every CPU; ``extra["kernels"]`` records what each side ran,
read off the objects, with the CPU model and its bf16 flags and the host load.
``muon-step-addmm``: ``ns_matmul="addmm"`` (torch.optim.Muon's own form of the iteration,
bitwise) vs ``torch.optim.Muon`` + AdamW. ``muon-step-auto``: the default ``ns_matmul="auto"``
(bf16 GEMMs on bf16-capable CPUs, else fp32 GEMMs of the bf16 operands: not the references'
kernel there, as ``kernels`` then says). ``auon-step`` / ``hybrid-auon-step``: AuON /
Hybrid-AuON vs Muon on the same parameters. ``lm-train-step``: a whole training step
(forward, backward, step) of the quickstart 4x128 char GPT with Muon vs AdamW, i.e. what
Newton-Schulz adds to wall-clock per step on this model.
"""
from __future__ import annotations

import inspect
import os
import platform
from pathlib import Path

import muon
import torch
from scripts.harness import Bench, case

import optimizers
from optimizers import newton_schulz
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
            "threads": torch.get_num_threads(), "cpu": _cpu(),
            "load_avg_1_5_15_at_setup": [round(x, 2) for x in os.getloadavg()]}


def _cpu() -> str:
    """CPU model and the flags that decide bf16 GEMM speed (lscpu's "Model name"/"Flags")."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                 if ln.startswith("model name")), platform.processor() or "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith("flags")), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{name}, {os.cpu_count()} CPUs, bf16 flags: {', '.join(bf16) or 'none'}"


def _ours_kernel(opt) -> str:
    g = next(g for g in opt.param_groups if g["use_muon"])
    if g["ns_dtype"] != "bfloat16":
        return f"{g['ns_dtype']} GEMMs, {g['ns_coefficients']}, {g['ns_steps']} steps"
    matmul = newton_schulz._resolve(g["ns_matmul"], torch.device("cpu"))
    form = {"bf16": "bf16 GEMMs, the muon package's form",
            "fp32": "fp32 GEMMs of bf16 operands rounded to bf16 (NOT the references' kernel)",
            "addmm": "bf16 GEMMs, torch.optim.Muon's addmm form"}[matmul]
    return (f"{form} (ns_matmul={g['ns_matmul']!r} -> {matmul!r}), {g['ns_coefficients']}, "
            f"{g['ns_steps']} steps")


def _kernels(ours, **refs) -> dict:
    """What each side's Newton-Schulz ran, read off the objects."""
    pkg_steps = inspect.signature(muon.muon_update).parameters["ns_steps"].default
    out = {"ours": _ours_kernel(ours)}
    if "pkg" in refs:
        out["muon.SingleDeviceMuonWithAuxAdam"] = (
            "bf16 GEMMs (muon.zeropower_via_newtonschulz5: G.bfloat16()), quintic "
            f"(3.4445, -4.7750, 2.0315), {pkg_steps} steps")
    if "torch" in refs:
        d = refs["torch"].defaults
        out["torch.optim.Muon"] = (f"bf16 GEMMs, addmm form (_zeropower_via_newtonschulz: "
                                   f"grad.bfloat16()), {d['ns_coefficients']}, {d['ns_steps']} steps")
    return out


def _ours(quick: bool, name: str = "muon", **kw):
    model = _gpt(quick)
    opt = optimizers.build_optimizer(model, name, lr=0.02, weight_decay=0.1, adam_lr=3e-4, **kw)
    _ours.last = opt
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

    step.muon = m
    return step


def _vs_references(quick: bool, label: str, refs: tuple[str, ...] = ("pkg", "torch"),
                   **kw) -> Bench:
    model, ours = _ours(quick, **kw)
    opt = _ours.last
    impls = {label: ours}
    if "pkg" in refs:
        impls["muon.SingleDeviceMuonWithAuxAdam"] = _reference_muon_pkg(quick)
    if "torch" in refs:
        impls["torch.optim.Muon+AdamW"] = torch_ref = _reference_torch(quick)
    kernels = _kernels(opt, **({"pkg": True} if "pkg" in refs else {}),
                       **({"torch": torch_ref.muon} if "torch" in refs else {}))
    return Bench(impls, extra={**_extra(model), "kernels": kernels})


@case("muon-step", target=1.0)
def muon_step(quick: bool) -> Bench:
    """optimizers.Muon (ns_matmul=bf16: the references' kernel) vs muon-optimizer and
    torch.optim.Muon+AdamW (GPT-2 small params)."""
    return _vs_references(quick, "optimizers.Muon", ns_matmul="bf16")


@case("muon-step-addmm", target=1.0)
def muon_step_addmm(quick: bool) -> Bench:
    """optimizers.Muon with ns_matmul=addmm (torch.optim.Muon's iteration, bitwise) vs
    torch.optim.Muon+AdamW."""
    return _vs_references(quick, "optimizers.Muon(ns_matmul=addmm)", ("torch",), ns_matmul="addmm")


@case("muon-step-auto")
def muon_step_auto(quick: bool) -> Bench:
    """optimizers.Muon with the default ns_matmul=auto vs the references (kernels recorded)."""
    return _vs_references(quick, "optimizers.Muon(ns_matmul=auto)")


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
