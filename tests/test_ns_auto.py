"""``ns_matmul="auto"``: bf16 products on GPUs with bf16 units, fp32 GEMMs of bf16 operands
where bf16 is emulated. The decision is a function of device facts, tested here without a
GPU; tests/test_gpu.py checks the real device."""
import pytest
import torch

from optimizers import newton_schulz as ns


@pytest.mark.parametrize("facts, want", [
    (("cuda", (9, 0)), True),    # H100
    (("cuda", (8, 0)), True),    # A100
    (("cuda", (8, 6)), True),    # RTX 30xx / A10
    (("cuda", (7, 5)), False),   # T4: bf16 emulated
    (("cuda", (7, 0)), False),   # V100
    (("cuda", (6, 0), True), True),  # ROCm reports gfx numbers, not sm: MI100 on has bf16
    (("cpu", None, False, False), False),
    (("cpu", None, False, True), True),   # AVX512-BF16 / AMX
    (("mps",), True),
])
def test_bf16_units(facts, want):
    assert ns.bf16_units(*facts) is want


@pytest.mark.parametrize("capability, want", [((9, 0), "bf16"), ((7, 0), "fp32")])
def test_auto_on_a_cuda_device_follows_its_capability(monkeypatch, capability, want):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: seen.append(d) or capability)
    monkeypatch.setattr(torch.version, "hip", None)
    dev = torch.device("cuda", 0)
    assert ns._resolve("auto", dev) == want
    assert seen == [dev]  # asked about the tensor's own device, not the current one
    assert ns._resolve("fp32", dev) == "fp32" and ns._resolve("bf16", dev) == "bf16"


def test_auto_on_cpu_follows_the_cpu_probes(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert ns._resolve("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert ns._resolve("auto", torch.device("cpu")) == "bf16"
