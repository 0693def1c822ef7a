"""BandMF vs DP-SGD on a model small enough to sweep: softmax regression on MNIST pixels.

Built from the pure cores only (no callback): per-example gradients are analytic
(g_i = e_i [x_i, 1]^T with e_i = softmax - onehot, so ||g_i|| = ||e_i|| sqrt(||x_i||^2 + 1)),
clipped to C, summed, noised and divided by the expected batch. DP-SGD: Poisson sampling
over all N, independent noise. BandMF: cyclic Poisson over b partitions, noise
``BandedNoise(strategy("optimized", b, steps, momentum))``, sigma from
``calibrate_bandmf_sigma``. Same steps, batch, optimizer (SGD, momentum 0.9), and an lr
grid per method chosen on a 5k validation split; test accuracy reported over seeds.

    python -m scripts.papers.bandmf.linear_mnist --epsilons 1 3 8 --seeds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from regularizers.dp.accounting import calibrate_sigma
from regularizers.dp.bandmf import BandedNoise, strategy
from regularizers.dp.cyclic_poisson import (calibrate_bandmf_sigma, cyclic_poisson_batch,
                                            partition_sample_rate, partitions)
from toolkit.data.idx import find_split, read_idx
from toolkit.seeding import generator

DELTA, CLIP, MOMENTUM = 1e-5, 1.0, 0.9


def load(root: Path):
    out = []
    for split in ("train", "t10k"):
        xi, yi = find_split(root, split)
        x = torch.from_numpy(read_idx(xi).copy()).float().flatten(1) / 255
        out += [(x - 0.1307) / 0.3081 / 28, torch.from_numpy(read_idx(yi).copy()).long()]  # ||x|| ~ 1
    return out


def train(x, y, method, eps, lr, seed, bands, batch, epochs):
    N = len(y)
    steps = epochs * N // batch
    W = torch.zeros(10, x.shape[1] + 1)
    buf = torch.zeros_like(W)
    xb1 = torch.cat([x, torch.ones(N, 1)], 1)
    if method == "dpsgd":
        q = batch / N
        sigma = calibrate_sigma(eps, DELTA, q, steps)
        noise = BandedNoise([1.0], W.numel())
    else:
        q = partition_sample_rate(batch, N, bands)
        c = strategy("optimized", bands, steps, MOMENTUM)
        sigma = calibrate_bandmf_sigma(eps, DELTA, q, steps, c)
        noise = BandedNoise(c, W.numel())
        parts = partitions(N, bands, seed)
    for t in range(steps):
        if method == "dpsgd":
            u = torch.rand(N, generator=generator(seed, 1, t))
            idx = (u < q).nonzero().squeeze(1)
        else:
            idx = cyclic_poisson_batch(parts, t, q, seed)
        xs = xb1[idx]
        e = torch.softmax(xs @ W.T, 1)
        e[torch.arange(len(idx)), y[idx]] -= 1
        norm = e.norm(dim=1) * xs.norm(dim=1)
        e *= (CLIP / (norm + 1e-6)).clamp(max=1.0)[:, None]
        g = e.T @ xs + noise(sigma * CLIP, generator(seed, 2, t)).view_as(W)
        buf.mul_(MOMENTUM).add_(g / batch)
        W -= lr * buf
    return W, sigma


def accuracy(W, x, y):
    return float(((torch.cat([x, torch.ones(len(y), 1)], 1) @ W.T).argmax(1) == y).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="../shared/data/mnist")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--bands", type=int, default=8)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--out", default="bandmf_linear_mnist.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x, y, xt, yt = load(Path(args.root))
    xv, yv, xtr, ytr = x[:5000], y[:5000], x[5000:], y[5000:]
    rows = []
    for eps in args.epsilons:
        for method in ("dpsgd", "bandmf"):
            val = {lr: accuracy(train(xtr, ytr, method, eps, lr, 0, args.bands, args.batch,
                                      args.epochs)[0], xv, yv) for lr in args.lrs}
            lr = max(val, key=val.get)
            tests = [accuracy(train(xtr, ytr, method, eps, lr, s + 1, args.bands, args.batch,
                                    args.epochs)[0], xt, yt) for s in range(args.seeds)]
            row = {"eps": eps, "method": method, "lr": lr, "val_by_lr": val, "test": tests,
                   "mean": statistics.mean(tests),
                   "std": statistics.stdev(tests) if len(tests) > 1 else 0.0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
