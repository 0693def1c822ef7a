"""DP-SGD step: ours (book-keeping clipped sum) vs Opacus hooks + DPOptimizer vs non-private."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from scripts.harness import Bench, case


def peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated during ``fn`` (profiler memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@case("dp-step", target={"opacus-gsm+dpoptimizer": 1.0, "non-private": 2.5})
def dp_step(quick: bool) -> Bench:
    """One DP-SGD step (Papernot et al.'s tanh CNN, MNIST-sized batch): ours vs Opacus
    GradSampleModule + DPOptimizer (target <= 1.0) and vs a non-private step (<= 2.5)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    import optimizers
    from regularizers.dp import PerSampleGradients, privatize_
    from toolkit.models import TanhCNN

    B = 64 if quick else 512
    torch.manual_seed(0)
    x, y = torch.randn(B, 1, 28, 28), torch.randint(0, 10, (B,))
    base = TanhCNN()
    sigma, C = 1.0, 1.0

    ours_model = copy.deepcopy(base)
    ours_opt = optimizers.build_optimizer(ours_model, "sgd", lr=0.05)
    engine = PerSampleGradients(ours_model)
    gen = torch.Generator().manual_seed(0)

    def ours():
        ours_opt.zero_grad(set_to_none=True)
        with engine.capture():
            F.cross_entropy(ours_model(x), y).backward()
        privatize_(engine, C, sigma, B, generator=gen)
        ours_opt.step()

    gsm = GradSampleModule(copy.deepcopy(base))
    op_opt = DPOptimizer(optimizers.build_optimizer(gsm._module, "sgd", lr=0.05),
                         noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B)

    def opacus():
        op_opt.zero_grad(set_to_none=True)
        F.cross_entropy(gsm(x), y).backward()
        op_opt.step()

    plain_model = copy.deepcopy(base)
    plain_opt = optimizers.build_optimizer(plain_model, "sgd", lr=0.05)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain_model(x), y).backward()
        plain_opt.step()

    impls = {"ours": ours, "opacus-gsm+dpoptimizer": opacus, "non-private": plain}
    for fn in impls.values():  # warm so the profiler sees steady-state steps
        fn()
    extra = {f"peak_MB[{n}]": round(peak_bytes(fn) / 2 ** 20, 1) for n, fn in impls.items()}
    extra.update(batch=B, model="TanhCNN (26k params)")
    return Bench(impls, extra=extra)
