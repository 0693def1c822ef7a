"""k-mixup training step vs mixup, and the matching time as k grows."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from scripts.harness import Bench, case

from regularizers import kmixup_batch, kmixup_partners, mixup_batch
from toolkit.models import SmallCNN


def _median_ms(fn, reps: int = 3) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 2)


@case("kmixup-step", target=1.10)
def kmixup_step(quick: bool) -> Bench:
    """SmallCNN training step on a 512 batch: k-mixup (k=32, exact OT matching) / mixup."""
    torch.manual_seed(0)
    n, k = 512, 32
    model = SmallCNN(1, 10, 8 if quick else 16, "batch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    g = torch.Generator().manual_seed(0)

    def step(mixed):
        xm, ym = mixed()
        loss = F.cross_entropy(model(xm), ym)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ours = lambda: step(lambda: kmixup_batch(x, y, k, 1.0, 10, g))
    ref = lambda: step(lambda: mixup_batch(x, y, 1.0, 10, g))
    extra = {}
    for kk in ([1, 8, 32, 128] if quick else [1, 2, 8, 32, 64, 128, 256, 512]):
        xb = torch.randn(max(n, 2 * kk), 784)
        extra[f"matching ms, batch {len(xb)}, k={kk} (lsa | emd)"] = (
            f"{_median_ms(lambda: kmixup_partners(xb, kk, g, solver='lsa'))} | "
            f"{_median_ms(lambda: kmixup_partners(xb, kk, g, solver='emd'))}")
    return Bench({"kmixup-k32": ours, "mixup": ref}, extra=extra)
