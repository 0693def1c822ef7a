"""The k-mixup paper's 2-D demonstration: OT matching keeps mixed points on the data.

    python -m scripts.papers.kmixup [--pairs 8192] [--out runs/kmixup_toy]

Greenewald et al., "k-Mixup Regularization for Deep Learning via Optimal Transport", Sec. 4
(and Figs. 1-2): for k in 1, 2, 4, ... 64 draw two disjoint k-sets, match them with
``regularizers.kmixup_partners`` and mix with lambda ~ Beta(alpha, alpha). Measured:

* blobs (8 Gaussian clusters): the share of matched pairs whose clusters differ, and the
  mean distance of mixed points beyond the clusters (distance to the nearest centre minus
  the radius holding 99% of a cluster, floored at 0);
* spiral (a 1-D manifold with small noise): the mean distance of mixed points to the curve.

Two random k-sets differ in their per-cluster counts by about sqrt(k), so only ~sqrt(k) of
the k pairs must cross clusters: expect a ~1/sqrt(k) decay once k >> clusters. The table
shows each measure against c/sqrt(k) (c fitted on k >= 16) with the fitted log-log slope,
and the least cross-cluster share any matching can reach, sum_c |N_c - M_c| / 2k for the
multinomial cluster counts N, M of the two sets (the OT matching should sit on it).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from regularizers import kmixup_partners
from regularizers.kmixup import sample_lambda

CLUSTERS, STD = 8, 0.35
R99 = STD * math.sqrt(-2 * math.log(0.01))  # 2-D Gaussian: P(|x - centre| > R99) = 1%


def blobs(n: int, g: torch.Generator, clusters: int = CLUSTERS, radius: float = 4.0,
          std: float = STD):
    angles = 2 * math.pi * torch.arange(clusters) / clusters
    centres = radius * torch.stack([angles.cos(), angles.sin()], 1)
    label = torch.randint(0, clusters, (n,), generator=g)
    return centres[label] + std * torch.randn(n, 2, generator=g), label, centres


def spiral_curve(t: torch.Tensor) -> torch.Tensor:
    r, th = 0.5 + 3.5 * t, 3.0 * math.pi * t
    return torch.stack([r * th.cos(), r * th.sin()], -1)


def spiral(n: int, g: torch.Generator, noise: float = 0.05):
    t = torch.rand(n, generator=g)
    return spiral_curve(t) + noise * torch.randn(n, 2, generator=g)


def measure(k: int, pairs: int, alpha: float, seed: int, cost: str = "sqeuclidean") -> dict[str, float]:
    g = torch.Generator().manual_seed(seed * 1000 + k)
    curve = spiral_curve(torch.linspace(0, 1, 20001))
    cross, d_blob, d_spiral = [], [], []
    for _ in range(max(1, pairs // (2 * k))):
        x, lab, centres = blobs(2 * k, g)
        p = kmixup_partners(x, k, g, cost)  # block 0 <-> block 1: two disjoint k-sets
        lam = sample_lambda(alpha, g)
        z = lam * x + (1 - lam) * x[p]
        cross.append((lab != lab[p]).float())
        d_blob.append((torch.cdist(z, centres).min(1).values - R99).clamp(min=0))
        s = spiral(2 * k, g)
        p = kmixup_partners(s, k, g, cost)
        lam = sample_lambda(alpha, g)
        z = lam * s + (1 - lam) * s[p]
        d_spiral.append(torch.cdist(z, curve).min(1).values)
    return {"k": k, "cross_share": torch.cat(cross).mean().item(),
            "blob_dist": torch.cat(d_blob).mean().item(),
            "spiral_dist": torch.cat(d_spiral).mean().item(), "least_cross": least_cross(k, seed)}


def least_cross(k: int, seed: int, draws: int = 20000) -> float:
    """E sum_c |N_c - M_c| / (2k): pairs that must cross clusters between two random k-sets."""
    rng = np.random.default_rng(seed)
    n, m = (rng.multinomial(k, [1 / CLUSTERS] * CLUSTERS, size=draws) for _ in range(2))
    return float(np.abs(n - m).sum(1).mean() / (2 * k))


def fit_sqrt(rows, key):
    """c in c/sqrt(k) (least squares on k >= 16) and the log-log slope over k >= 16."""
    ks = np.array([r["k"] for r in rows], float)
    v = np.array([r[key] for r in rows])
    sel = ks >= 16
    c = float((v[sel] / np.sqrt(ks[sel])).sum() / (1 / ks[sel]).sum())
    sel = ks >= 16
    slope = float(np.polyfit(np.log(ks[sel]), np.log(v[sel]), 1)[0])
    return c, slope


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=8192, help="matched pairs per k")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cost", default="sqeuclidean", choices=["sqeuclidean", "euclidean"])
    ap.add_argument("--max-k", type=int, default=64, help="k = 1, 2, 4 ... max_k")
    ap.add_argument("--out", default="runs/kmixup_toy")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # thousands of tiny ops: a thread pool only adds synchronisation
    ks = [2 ** i for i in range(int(math.log2(args.max_k)) + 1)]
    rows = [measure(k, args.pairs, args.alpha, args.seed, args.cost) for k in ks]
    fits = {key: fit_sqrt(rows, key) for key in ("cross_share", "blob_dist", "spiral_dist")}
    head = ("| k | cross-cluster share | least possible | c/sqrt(k) | blobs: dist beyond clusters "
            "| c/sqrt(k) | spiral: dist to curve | c/sqrt(k) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cells = [str(r["k"]), f"{r['cross_share']:.4f}", f"{r['least_cross']:.4f}",
                 f"{fits['cross_share'][0] / math.sqrt(r['k']):.4f}"]
        for key in ("blob_dist", "spiral_dist"):
            cells += [f"{r[key]:.4f}", f"{fits[key][0] / math.sqrt(r['k']):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"{key}: log-log slope over k>=16 = {fits[key][1]:.2f} (1/sqrt(k) is -0.50); "
              f"monotone decreasing: {all(a[key] > b[key] for a, b in zip(rows, rows[1:]))}"
              for key in fits]
    table = "\n".join(lines)
    print(f"cost={args.cost}, alpha={args.alpha}, {args.pairs} pairs per k, seed {args.seed}\n{table}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    plot(rows, fits, args, out / "kmixup_toy.png")
    print(f"wrote {out / 'table.md'} and {out / 'kmixup_toy.png'}")
    return 0


def plot(rows, fits, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = np.array([r["k"] for r in rows], float)
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    labels = {"cross_share": "blobs: cross-cluster share", "blob_dist": "blobs: dist. beyond clusters",
              "spiral_dist": "spiral: dist. to curve"}
    for i, key in enumerate(labels):
        v = [r[key] for r in rows]
        axes[0].loglog(ks, v, "o-", color=f"C{i}", label=labels[key])
        axes[0].loglog(ks, fits[key][0] / np.sqrt(ks), ":", color=f"C{i}")
    axes[0].loglog(ks, [r["least_cross"] for r in rows], "x--", color="C0", lw=0.8,
                   label="least possible cross share")
    axes[0].set_xlabel("k")
    axes[0].set_title("measured (solid) vs c/sqrt(k) (dotted)")
    axes[0].legend(fontsize=7)
    g = torch.Generator().manual_seed(args.seed)
    for ax, (name, k) in zip(axes[1:], [("blobs", 1), ("blobs", 64), ("spiral", 1), ("spiral", 64)]):
        pts = blobs(2 * k * (256 // k), g)[0] if name == "blobs" else spiral(2 * k * (256 // k), g)
        mixed = []
        for chunk in pts.split(2 * k):
            p = kmixup_partners(chunk, k, g)
            lam = torch.rand(2 * k, 1, generator=g)  # spread lambda to show the segments
            mixed.append(lam * chunk + (1 - lam) * chunk[p])
        mixed = torch.cat(mixed)
        ax.scatter(*pts.T, s=4, c="k", label="data")
        ax.scatter(*mixed.T, s=4, c="C3", alpha=0.5, label="mixed")
        ax.set_title(f"{name}, k = {k}")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
