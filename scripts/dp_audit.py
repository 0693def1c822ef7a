"""Empirical privacy audit of ``DPSGD`` with one training run (Steinke, Nasr & Jagielski 2023).

    python -m scripts.dp_audit --sigmas 1 2 3 --broken none clip noise --out runs/dp_audit

Steinke et al. 2023 ("Privacy Auditing with One (1) Training Run", NeurIPS), Alg. 1: m
canaries, each put into the training set independently with probability 1/2; train ONCE
(the real ``DPSGD`` callback under a real Lightning Trainer); score every canary from what
was released; guess "in" for the r/2 highest scores and "out" for the r/2 lowest, abstain on
the rest. If training is (eps, delta)-DP, the number W of correct guesses obeys (Thm. 3.1;
Cor. 5.4 for delta > 0; the paper's App. D computes it):

    P[W >= v] <= beta + 2 m delta alpha,   beta = P[Binomial(r, p_eps) >= v],
    alpha = max_{1<=i<=v} P[v-i <= Binomial(r, p_eps) < v] / i,   p_eps = e^eps / (1 + e^eps),

so eps is rejected at level ``level`` when that p-value is below it; the audit reports the
largest rejected eps: an empirical LOWER bound (a valid guarantee can never sit below it,
except with probability ``level``). Several r are tried, Bonferroni-corrected (level / #r).

White-box gradient canaries (docs/dp_audit.md): a bias-free linear classifier on real MNIST
features padded with m zero features; canary i = s * e_{d+i}, so its gradient lives in weight
column d+i alone and is clipped to C. A callback that reads only the weights sees every
iterate; with plain SGD the per-step release y_t = -(B / lr) <W_{t+1} - W_t, u_t> of canary i
is b_t a_t + N(0, sigma^2 C^2), b_t ~ Bernoulli(q) if in, 0 if out, and the score is its
log-likelihood ratio  sum_t log(1 - q + q exp((2 a_t y_t - a_t^2) / (2 sigma^2 C^2))).
``--broken clip|noise`` monkeypatches ``regularizers.dp.mechanism`` (clip factors 1 / noise
std 0): the audit must then refute the claimed epsilon. ``--noise bandmf`` audits
``DPSGD(noise="bandmf")`` instead (``scripts/dp_audit_bandmf.py``: whitened attack, and
``--broken correlation``, independent noise accounted as if correlated).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TOOLKIT_DATA", ROOT.parent / "shared" / "data")) / "mnist"
FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # guesses r as fractions of m (fixed a priori)


# ---------------------------------------------------------------- statistics (no torch)
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[W >= v] under (eps, delta)-DP: Steinke et al. 2023, Thm. 3.1 / Cor. 5.4."""
    p = 1 / (1 + math.exp(-eps))
    beta = stats.binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return float(min(beta, 1.0))
    i = np.arange(1, v + 1)
    alpha = np.max((stats.binom.cdf(v - 1, r, p) - stats.binom.cdf(v - i - 1, r, p)) / i)
    return float(min(beta + 2 * m * delta * alpha, 1.0))


def eps_lower_bound(m: int, r: int, v: int, delta: float, level: float = 0.05) -> float:
    """Largest eps whose (eps, delta) claim v correct of r guesses rejects at ``level``
    (the p-value grows with eps; bisection to 1e-4, returning the rejected end)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < level else (lo, mid)
    return lo


def audit(scores: np.ndarray, member: np.ndarray, delta: float, level: float = 0.05,
          fractions=FRACTIONS) -> dict:
    """Guess "in" for the r/2 top scores, "out" for the r/2 bottom ones, for each r; the
    bound is the best over r at level / len(fractions) each (Bonferroni)."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    rows = []
    for f in fractions:
        k = max(1, int(f * m) // 2)
        v = int(member[order[:k]].sum() + (~member[order[m - k:]]).sum())
        rows.append({"r": 2 * k, "correct": v,
                     "eps_lb": eps_lower_bound(m, 2 * k, v, delta, level / len(fractions))})
    best = max(rows, key=lambda row: row["eps_lb"])
    return {"eps_lower_bound": best["eps_lb"], "best": best, "per_r": rows}


def ideal_bound(sigma: float, q: float, steps: int, m: int, delta: float, level: float = 0.05,
                seed: int = 0) -> float:
    """The same audit on SIMULATED releases of the ideal mechanism (y_t = b_t + sigma z_t in
    units of C): what this auditor gets from a textbook implementation of the claim."""
    rng = np.random.default_rng(seed)
    member = rng.random(m) < 0.5
    y = (rng.random((m, steps)) < q) * member[:, None] + sigma * rng.standard_normal((m, steps))
    score = np.logaddexp(np.log1p(-q), np.log(q) + (2 * y - 1) / (2 * sigma ** 2)).sum(1)
    return audit(score, member, delta, level)["eps_lower_bound"]


# ---------------------------------------------------------------- the audited training
def features(root: Path, n: int, seed: int):
    import torch
    import torch.nn.functional as F

    from toolkit.data.idx import find_split, read_idx
    images, labels = (torch.tensor(read_idx(p)) for p in find_split(Path(root), "train"))
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    x = F.avg_pool2d(images[idx].float().unsqueeze(1) / 255, 4).flatten(1)
    return (x - x.mean(0)) / (x.std(0) + 1e-6), labels[idx].long()


def canaries(data: Path, n_real: int, m: int, seed: int, scale: float):
    """The audited training set: ``n_real`` MNIST features padded by ``m`` zero columns, then
    each canary that is in (a fair coin per canary) as one row with ``scale`` in its own
    column. Returns (X, Y, d, K, member, ins, canary_y)."""
    import torch
    import torch.nn.functional as F

    x, y = features(data, n_real, seed)
    d, K = x.shape[1], 10
    g = torch.Generator().manual_seed(seed + 1)
    member = torch.rand(m, generator=g) < 0.5
    canary_y = torch.arange(m) % K
    ins = member.nonzero().squeeze(1)
    xc = torch.zeros(len(ins), d + m)
    xc[torch.arange(len(ins)), d + ins] = scale
    X = torch.cat([F.pad(x, (0, m)), xc])
    Y = torch.cat([y, canary_y[ins]])
    return X, Y, d, K, member, ins, canary_y


def run(sigma: float = 2.0, m: int = 1000, steps: int = 200, n_real: int = 1000,
        batch: int = 75, lr: float = 0.15, scale: float = 10.0, clip: float = 1.0,
        delta: float = 1e-5, seed: int = 0, data: Path = DATA, broken: str = "none",
        level: float = 0.05, mix: float = 0.0) -> dict:
    """One audited DP-SGD run; returns the claimed epsilon beside the empirical bound.
    ``mix`` > 0: the training step applies mixup (a random pairing, weight 1/2) with that
    probability per batch, in train mode only, a coupling no fit-start check sees; the
    step guard must compute those steps with every example alone (issue 23)."""
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from regularizers import DPSGD

    X, Y, d, K, member, ins, canary_y = canaries(data, n_real, m, seed, scale)
    q = batch / (n_real + m / 2)  # nominal rate: the auditor must not use the true N

    coin = torch.Generator().manual_seed(seed + 2)

    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.mixed = 0
            self.lin = torch.nn.Linear(d + m, K, bias=False)
            with torch.no_grad():
                self.lin.weight[:, d:] = 0

        def training_step(self, b, i):
            x = b[0]
            if mix and self.training and len(x) > 1 and torch.rand((), generator=coin) < mix:
                self.mixed += 1
                x = 0.5 * x + 0.5 * x[torch.randperm(len(x), generator=coin)]
            return F.cross_entropy(self.lin(x), b[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    class Auditor(L.Callback):
        """Sees only the released iterates (canary columns of W) and scores each canary."""
        def __init__(self):
            self.score, self.unclipped, self.residual = torch.zeros(m), 0, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch_, batch_idx):
            self.w = pl_module.lin.weight.detach()[:, d:].T.clone()  # (m, K) at W_t

        def on_train_batch_end(self, trainer, pl_module, outputs, batch_, batch_idx):
            step = pl_module.lin.weight.detach()[:, d:].T - self.w
            grad = scale * (torch.softmax(scale * self.w, 1) - F.one_hot(canary_y, K))
            norm = grad.norm(dim=1)
            a = torch.clamp(norm, max=clip)  # the clipped norm the claim promises
            self.unclipped += int((norm < clip).sum())
            yt = -(batch / lr) * (step * grad).sum(1) / norm
            # noise off, the release of a correct mechanism is 0 or exactly a_t: a check that
            # the auditor reads the mechanism right (step size, clipping, normalization)
            off = torch.minimum(yt.abs(), (yt - a).abs()).max() / clip
            self.residual = max(self.residual, float(off))
            z = (2 * a * yt - a ** 2) / (2 * (sigma * clip) ** 2)
            self.score += torch.logaddexp(torch.full_like(z, math.log1p(-q)), math.log(q) + z)

    L.seed_everything(seed, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dp = DPSGD(noise_multiplier=sigma, delta=delta, max_grad_norm=clip, accountant="prv",
                   seed=seed)
    spy = Auditor()
    trainer = L.Trainer(max_steps=steps, callbacks=[dp, spy], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    t0 = time.time()
    with breakage(broken), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = Linear()
        trainer.fit(module, DataLoader(TensorDataset(X, Y), batch_size=batch))
    result = audit(spy.score.numpy(), member.numpy(), delta, level)
    rep = dp.report
    return {"sigma": sigma, "broken": broken, "mix": mix, "mixed_steps": module.mixed, "claimed_epsilon": rep["epsilon"], "delta": delta,
            "q": rep["sample_rate"], "steps": rep["accounted_steps"], "m": m,
            "canaries_in": int(member.sum()), "clip": clip, "scale": scale, "lr": lr,
            "batch": batch, "n_real": n_real, "seed": seed, "level": level,
            "unclipped_canary_steps": spy.unclipped / (m * steps),
            "max_residual_to_0_or_a": spy.residual, "train_s": round(time.time() - t0, 1),
            "ideal_eps_lower_bound": ideal_bound(sigma, q, steps, m, delta, level, seed), **result}


@contextlib.contextmanager
def breakage(kind: str):
    """A deliberately broken mechanism: ``clip`` (clip factors all 1), ``noise`` (std 0)."""
    import torch
    from regularizers.dp import mechanism
    saved = {name: getattr(mechanism, name) for name in ("clip_factors", "noisy_mean_")}
    if kind == "clip":
        mechanism.clip_factors = lambda norms, max_norm: torch.ones_like(norms)
    elif kind == "noise":
        orig, sig = saved["noisy_mean_"], inspect.signature(saved["noisy_mean_"])

        def silent(*a, **k):
            bound = sig.bind(*a, **k)
            bound.arguments["noise_std"] = 0.0
            return orig(*bound.args, **bound.kwargs)
        mechanism.noisy_mean_ = silent
    elif kind != "none":
        raise ValueError(f"broken={kind!r}: choose none, clip or noise")
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(mechanism, name, fn)


def table(rows: list[dict]) -> str:
    mech = {"none": "DPSGD", "clip": "broken: clipping off", "noise": "broken: noise off",
            "correlation": "broken: noise not correlated"}
    out = ["| m | sigma | mechanism | claimed eps (PRV) | eps lower bound | ideal mechanism's "
           "| guesses r | correct | claim refuted |", "|" + " --- |" * 9]
    for r in rows:
        name = mech[r["broken"]] + (f" (bandmf b={r['bands']})" if "bands" in r else "")
        out.append(f"| {r['m']} | {r['sigma']:g} | {name} | "
                   f"{r['claimed_epsilon']:.3f} | {r['eps_lower_bound']:.3f} | "
                   f"{r['ideal_eps_lower_bound']:.3f} | {r['best']['r']} | "
                   f"{r['best']['correct']} | "
                   f"{'YES' if r['eps_lower_bound'] > r['claimed_epsilon'] else 'no'} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    ap.add_argument("--broken", nargs="+", default=["none"],
                    choices=["none", "clip", "noise", "correlation"])
    ap.add_argument("--noise", default="gaussian", choices=["gaussian", "bandmf"])
    ap.add_argument("--bands", type=int, default=16, help="with --noise bandmf")
    ap.add_argument("--strategy", default="optimized", help="with --noise bandmf")
    ap.add_argument("--m", type=int, default=1000, help="number of canaries")
    ap.add_argument("--mix", type=float, default=0.0,
                    help="probability of mixup per batch inside the training step")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--n-real", type=int, default=1000, help="real MNIST rows")
    ap.add_argument("--batch", type=int, default=75, help="expected batch size q N")
    ap.add_argument("--lr", type=float, default=0.15)
    ap.add_argument("--scale", type=float, default=10.0, help="canary feature value s")
    ap.add_argument("--clip", type=float, default=1.0, help="max_grad_norm C")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--level", type=float, default=0.05, help="1 - confidence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path("runs/dp_audit"))
    a = ap.parse_args(argv)
    rows = []
    for sigma in a.sigmas:
        for kind in a.broken:
            if a.noise == "bandmf":
                from scripts.dp_audit_bandmf import run as run_bandmf
                rows.append(run_bandmf(sigma, a.m, a.steps, a.n_real, a.batch, a.lr, a.scale,
                                       a.clip, a.delta, a.seed, a.data, kind, a.level, a.bands,
                                       a.strategy))
            elif kind == "correlation":
                raise SystemExit("--broken correlation needs --noise bandmf")
            else:
                rows.append(run(sigma, a.m, a.steps, a.n_real, a.batch, a.lr, a.scale, a.clip,
                                a.delta, a.seed, a.data, kind, a.level, a.mix))
            print(json.dumps({k: rows[-1].get(k) for k in ("sigma", "broken", "mix",
                                                          "claimed_epsilon", "eps_lower_bound",
                                                          "train_s")}), flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "audit.json").write_text(json.dumps(rows, indent=2))
    (a.out / "audit.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
