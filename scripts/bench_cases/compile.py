"""torch.compile speed-up of a training step (the modules' ``compile: true``)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from scripts.harness import Bench, case


@case("compile-lm-step", target=1.0)
def compile_lm_step(quick: bool) -> Bench:
    """Training step of the toolkit GPT 4x128 (batch 16, context 128) with AdamW and with
    Muon, compiled (ours) vs eager: ratio < 1 is the compile speed-up."""
    import optimizers
    from toolkit.models import GPT, GPTConfig

    T, B = (32, 4) if quick else (128, 16)
    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=65, block_size=T, n_layer=4, n_head=4, n_embd=128))
    x, y = torch.randint(0, 65, (B, T)), torch.randint(0, 65, (B, T))

    def step_fn(model, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).reshape(-1, 65), y.reshape(-1)).backward()
            opt.step()
        return step

    impls = {}
    for name in ("adamw", "muon"):
        for compiled in (True, False):
            m = copy.deepcopy(base)
            if compiled:
                m.compile()
            opt = optimizers.build_optimizer(m, name)
            impls[f"{name}-{'compiled' if compiled else 'eager'}"] = step_fn(m, opt)
    # the harness compares the first entry (compiled AdamW) with each other one
    return Bench(impls, extra={"batch": B, "context": T}, warmup=2)
