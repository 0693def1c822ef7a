"""Averaged vs last Langevin iterate vs online SGD on a Gaussian single-index model.

    python -m scripts.papers.langevin_swa.single_index [--quick] [--k 4 3] [--dims ...] [--out docs/results]
    python -m scripts.papers.langevin_swa.single_index --table      # the n* table from the saved sweep

Wei, Damian & Lee, "Improved high-dimensional estimation with Langevin dynamics and stochastic
weight averaging" (arXiv 2603.06028): with information exponent k*, the average of spherical
Langevin iterates recovers theta* from n ~ d^(k*/2) samples, where online SGD and the last
Langevin iterate need n ~ d^max(1, k*-1).

For each k*, d and n (a sqrt(2) grid) and 10 seeds (theta*, data and start all from the seed)
this runs spherical Langevin dynamics (regularizers.langevin.core.spherical_langevin_step) on
the n-sample correlation loss -mean(y h_k(<w, x>)), vectorized over seeds and a grid of
inverse temperatures beta = d * {1, 2, 4, 8}, and reads three estimators off each chain:

* ``last``: the last iterate;
* ``avg``: the renormalized mean of the iterates after a 25% burn-in (SWA on the sphere);
* ``avg2`` (even k* only): the top eigenvector of the mean of w w^T over the same iterates.
  For even k* the loss is even in w, so the Gibbs measure's mean is 0 and the first moment
  only carries signal while a chain stays in one hemisphere; the second moment is the
  averaged statistic that survives the symmetry.

Online SGD takes one fresh sample per step (spherical SGD, lr = c / d^(k*/2), c on a x2
grid) and its overlap is read at the same n. Every method's temperature or lr is picked per
d by the smallest n* over the grid (an oracle pick, the same for all methods), where n* is
the n from which the median overlap over seeds stays >= 0.5 (log-linear interpolation).
The slope of log n* against log d is the measured exponent, read at the bars 0.5 (the
issue's) and 0.8 (at these d the one to read: docs/langevin_swa.md). The chain length is 1000 * d / 16 steps with lr = 0.05 beta / d (each
step's tangent noise moves ~0.3 rad). The n grid grows until every estimator's best median
reaches 0.8, capped at 4 d^2 (k*=3) and d^3 (k*=4) for Langevin; SGD always runs to
128 d^2 (k*=3) and 32 d^3 (k*=4) steps.

Scale (2 shared CPU cores): d in {16, 24, 32, 48, 64} for k*=3 and {16, 24, 32} for k*=4
(the issue asks for d up to 64 for both). Cells are saved one by one and kept, so ``--k`` and
``--dims`` add cells to the saved sweep; ``--sgd-only`` reruns SGD in saved cells.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from regularizers.langevin.core import retract, spherical_langevin_step, tangent
from toolkit.data.single_index import hermite, hermite_grad, hidden_direction, single_index_samples
from toolkit.seeding import generator

from scripts.papers.langevin_swa.report import THRESHOLDS, plot, record_slopes, summarize, table

SEEDS = 10
BETA_PER_D = (1.0, 2.0, 4.0, 8.0)
SGD_C = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
NOISE_C = 0.05  # lr = NOISE_C / (T d): ~sqrt(2 * 0.05) rad of tangent noise per step


def correlation_grad(X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean gradient of -mean_i y_i h_k(<w, x_i>) for chains w (S, B, d), data X (S, n, d)."""
    z = torch.einsum("snd,sbd->sbn", X, w)
    return torch.einsum("snd,sbn->sbd", X, -Y[:, None, :] * hermite_grad(k, z)) / X.shape[1]


def langevin_chains(X, Y, k, lr, temperature, steps, w0, g, burn_frac=0.25):
    """Run the chains; return (last iterate, mean iterate, mean of w w^T or None) after burn-in."""
    w, burn = w0, int(steps * burn_frac)
    m1 = torch.zeros_like(w)
    m2 = torch.zeros(*w.shape, w.shape[-1]) if k % 2 == 0 else None
    for t in range(steps):
        w = spherical_langevin_step(w, correlation_grad(X, Y, w, k), lr, temperature,
                                    torch.randn(w.shape, generator=g))
        if t >= burn:
            m1 += w
            if m2 is not None:
                m2 += w[..., :, None] * w[..., None, :]
    n_avg = steps - burn
    return w, m1 / n_avg, (m2 / n_avg if m2 is not None else None)


def overlap(v: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return (retract(v) * theta[:, None, :]).sum(-1).abs()


def langevin_point(k: int, d: int, n: int) -> dict[str, list[list[float]]]:
    """Overlaps (seeds x betas) of each estimator at one (k, d, n)."""
    theta = torch.stack([hidden_direction(d, s) for s in range(SEEDS)])
    data = [single_index_samples(n, theta[s], k, s) for s in range(SEEDS)]
    X, Y = torch.stack([x for x, _ in data]), torch.stack([y for _, y in data])
    betas = torch.tensor([b * d for b in BETA_PER_D]).view(1, -1, 1)
    T = 1.0 / betas
    lr = NOISE_C / (T * d)
    g = generator(k, d, n)
    w0 = retract(torch.randn(SEEDS, len(BETA_PER_D), d, generator=g))
    last, m1, m2 = langevin_chains(X, Y, k, lr, T, steps=1000 * d // 16, w0=w0, g=g)
    out = {"last": overlap(last, theta), "avg": overlap(m1, theta)}
    if m2 is not None:
        out["avg2"] = overlap(torch.linalg.eigh(m2).eigenvectors[..., -1], theta)
    return {name: v.tolist() for name, v in out.items()}


def online_sgd(k: int, d: int, checkpoints: list[int], stop, chunk: int = 4096) -> list[list[list[float]]]:
    """Overlaps (checkpoint x seeds x lrs) of one-pass spherical SGD, one fresh sample a step."""
    theta = torch.stack([hidden_direction(d, s) for s in range(SEEDS)])
    lr = torch.tensor(SGD_C).view(1, -1, 1) / d ** (k / 2)
    g = generator(k, d, 0, 1)
    w = retract(torch.randn(SEEDS, len(SGD_C), d, generator=g))
    out, t, todo = [], 0, list(checkpoints)
    while todo:
        X = torch.randn(chunk, SEEDS, d, generator=g)
        Y = hermite(k, (X * theta).sum(-1))
        for x, y in zip(X, Y):
            z = torch.einsum("sd,scd->sc", x, w)
            grad = -(y[:, None] * hermite_grad(k, z))[..., None] * x[:, None, :]
            w = retract(w - lr * tangent(w, grad))
            t += 1
            if t == todo[0]:
                out.append((w * theta[:, None, :]).sum(-1).abs().tolist())
                todo.pop(0)
                if not todo or stop(out):
                    todo = []
                    break
    return out


def medians(per_seed_by_setting: list[list[float]]) -> np.ndarray:
    """Median over seeds of each setting (temperature or lr): seeds x settings -> settings."""
    return np.median(np.asarray(per_seed_by_setting), axis=0)


def crossing(ns: list[int], medians: list[float], level: float) -> float | None:
    """The n from which the median overlap stays >= ``level`` up to the last grid point,
    interpolated in log n; None if the last point is below. (A first crossing would count the
    spikes of constant-lr SGD, whose overlap reading at one step is noisy.)"""
    if medians[-1] < level:
        return None
    i = len(medians) - 1
    while i > 0 and medians[i - 1] >= level:
        i -= 1
    if i == 0:
        return float(ns[0])
    a, b = medians[i - 1], medians[i]
    f = (level - a) / (b - a)
    return float(math.exp(math.log(ns[i - 1]) + f * (math.log(ns[i]) - math.log(ns[i - 1]))))


def grid(d: int, cap: int) -> list[int]:
    return sorted({int(round(d * 2 ** (j / 2))) for j in range(64) if d * 2 ** (j / 2) <= cap})


def tuned(ns: list[int], med: np.ndarray, settings: list[float]) -> dict:
    """Per setting (rows of ``med``: settings x n), the median-overlap curve and its n* at each
    bar; the method's n* is the best setting's (one setting for the whole curve, tuned per d)."""
    out = {"settings": list(settings), "median": np.asarray(med).tolist()}
    for level in THRESHOLDS:
        stars = [crossing(ns, list(row), level) for row in med]
        ok = [(s, i) for i, s in enumerate(stars) if s is not None]
        best = min(ok)[1] if ok else int(np.asarray(med)[:, -1].argmax())
        out[f"n_star_{level}"] = stars[best]
        out[f"setting_{level}"] = settings[best]
        out[f"curve_{level}"] = list(med[best])
    return out


def curves(per_n: list) -> np.ndarray:
    return np.stack([medians(v) for v in per_n], 1)  # settings x n


def reached(per_n: list, level: float) -> bool:
    """Some setting's median is >= level at the last grid point."""
    return bool((medians(per_n[-1]) >= level).any())


def sweep_k_d(k: int, d: int, langevin_cap: int, sgd_cap: int, keep: dict | None = None) -> dict:
    """One (k*, d) cell; ``keep``: an earlier cell whose Langevin part is reused (SGD rerun)."""
    ns, lang = [], {}
    top = max(THRESHOLDS)
    for n in [] if keep else grid(d, langevin_cap):
        t0 = time.time()
        point = langevin_point(k, d, n)
        ns.append(n)
        for name, v in point.items():
            lang.setdefault(name, []).append(v)
        print(f"k={k} d={d} n={n}: " + " ".join(f"{a} {medians(v).max():.2f}" for a, v in point.items())
              + f" ({time.time() - t0:.1f}s)", flush=True)
        if all(reached(v, top) for v in lang.values()):
            break
    sgd_ns = grid(d, sgd_cap)
    t0 = time.time()
    # no early stop: a constant-lr curve may touch the bar and fall back, and n* asks that it stay
    sgd = online_sgd(k, d, sgd_ns, stop=lambda per_n: False)
    sgd_ns = sgd_ns[:len(sgd)]
    print(f"k={k} d={d} online SGD to n={sgd_ns[-1]} ({time.time() - t0:.1f}s)", flush=True)
    betas = [b * d for b in BETA_PER_D]
    if keep:
        res = {"n": keep["n"], "sgd_n": sgd_ns,
               "methods": {a: m for a, m in keep["methods"].items() if a != "sgd"}}
    else:
        res = {"n": ns, "sgd_n": sgd_ns,
               "methods": {a: tuned(ns, curves(v), betas) for a, v in lang.items()}}
    res["methods"]["sgd"] = tuned(sgd_ns, curves(sgd), list(SGD_C))
    return res


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="k*=3, d in {16, 24} only (a smoke run)")
    ap.add_argument("--k", type=int, nargs="*", default=[4, 3], help="information exponents")
    ap.add_argument("--dims", type=int, nargs="*", help="override the dimensions of every k")
    ap.add_argument("--table", action="store_true", help="print the saved sweep's n* table")
    ap.add_argument("--rescore", action="store_true", help="recompute n* of the saved sweep")
    ap.add_argument("--sgd-only", action="store_true", help="rerun online SGD in saved cells")
    ap.add_argument("--out", default="docs/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dims = {3: [16, 24, 32, 48, 64], 4: [16, 24, 32]}
    dims = {3: [16, 24]} if args.quick else {k: args.dims or dims[k] for k in args.k}
    name = "langevin_swa_single_index" + ("_quick" if args.quick else "")
    path = Path(args.out) / f"{name}_sweep.json"
    if args.table:
        print(table(json.loads(path.read_text())))
        return 0
    if args.rescore:  # n* again from the saved median curves (after a change of its rule)
        raw = json.loads(path.read_text())
        for per_d in raw["sweep"].values():
            for cell in per_d.values():
                for a, m in cell["methods"].items():
                    m.update(tuned(cell["sgd_n"] if a == "sgd" else cell["n"],
                                   np.array(m["median"]), m["settings"]))
        raw["summary"] = summarize(raw["sweep"])
        path.write_text(json.dumps(raw, indent=1) + "\n")
        plot(raw["sweep"], Path("docs/figures") / f"{name}.png")
        print(table(raw))
        return 0
    # (k, d) cells already measured are kept: a sweep can be run one k at a time
    raw = json.loads(path.read_text()) if path.exists() else {"sweep": {}}
    if not isinstance(raw.get("minutes"), dict):
        raw["minutes"] = {} if "minutes" not in raw else {"earlier_cells": raw["minutes"]}
    t0 = time.time()
    for k, ds in dims.items():
        for d in ds:
            cell = time.time()
            keep = raw["sweep"].get(str(k), {}).get(str(d)) if args.sgd_only else None
            raw["sweep"].setdefault(str(k), {})[str(d)] = sweep_k_d(
                k, d, langevin_cap=(4 if k == 3 else 1) * d ** (k - 1),
                sgd_cap=(128 if k == 3 else 32) * d ** (k - 1), keep=keep)
            raw["minutes"][f"k{k}_d{d}" + ("_sgd" if keep else "")] = round((time.time() - cell) / 60, 2)
            raw.update(summary=summarize(raw["sweep"]), cpu=cpu_name(), seeds=SEEDS,
                       beta_per_d=BETA_PER_D, sgd_c=SGD_C, thresholds=THRESHOLDS)
            path.write_text(json.dumps(raw, indent=1) + "\n")
    plot(raw["sweep"], Path("docs/figures") / f"{name}.png")
    if not args.quick and args.out == "docs/results":
        record_slopes(raw)
    for key, s in raw["summary"].items():
        print(key, "slope", None if s["slope"] is None else round(s["slope"], 2), s["n_star"])
    print(f"{(time.time() - t0) / 60:.1f} min on {raw['cpu']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
