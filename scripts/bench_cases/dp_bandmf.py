"""BandMF noise (regularizers/dp/bandmf.py) vs DP-SGD's independent noise, per step.

Both draw one flat Gaussian vector of a model's size with the same kind of generator;
BandMF also runs the b-band forward substitution over its b-1 saved vectors. The issue's
target is a whole training step within 1.1x of DP-SGD for b <= 4; this measures the noise
part alone (informational: it is all of the extra work), and ``bandmf-step`` the step as
``DPSGD(noise="bandmf")`` runs it (``privatize_`` with the callback's ``BandMF.draw``).
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
        noise.draw_(1.0, gen)
        sync()

    def independent():
        torch.normal(0.0, 1.0, (numel,), generator=gen, device=device, dtype=torch.float32)
        sync()

    extra = {"numel": numel, "device": torch.cuda.get_device_name() if device == "cuda"
             else "cpu", "state_MB": round(noise.rows.numel() * 4 / 2 ** 20, 1)}
    return Bench({f"bandmf-b{bands}": bandmf, "independent": independent}, extra=extra)


@case("dp-bandmf-noise-b2")
def bandmf_noise_b2(quick: bool) -> Bench:
    """BandMF noise with 2 bands vs independent Gaussian noise (model-sized buffer)."""
    return _noise_bench(2, quick)


@case("dp-bandmf-noise-b4")
def bandmf_noise_b4(quick: bool) -> Bench:
    """BandMF noise with 4 bands vs independent Gaussian noise (model-sized buffer)."""
    return _noise_bench(4, quick)


def cpu_model() -> dict:
    """What the CPU figures ran on (lscpu's model name and the bf16 flag)."""
    import platform
    import subprocess
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        out = ""
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines()
                 if ln.startswith("Model name")), platform.processor())
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in out, "threads": torch.get_num_threads()}


@case("bandmf-step", target={"gaussian": 1.1})
def bandmf_step(quick: bool) -> Bench:
    """One DPSGD step (MLP, 3.7M params, batch 64) with BandMF noise, b=4 (ours) and b=2,
    vs DP-SGD's independent noise (target <= 1.1), the callback's own noise path; and the
    previous design (noise copied out, then added to .grad in an extra pass)."""
    import torch.nn.functional as F
    from torch import nn

    import optimizers
    from regularizers.dp import PerSampleGradients, privatize_
    from regularizers.dp.bandmf import BandedNoise
    from regularizers.dp.correlated import BandMF
    from scripts.bench_cases.dp import peak_bytes

    B, width = (16, 256) if quick else (64, 2048)
    x, y = torch.randn(B, 784, generator=torch.Generator().manual_seed(0)), \
        torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(1))
    sigma, C = 1.0, 1.0

    def build(bands, extra_pass=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width // 2),
                              nn.Tanh(), nn.Linear(width // 2, 10))
        noise = None
        if bands:
            state = BandMF(bands, "bsr")
            state.plan(float("inf"))
            noise = state.draw
            if extra_pass:
                state.noise = BandedNoise(state.coefs, sum(p.numel() for p in model.parameters()))
        opt = optimizers.build_optimizer(model, "sgd", lr=0.05)
        engine = PerSampleGradients(model)
        gen = torch.Generator().manual_seed(0)

        def step():
            opt.zero_grad(set_to_none=True)
            with engine.capture():
                F.cross_entropy(model(x), y).backward()
            if extra_pass:  # last session's design: clipped mean, then the noise added
                privatize_(engine, C, 0.0, B, generator=gen)
                flat, i = state.noise(sigma * C, gen), 0  # a copy the caller owns
                for p in model.parameters():
                    p.grad.add_(flat[i:i + p.numel()].view_as(p), alpha=1 / B)
                    i += p.numel()
            else:
                privatize_(engine, C, sigma, B, generator=gen, noise=noise)
            opt.step()
        return step, sum(p.numel() for p in model.parameters())

    impls = {}
    for name, bands in (("bandmf-b4", 4), ("gaussian", 0), ("bandmf-b2", 2),
                        ("bandmf-b4-extra-pass", 4)):
        impls[name], numel = build(bands, extra_pass=name.endswith("extra-pass"))
    for fn in impls.values():  # allocate the noise state first: peak = a step's transient
        fn()
    extra = {"params": numel, "batch": B, "device": "cpu", **cpu_model(),
             **{f"peak_MB[{n}]": round(peak_bytes(fn) / 2 ** 20, 1) for n, fn in impls.items()},
             "noise_state_MB": {f"b{b}": round(b * numel * 4 / 2 ** 20, 1) for b in (2, 4)}}
    return Bench(impls, extra=extra)
