"""Singular values after 5 Newton-Schulz iterations: quintic vs Polar Express (arXiv 2505.16932).

For random Gaussian matrices of GPT-2-small shapes (768x768, 768x3072, 3072x768) and for a
gradient-like matrix with a decaying spectrum (singular values 1/k), runs
``optimizers.newton_schulz.orthogonalize`` with each coefficient table and three precisions
(bf16 iteration with bf16 GEMMs, bf16 iteration with fp32 GEMMs of the bf16 operands, fp32
iteration), takes the output's singular values in float64 and reports the worst and median
``|sigma - 1|`` over the singular values.

    python -m scripts.papers.muon_family.ns_spectrum                 # prints a table, writes docs/results/ns-spectrum.json
    python -m scripts.papers.muon_family.ns_spectrum --quick         # 256x256, 256x1024, 1024x256
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from optimizers.newton_schulz import NS_COEFFICIENTS, orthogonalize

SHAPES = ((768, 768), (768, 3072), (3072, 768))
PRECISIONS = {"bf16": dict(dtype=torch.bfloat16, matmul="bf16"),
              "bf16-fp32gemm": dict(dtype=torch.bfloat16, matmul="fp32"),
              "fp32": dict(dtype=torch.float32, matmul="fp32")}
OUT = Path(__file__).resolve().parents[3] / "docs" / "results" / "ns-spectrum.json"


def spectrum_inputs(shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A Gaussian matrix and a gradient-like one (random singular vectors, sigma_k = 1/k)."""
    g = torch.Generator().manual_seed(seed)
    a, b = shape
    gauss = torch.randn(a, b, generator=g)
    r = min(a, b)
    u = torch.linalg.qr(torch.randn(a, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(b, r, generator=g, dtype=torch.float64))[0]
    decay = (u * (1.0 / torch.arange(1, r + 1, dtype=torch.float64))) @ v.T
    return {"gaussian": gauss, "decaying": decay.float()}


def deviation(x: torch.Tensor, coefficients: str, precision: str, steps: int = 5
              ) -> tuple[float, float]:
    """(worst, median) of |sigma - 1| over the singular values of NS_steps(x), in float64."""
    out = orthogonalize(x, steps, coefficients=coefficients, **PRECISIONS[precision])
    s = torch.linalg.svdvals(out.double())
    dev = (s - 1).abs()
    return dev.max().item(), dev.median().item()


def measure(shapes=SHAPES, precisions=tuple(PRECISIONS)) -> list[dict]:
    rows = []
    for shape in shapes:
        for kind, x in spectrum_inputs(shape).items():
            for precision in precisions:
                for table in NS_COEFFICIENTS:
                    worst, median = deviation(x, table, precision)
                    rows.append(dict(shape=f"{shape[0]}x{shape[1]}", matrix=kind,
                                     precision=precision, table=table,
                                     worst=round(worst, 4), median=round(median, 4)))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shapes scaled down 3x")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = ((256, 256), (256, 1024), (1024, 256)) if args.quick else SHAPES
    rows = measure(shapes)
    print(f"{'shape':>10} {'matrix':>9} {'precision':>14} {'table':>14} {'worst':>7} {'median':>7}")
    for r in rows:
        print(f"{r['shape']:>10} {r['matrix']:>9} {r['precision']:>14} {r['table']:>14} "
              f"{r['worst']:7.4f} {r['median']:7.4f}")
    if not args.quick:
        cpu = next((line.split(":", 1)[1].strip() for line in
                    Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
                   platform.processor())
        OUT.write_text(json.dumps({"command": "python -m scripts.papers.muon_family.ns_spectrum", "cpu": cpu,
                                   "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
