"""Which number of bands? Expected error of BandMF vs DP-SGD at equal (epsilon, delta).

For a run of ``steps`` steps with expected batch B from N examples, b bands means cyclic
Poisson sampling at rate q_b = B / (N // b) for ceil(steps / b) participations (b <= N / B).
Each strategy is scaled to sensitivity 1, so its z has std sigma_b (calibrated by the PRV
accountant for the target epsilon) and the noise in the released workload A G is
A C^-1 z. Reported: RMSE over the steps of that noise, in clip-norm units, relative to
DP-SGD (b = 1, C = I) at the same epsilon: jax-privacy's ``amplified_bandmf_loss`` made
relative (Choquette-Choo et al. 2023, Sec. 5; McKenna 2025, Eq. 3), for the prefix-sum
workload (plain SGD) and the heavy-ball momentum workload (beta = 0.9). Smaller is better;
it is a proxy, not accuracy.

    python -m scripts.papers.bandmf.bands --n 55000 --batch 4096 --epochs 15 60
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy.signal import lfilter

from regularizers.dp.accounting import calibrate_sigma
from regularizers.dp.bandmf import strategy, workload_coefs


def rmse(coefs: np.ndarray, steps: int, momentum: float) -> float:
    """sqrt(mean_t Var[(A C^-1 z)_t]) per unit z std, C of unit column norm."""
    h = lfilter([1.0], coefs, workload_coefs(steps, momentum))
    return float(math.sqrt(np.mean(np.cumsum(h ** 2))))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=55000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--epochs", type=int, nargs="+", default=[15, 60])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--bands", type=int, nargs="+", default=[1, 2, 4, 8, 13])
    args = ap.parse_args(argv)
    for epochs in args.epochs:
        steps = epochs * max(1, round(args.n / args.batch))
        print(f"\nN={args.n} B={args.batch} {epochs} epochs = {steps} steps: noise RMSE / "
              "DP-SGD's at equal epsilon (bsr / optimized; q>1: too many bands)")
        print(f"{'eps':<5}{'workload':<10}" + "".join(f"{'b=' + str(b):>16}" for b in args.bands))
        for eps in args.epsilons:
            rows: dict[float, list[str]] = {0.0: [], 0.9: []}
            base: dict[float, float] = {}
            for b in args.bands:
                q = args.batch / (args.n // b)
                if q > 1:
                    for m in rows:
                        rows[m].append(f"{'q>1':>16}")
                    continue
                sigma = calibrate_sigma(eps, args.delta, q, math.ceil(steps / b))
                for m in rows:
                    errs = [sigma * rmse(strategy(kind, b, steps, m), steps, m)
                            for kind in ("bsr", "optimized")]
                    base.setdefault(m, errs[0])  # b = 1 comes first: DP-SGD
                    rows[m].append(f"{errs[0] / base[m]:>9.3f} /{errs[1] / base[m]:.3f}")
            for m, cells in rows.items():
                name = "prefix" if m == 0 else f"mom {m}"
                print(f"{eps:<5}{name:<10}" + "".join(cells))

if __name__ == "__main__":
    main()
