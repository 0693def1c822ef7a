"""BandMF noise (regularizers/dp/bandmf.py) vs DP-SGD's independent noise, per step.

Both draw one flat Gaussian vector of a model's size with the same kind of generator;
BandMF also runs the b-band forward substitution over its b-1 saved vectors. The issue's
target is a whole training step within 1.1x of DP-SGD for b <= 4; this measures the noise
part alone (informational: it is all of the extra work), and dp-bandmf-step-b4 the step.
"""
from __future__ import annotations

import torch

from scripts.harness import Bench, case


def _noise_bench(bands: int, quick: bool) -> Bench:
    from regularizers.dp.bandmf import BandedNoise, strategy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    numel = (1 << 20) if quick else 25_000_000  # 25M: a GPT-2-small-ish slice, 100 MB fp32
    gen = torch.Generator(device=device).manual_seed(0)
    noise = BandedNoise(strategy("bsr", bands), numel, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def bandmf():
        noise(1.0, gen)
        sync()

    def independent():
        torch.normal(0.0, 1.0, (numel,), generator=gen, device=device, dtype=torch.float32)
        sync()

    extra = {"numel": numel, "device": torch.cuda.get_device_name() if device == "cuda"
             else "cpu", "state_MB": round(noise.history.numel() * 4 / 2 ** 20, 1)}
    return Bench({f"bandmf-b{bands}": bandmf, "independent": independent}, extra=extra)


@case("dp-bandmf-noise-b2")
def bandmf_noise_b2(quick: bool) -> Bench:
    """BandMF noise with 2 bands vs independent Gaussian noise (model-sized buffer)."""
    return _noise_bench(2, quick)


@case("dp-bandmf-noise-b4")
def bandmf_noise_b4(quick: bool) -> Bench:
    """BandMF noise with 4 bands vs independent Gaussian noise (model-sized buffer)."""
    return _noise_bench(4, quick)


@case("dp-bandmf-step-b4", target=1.1)
def bandmf_step_b4(quick: bool) -> Bench:
    """A whole DP-SGD step (MLP, 3.7M params, batch 64) with 4-band BandMF noise added
    after the clipped sum vs the same step with DP-SGD's independent noise (target 1.1)."""
    import torch.nn.functional as F
    from torch import nn

    import optimizers
    from regularizers.dp import PerSampleGradients, privatize_
    from regularizers.dp.bandmf import BandedNoise, strategy

    torch.manual_seed(0)
    B, width = (16, 256) if quick else (64, 2048)
    x, y = torch.randn(B, 784), torch.randint(0, 10, (B,))
    sigma, C = 1.0, 1.0

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width // 2),
                              nn.Tanh(), nn.Linear(width // 2, 10))
        return model, optimizers.build_optimizer(model, "sgd", lr=0.05), PerSampleGradients(model)

    (m1, o1, e1), (m2, o2, e2) = build(), build()
    params = [p for p in m1.parameters()]
    numel = sum(p.numel() for p in params)
    noise = BandedNoise(strategy("bsr", 4), numel)
    gen = torch.Generator().manual_seed(0)

    def bandmf():
        o1.zero_grad(set_to_none=True)
        with e1.capture():
            F.cross_entropy(m1(x), y).backward()
        privatize_(e1, C, 0.0, B, generator=gen)  # clipped mean, no noise of its own
        flat, i = noise(sigma * C, gen), 0
        for p in params:  # the extra pass a wired-in version would fold into noisy_mean_
            p.grad.add_(flat[i:i + p.numel()].view_as(p), alpha=1 / B)
            i += p.numel()
        o1.step()

    def dpsgd():
        o2.zero_grad(set_to_none=True)
        with e2.capture():
            F.cross_entropy(m2(x), y).backward()
        privatize_(e2, C, sigma, B, generator=gen)
        o2.step()

    return Bench({"dpsgd+bandmf-b4": bandmf, "dpsgd": dpsgd},
                 extra={"params": numel, "batch": B, "device": "cpu"})
