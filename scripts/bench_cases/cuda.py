"""GPU versions of the benches that matter there (``python -m scripts.gpu_check`` runs them;
each registers only a builder, so listing cases on a CPU machine costs nothing).

``cuda-muon-step``: ``optimizers.Muon`` (ns_matmul="auto": bf16 products on sm_80+) vs
``muon.SingleDeviceMuonWithAuxAdam`` and ``torch.optim.Muon`` + AdamW on GPT-2 small shapes,
as ``muon-step`` on CPU. ``cuda-dp-lm-step``: ``dp-lm-step-16`` on CUDA (ours with a CUDA noise
generator vs Opacus hooks, ghost clipping and a non-private step). ``cuda-compile-lm-step``: the
4x128 GPT's bf16-autocast training step compiled vs eager. Every timed call ends with
``torch.cuda.synchronize()``, so the harness times finished GPU work.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from scripts.harness import Bench, case


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _gpt(quick: bool, grads: bool = True):
    from toolkit.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    cfg = (GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=256) if quick
           else GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    model = GPT(cfg).cuda()
    if grads:
        g = torch.Generator(device="cuda").manual_seed(1)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, device="cuda") * 1e-3
    return model


@case("cuda-muon-step", target=1.0)
def cuda_muon_step(quick: bool) -> Bench:
    """optimizers.Muon step on CUDA vs muon-optimizer and torch.optim.Muon+AdamW (GPT-2 small)."""
    import muon

    import optimizers
    ours = optimizers.build_optimizer(_gpt(quick), "muon", lr=0.02, weight_decay=0.1, adam_lr=3e-4)
    model = _gpt(quick)
    groups = [{"params": g["params"], "use_muon": g["use_muon"], "weight_decay": g["weight_decay"],
               "lr": 0.02 if g["use_muon"] else 3e-4} for g in optimizers.param_groups(model, 0.1)]
    pkg = muon.SingleDeviceMuonWithAuxAdam(groups)
    model = _gpt(quick)
    groups = optimizers.param_groups(model, 0.1)
    m = torch.optim.Muon([p for g in groups if g["use_muon"] for p in g["params"]], lr=0.02,
                         weight_decay=0.1)
    a = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                           for g in groups if not g["use_muon"]], lr=3e-4, betas=(0.9, 0.95))
    return Bench({"optimizers.Muon": _synced(ours.step), "muon.SingleDeviceMuonWithAuxAdam":
                  _synced(pkg.step), "torch.optim.Muon+AdamW": _synced(lambda: (m.step(), a.step()))},
                 extra={"device": torch.cuda.get_device_name(), "ns_matmul_auto":
                        optimizers.newton_schulz._resolve("auto", torch.device("cuda"))}, warmup=2)


@case("cuda-dp-lm-step", target={"opacus-hooks": 0.8, "opacus-ghost": 0.8, "non-private": 1.4})
def cuda_dp_lm_step(quick: bool) -> Bench:
    """DP-SGD step of the 4x128 GPT on CUDA: ours vs Opacus hooks / ghost clipping, non-private."""
    from regularizers.dp import PerSampleGradients, privatize_
    from scripts.bench_cases.dp_lm import _steps, _toolkit_gpt
    torch.manual_seed(0)
    T, B = (32, 4) if quick else (128, 16)
    base, V = _toolkit_gpt(True)
    base = base.cuda()
    x, y = torch.randint(0, V, (B, T), device="cuda"), torch.randint(0, V, (B, T), device="cuda")
    refs, failed, _ = _steps(base, x, y, V)  # the CPU case's references, built on CUDA tensors

    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = PerSampleGradients(model)
    engine.skip_weight_grads = True
    gen = torch.Generator(device="cuda").manual_seed(0)  # noise drawn on the gradients' device

    def ours():
        opt.zero_grad(set_to_none=True)
        with engine.capture(batch_size=B):
            F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1)).backward()
        privatize_(engine, 1.0, 1.0, B, generator=gen)
        opt.step()

    impls = {"ours": _synced(ours), **{k: _synced(f) for k, f in refs.items() if k != "ours"}}
    extra = {"device": torch.cuda.get_device_name(), "batch": B, "context": T,
             **{f"failed[{k}]": why for k, why in failed.items()}}
    return Bench(impls, extra=extra, warmup=2)


@case("cuda-compile-lm-step", target=1.0)
def cuda_compile_lm_step(quick: bool) -> Bench:
    """bf16-autocast training step of the 4x128 GPT on CUDA, compiled (ours) vs eager."""
    import optimizers
    from toolkit.models import GPT, GPTConfig
    T, B = (64, 8) if quick else (256, 32)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=65, block_size=T, n_layer=4, n_head=4, n_embd=128)).cuda()
    x, y = torch.randint(0, 65, (B, T), device="cuda"), torch.randint(0, 65, (B, T), device="cuda")
    impls = {}
    for compiled in (True, False):
        m = copy.deepcopy(base)
        if compiled:
            m.compile()
        opt = optimizers.build_optimizer(m, "muon")

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", torch.bfloat16):
                loss = F.cross_entropy(m(x).reshape(-1, 65), y.reshape(-1))
            loss.backward()
            opt.step()
        impls["muon-compiled" if compiled else "muon-eager"] = _synced(step)
    return Bench(impls, extra={"device": torch.cuda.get_device_name(), "batch": B, "context": T},
                 warmup=3)
