"""Failure onset at r = tau / rho_a ~ 1 (Ghosts of Softmax, P. Sao, arXiv 2603.13552, the
phase-transition experiment) on an MNIST MLP:

    python -m scripts.papers.ghosts.onset --root ../shared/data/mnist --out docs/figures

Trains the ghosts_lr_spike recipe's MLP (784-256-256-10, AdamW lr 1e-3, batch 128) and at
checkpoints (steps 10, 100, 400) takes ``--batches`` fresh batches; for each, steps along the
normalized negative gradient by tau = r * rho_a for r on a log grid (rho_a from
regularizers.softmax_radius on that batch) and records whether the batch loss rose and by how
much. Prints P(loss up) and the median loss ratio per r, and plots them against r.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]


def sweep(model, x, y, rs) -> tuple[list[bool], list[float]]:
    from regularizers import softmax_radius
    params = dict(model.named_parameters())
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(params.values()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    u = {n: -g / norm for n, g in zip(params, grads)}
    rho = softmax_radius(model, x, u).rho  # tau = 1 here, so this is the unit-step radius
    base = {n: p.detach().clone() for n, p in params.items()}
    up, ratio = [], []
    with torch.no_grad():
        for r in rs:
            for n, p in params.items():
                p.copy_(base[n] + r * rho * u[n])
            new = float(F.cross_entropy(model(x), y))
            up.append(new > float(loss))
            ratio.append(new / float(loss))
        for n, p in params.items():
            p.copy_(base[n])
    return up, ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[10, 100, 400])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args(argv)
    from toolkit.data import ImageDataModule
    from toolkit.models import MLP

    torch.manual_seed(args.seed)
    dm = ImageDataModule(root=args.root, batch_size=128, val_size=5000, train_subset=10000, seed=0)
    dm.setup("fit")
    model = MLP(784, (256, 256), 10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    rs = np.logspace(-1.5, 1.5, 25)
    results, step = {}, 0
    batches = iter(())
    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            return next(batches)
    for ckpt in sorted(args.checkpoints):
        while step < ckpt:
            x, y = next_batch()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
        ups, ratios = [], []
        for _ in range(args.batches):
            x, y = next_batch()
            u, q = sweep(model, x, y, rs)
            ups.append(u), ratios.append(q)
        results[ckpt] = {"r": rs.tolist(), "p_up": np.mean(ups, 0).tolist(),
                         "median_ratio": np.median(ratios, 0).tolist()}
        print(f"step {ckpt}: " + "  ".join(f"r={r:.2g}:{p:.2f}" for r, p in
                                         zip(rs[::3], results[ckpt]["p_up"][::3])), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ghosts_onset.json").write_text(json.dumps(results, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ckpt, res in results.items():
        axes[0].semilogx(res["r"], res["p_up"], "o-", ms=3, label=f"step {ckpt}")
        axes[1].loglog(res["r"], res["median_ratio"], "o-", ms=3, label=f"step {ckpt}")
    for ax in axes:
        ax.axvline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xlabel("r = tau / rho_a (step along -grad)")
    axes[0].set_ylabel(f"P(batch loss rises), {args.batches} batches")
    axes[1].set_ylabel("median loss after / before")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "ghosts_onset.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
