"""DP Wasserstein barycenters (Gu, Kunapuli, Bun, Chien & Greenewald, arXiv 2510.03021): cost
F = mean_i W2^2(barycenter, measure_i) (exact, ot.emd2) of the private barycenter relative to
the non-private one, against epsilon, for both routes of ``regularizers.dp_barycenter``.

Data: Gaussian mixtures (10 measures, 3 shifted components each); MNIST digit classes (10
measures, pixels mapped by a public JL matrix to 4 dims); a synthetic population-location set
standing in for the paper's US census data (10 groups over 30 Zipf-sized "cities" with a rural
background; not real census data). The log-log slope of the excess cost F - F_nonprivate
against epsilon is compared with the paper's rates: epsilon^-2 for output perturbation,
(epsilon n)^(-1/d) in W2 (so between -1/d and -2/d for the excess in F) for the coreset route.

    python -m scripts.papers.dp_barycenter                 # sweep -> docs/results/dp_barycenter.json + plot
    python -m scripts.papers.dp_barycenter --noise-excess  # output route: F(eps) - F(inf), same seeds
    python -m scripts.papers.dp_barycenter --speed         # timing at n = 10,000, m = 10, d = 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from regularizers.dp_barycenter import barycenter, barycenter_cost, dp_barycenter
from regularizers.dp_barycenter.mechanisms import jl_matrix
from toolkit.data.idx import find_split, read_idx

ROOT = Path(__file__).resolve().parents[2]
EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0]
DELTA = 1e-6
K = 10
MNIST_MEAN = 0.1307  # the published MNIST pixel mean: a public centre


def gaussian_mixtures(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    comps = np.array([[-0.6, 0.0], [0.5, 0.4], [0.3, -0.6]])
    ms = []
    for _ in range(10):
        shift, which = rng.normal(0, 0.25, 2), rng.integers(0, 3, n)
        ms.append(comps[which] + shift + rng.normal(0, 0.15, (n, 2)))
    return ms, {"radius": 1.5}


def population(n: int, seed: int = 0):
    """Synthetic stand-in for census locations: Zipf-sized cities, group-specific preferences."""
    rng = np.random.default_rng(seed)
    cities = rng.uniform(-0.9, 0.9, (30, 2))
    size = 1.0 / np.arange(1, 31)
    ms = []
    for _ in range(10):
        p = size * rng.lognormal(0, 0.7, 30)
        p /= p.sum()
        c = rng.choice(30, n, p=p)
        x = cities[c] + rng.normal(0, 1, (n, 2)) * (0.02 + 0.1 * np.sqrt(size[c]))[:, None]
        rural = rng.random(n) < 0.1
        x[rural] = rng.uniform(-1, 1, (rural.sum(), 2))
        ms.append(x)
    return ms, {"radius": 1.5}


def mnist(n: int, seed: int = 0, proj_dim: int = 4):
    root = ROOT.parent / "shared" / "data" / "mnist"
    img, lab = find_split(root, "train")
    x = read_idx(img).reshape(-1, 784).astype(np.float64) / 255.0
    y = read_idx(lab)
    rng = np.random.default_rng(seed)
    P = jl_matrix(784, proj_dim, 1234)  # the same public map for the reference and both routes
    ms = [(x[rng.choice(np.flatnonzero(y == c), n, replace=False)] - MNIST_MEAN) @ P for c in range(10)]
    return ms, {"radius": 12.0}


DATASETS = {"gaussian_mixtures": (gaussian_mixtures, 2000), "mnist_jl4": (mnist, 1000),
            "population_synthetic": (population, 2000)}


def slope(eps, excess):
    keep = [(e, v) for e, v in zip(eps, excess) if v > 0]
    if len(keep) < 3:
        return float("nan")
    e, v = np.log([k[0] for k in keep]), np.log([k[1] for k in keep])
    return float(np.polyfit(e, v, 1)[0])


def sweep(seeds: int, out: Path) -> dict:
    res = {}
    for name, (make, n) in DATASETS.items():
        ms, kw = make(n)
        t0 = time.time()
        ref = barycenter(ms, K, seed=0)
        f_np = barycenter_cost(ref, None, ms)
        row = {"n_per_measure": n, "measures": len(ms), "dim": ms[0].shape[1], "radius": kw["radius"],
               "F_nonprivate": f_np, "nonprivate_s": time.time() - t0}
        for mech in ("output", "coreset"):
            clean = dp_barycenter(ms, K, math.inf, DELTA, mech, seed=0, **kw)
            per_eps = {}
            for eps in EPSILONS:
                rel = []
                for s in range(seeds):
                    r = dp_barycenter(ms, K, eps, DELTA, mech, seed=s, **kw)
                    rel.append(barycenter_cost(r.support, r.weights, ms) / f_np)
                per_eps[str(eps)] = {"rel_mean": float(np.mean(rel)), "rel_std": float(np.std(rel)),
                                     "epsilon_reported": r.report["epsilon"],
                                     "noise_std": r.report["noise_std"]}
                print(name, mech, eps, per_eps[str(eps)], flush=True)
            excess = [(per_eps[str(e)]["rel_mean"] - 1.0) * f_np for e in EPSILONS]
            row[mech] = {"rel_noise_free": barycenter_cost(clean.support, clean.weights, ms) / f_np,
                         "by_epsilon": per_eps, "loglog_slope_excess": slope(EPSILONS, excess),
                         "sensitivity": clean.report["sensitivity"]}
        res[name] = row
        out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def noise_excess(seeds: int) -> dict:
    """Output route only: F(eps, seed) - F(inf, seed) at the same seed (same public start), the
    part of the excess the noise causes; its log-log slope is the one to set against eps^-2."""
    out = {}
    for name, (make, n) in DATASETS.items():
        ms, kw = make(n)
        clean = [barycenter_cost(dp_barycenter(ms, K, math.inf, DELTA, "output", seed=s, **kw).support,
                                 None, ms) for s in range(seeds)]
        ex = {}
        for eps in EPSILONS:
            ex[str(eps)] = float(np.mean([barycenter_cost(dp_barycenter(ms, K, eps, DELTA, "output", seed=s,
                                                                         **kw).support, None, ms) - clean[s]
                                          for s in range(seeds)]))
        out[name] = {"excess_by_epsilon": ex, "loglog_slope": slope(EPSILONS, [ex[str(e)] for e in EPSILONS]),
                     "F_noise_free_mean": float(np.mean(clean))}
        print(name, out[name], flush=True)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(res), figsize=(4.2 * len(res), 3.4))
    for ax, (name, row) in zip(np.atleast_1d(axes), res.items()):
        for mech, c in (("output", "C0"), ("coreset", "C1")):
            m = [row[mech]["by_epsilon"][str(e)]["rel_mean"] for e in EPSILONS]
            sd = [row[mech]["by_epsilon"][str(e)]["rel_std"] for e in EPSILONS]
            ax.errorbar(EPSILONS, m, yerr=sd, color=c, marker="o", capsize=2,
                        label=f"{mech} (slope {row[mech]['loglog_slope_excess']:.2f})")
        ax.axhline(1.0, color="k", lw=0.6)
        ax.set(xscale="log", yscale="log", xlabel="epsilon (delta=1e-6)", title=name,
               ylabel="F / F non-private")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
        return model + (" avx512_bf16" if "avx512_bf16" in flags else "")
    except (OSError, StopIteration):
        return platform.processor()


def speed() -> dict:
    out = {"cpu": cpu(), "load_average_1min": os.getloadavg()[0], "m": 10, "d": 2, "k": K}
    for n in (2500, 5000, 10000):
        ms, kw = gaussian_mixtures(n)
        row = {}
        for mech in ("output", "coreset"):
            t = time.time()
            dp_barycenter(ms, K, 1.0, 1e-6, mech, seed=0, **kw)
            row[mech + "_s"] = time.time() - t
        t = time.time()
        barycenter(ms, K, seed=0, n_init=1, n_iter=10)
        row["pot_free_support_10_iters_s"] = time.time() - t
        out[str(n)] = row
        print(n, row, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--noise-excess", action="store_true")
    args = ap.parse_args()
    path = ROOT / "docs" / "results" / "dp_barycenter.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if args.speed:
        data["speed"] = speed()
    elif args.noise_excess:
        data["output_noise_excess"] = noise_excess(args.seeds)
    else:
        data["command"] = "python -m scripts.papers.dp_barycenter --seeds %d" % args.seeds
        data["k"], data["delta"], data["seeds"] = K, DELTA, args.seeds
        tmp = ROOT / "docs" / "results" / "dp_barycenter.partial.json"
        data["datasets"] = sweep(args.seeds, tmp)
        tmp.unlink()
        plot(data["datasets"], ROOT / "docs" / "figures" / "dp_barycenter.png")
    path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
