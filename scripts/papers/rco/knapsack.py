"""Synthetic multiple-choice knapsack: RCO vs a penalty method vs the exact optimum.

N groups x K options, integer costs 1..8, total cost <= B (B halfway between the cheapest and
the dearest choice). Objectives (maximized): ``linear`` sum_n v[n, x_n] (values grow with cost,
so the budget binds) and ``quadratic`` = linear + sum_{n<m} Q[n, x_n, m, x_m] (not separable
across groups, the setting RCO is for). References: brute force over all K^N choices (N <= 10)
or, for the linear objective at larger N, the exact DP (``optimizers.budget_dp``).

Both searches use Adam on (N, K) logits, Gumbel straight-through samples and the same steps,
lr and temperature schedule (tau 1 -> 0.05). RCO (``optimizers.RCO``) samples by the budget DP
on the perturbed logits and keeps the relaxation on the budget manifold; its answer is the DP
rounding of the final logits (max sum log p under the budget), and "best sample" the best
feasible sample met. The penalty method adds lam * ((E_p[cost] - B) / B)^2 to the loss, samples
by argmax, and answers the argmax of its final logits (infeasible answers count as 0%); the
table also gives it RCO's finish (DP rounding of its final probabilities) for a fair repair.

    python -m scripts.papers.rco.knapsack            # writes docs/results/rco_knapsack.json, docs/rco.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from optimizers import RCO, budget_dp
from optimizers.rco import gumbel_straight_through

COMMAND = "python -m scripts.papers.rco.knapsack"
LAMBDAS = (1.0, 10.0, 100.0, 1000.0)


def make_instance(seed: int, n: int, k: int, quadratic: bool):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 9, (n, k), generator=g).double()
    values = torch.rand(n, k, generator=g, dtype=torch.float64) + costs / 8
    q = None
    if quadratic:
        q = torch.randn(n, k, n, k, generator=g, dtype=torch.float64) * (0.5 / n ** 0.5)
        mask = torch.triu(torch.ones(n, n, dtype=torch.float64), diagonal=1)
        q = q * mask[:, None, :, None]
    budget = float(costs.min(1).values.sum() + 0.5 * (costs.max(1).values - costs.min(1).values).sum())
    return costs, values, q, budget


def objective(x: torch.Tensor, values: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """f of a (possibly soft) one-hot (N, K) assignment."""
    out = (x * values).sum()
    if q is not None:
        out = out + torch.einsum("nk,nkml,ml->", x, q, x)
    return out


def brute_force(costs, values, q, budget, chunk=1 << 18) -> float:
    n, k = values.shape
    c, v = costs.numpy(), values.numpy()
    qn = None if q is None else q.numpy()
    best = -np.inf
    all_x = itertools.product(range(k), repeat=n)
    while True:
        block = np.array(list(itertools.islice(all_x, chunk)), dtype=np.int64)
        if block.size == 0:
            return float(best)
        rows = np.arange(n)
        cost = c[rows, block].sum(1)
        val = v[rows, block].sum(1)
        if qn is not None:
            for a, b in itertools.combinations(range(n), 2):
                val = val + qn[a, block[:, a], b, block[:, b]]
        val[cost > budget + 1e-9] = -np.inf
        best = max(best, val.max())


def search(costs, values, q, budget, method: str, lam: float = 0.0, steps: int = 300,
           lr: float = 0.05, seed: int = 0) -> dict:
    n, k = values.shape
    a = torch.zeros(n, k, dtype=torch.float64, requires_grad=True)
    if method == "rco":
        opt = RCO([a], costs=costs, budget=budget, lr=lr)
    else:
        opt = torch.optim.Adam([a], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    best_sample = -np.inf
    rows = torch.arange(n)
    for step in range(steps):
        tau = 0.05 ** (step / max(steps - 1, 1))
        opt.zero_grad()
        if method == "rco":
            onehot, idx = gumbel_straight_through(a, tau, gen, costs=costs, budget=budget)
        else:
            onehot, idx = gumbel_straight_through(a, tau, gen)
        f = objective(onehot, values, q)
        if float(costs[rows, idx].sum()) <= budget:
            best_sample = max(best_sample, float(f.detach()))
        loss = -f
        if method == "penalty":
            expected = (torch.softmax(a, -1) * costs).sum()
            loss = loss + lam * ((expected - budget) / budget) ** 2
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = torch.softmax(a, -1)
        relax_err = abs(float((p * costs).sum()) - budget) / budget
        rounded = budget_dp(costs, torch.log(p.clamp_min(1e-300)), budget).choice
        choice = rounded if method == "rco" else a.argmax(-1)
        cost = float(costs[rows, choice].sum())
        value = float(objective(one_hot(choice, k), values, q)) if cost <= budget else -np.inf
        dp_value = float(objective(one_hot(rounded, k), values, q))
    return {"value": value, "dp_value": dp_value, "best_sample": best_sample,
            "relax_budget_err": relax_err}


def one_hot(choice: torch.Tensor, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(choice, k).double()


def run(cases, steps: int) -> dict:
    rows = []
    for name, n, k, quadratic, seeds in cases:
        methods = ["rco"] + [f"penalty{lam:g}" for lam in LAMBDAS]
        res = {f"{m}/{f}": [] for m in methods
               for f in ("answer", "feasible", "dp_rounded", "best_sample", "budget_err")}
        t0 = time.time()
        for seed in seeds:
            costs, values, q, budget = make_instance(seed, n, k, quadratic)
            if n <= 10:
                opt_value = brute_force(costs, values, q, budget)
            else:
                opt_value = budget_dp(costs, values, budget).score
            for m in methods:
                lam = 0.0 if m == "rco" else float(m[len("penalty"):])
                r = search(costs, values, q, budget, "rco" if m == "rco" else "penalty", lam=lam,
                           steps=steps)
                feas = bool(np.isfinite(r["value"]))
                res[f"{m}/answer"].append(100 * r["value"] / opt_value if feas else 0.0)
                res[f"{m}/feasible"].append(100.0 * feas)
                res[f"{m}/dp_rounded"].append(100 * r["dp_value"] / opt_value)
                res[f"{m}/best_sample"].append(100 * r["best_sample"] / opt_value)
                res[f"{m}/budget_err"].append(r["relax_budget_err"])
        row = {"case": name, "n": n, "k": k, "instances": len(seeds),
               "reference": "brute force" if n <= 10 else "DP",
               "seconds": round(time.time() - t0, 1)}
        row.update({key: float(np.mean(v)) for key, v in res.items()})
        row.update({f"{m}/budget_err_max": float(np.max(res[f"{m}/budget_err"])) for m in methods})
        rows.append(row)
        print({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()},
              flush=True)
    return rows


def write(rows, out_json: Path, out_md: Path, steps: int) -> None:
    values = {}
    for r in rows:
        for key, v in r.items():
            if key not in ("case", "n", "k", "reference", "instances", "seconds"):
                values[f"{r['case']}_N{r['n']}/{key}"] = float(f"{v:.6g}")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"script": "rco_knapsack", "command": COMMAND,
                                    "values": values}, indent=1) + "\n")
    lines = ["| objective | N x K | inst. | reference | method | answer (% of optimum) | answer "
             "feasible | DP rounding of final p | best feasible sample | relaxed budget error "
             "(max, relative) |", "|" + " --- |" * 10]
    for r in rows:
        for m in ["rco"] + [f"penalty{lam:g}" for lam in LAMBDAS]:
            label = "RCO (answer = DP rounding)" if m == "rco" else \
                f"penalty lam={m[len('penalty'):]} (answer = argmax)"
            lines.append(f"| {r['case']} | {r['n']} x {r['k']} | {r['instances']} | "
                         f"{r['reference']} | {label} | {r[m + '/answer']:.1f}% | "
                         f"{r[m + '/feasible']:.0f}% | {r[m + '/dp_rounded']:.1f}% | "
                         f"{r[m + '/best_sample']:.1f}% | {r[m + '/budget_err_max']:.1e} |")
    table = "\n".join(lines)
    md = out_md.read_text() if out_md.exists() else ""
    start, end = "<!-- rco-knapsack-table -->", "<!-- /rco-knapsack-table -->"
    block = f"{start}\n{table}\n\nMean % of the optimal value over instances ({steps} steps each); " \
            f"`{COMMAND}`.\n{end}"
    if start in md:
        md = md[:md.index(start)] + block + md[md.index(end) + len(end):]
    else:
        md = md + "\n" + block + "\n"
    out_md.write_text(md)
    print(table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="two instances per case, no N=10")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    s = range(2) if args.quick else None
    cases = [("linear", 8, 4, False, s or range(5)),
             ("linear", 10, 4, False, s or range(5)),
             ("linear", 64, 4, False, s or range(3)),
             ("quadratic", 8, 4, True, s or range(5)),
             ("quadratic", 10, 4, True, s or range(3))]
    if args.quick:
        cases = [c for c in cases if c[1] != 10]
    rows = run(cases, args.steps)
    root = Path(__file__).resolve().parents[3]
    write(rows, root / "docs/results/rco_knapsack.json", root / "docs/rco.md", args.steps)


if __name__ == "__main__":
    main()
