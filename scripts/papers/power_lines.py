"""Batch size x weight decay on the char GPT at a fixed token budget (Power Lines, Bergsma et
al., arXiv 2505.13738, Sec. 3: the AdamW timescale tau = B / (eta lambda D); at fixed model
and data size the best tau stays put, so the best lambda grows linearly with B):

    python -m scripts.papers.power_lines            # ~15 min on one thread
    python -m scripts.papers.power_lines --quick    # a smoke run, results under runs/ only

Every run sees the same D tokens (steps = D / (B T)), the same peak lr and the same schedule
shape (warmup over 5% of the steps, cosine to 0.1x). Per batch size the best lambda is the
vertex of a parabola in log lambda through the grid argmin and its two neighbours (reported as
not bracketed when the argmin sits on the grid's edge); tau* = B / (eta lambda* D). The slope
of log lambda* against log B is a least-squares line (the paper: about 1).

Writes runs/sweeps/powerlines/results.json (per run; rerunning resumes the grid), and unless
--quick docs/results/powerlines_wd_lm.json, docs/figures/powerlines_sweep.{md,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from optimizers import tau_from_weight_decay
from scripts.lm_run import train_char_lm

RECIPE = "powerlines_wd_lm"


def optimum(lams: list[float], losses: list[float]) -> tuple[float, bool]:
    """(lambda*, bracketed): vertex of a least-squares parabola in log lambda through the grid
    argmin and up to two neighbours on each side (one noisy point moves it less than a
    three-point fit); the argmin itself when it lies on the edge of the grid or the fit opens
    downwards."""
    i = int(np.argmin(losses))
    if i == 0 or i == len(lams) - 1:
        return lams[i], False
    lo, hi = max(0, i - 2), min(len(lams), i + 3)
    a, b, _ = np.polyfit(np.log(lams[lo:hi]), losses[lo:hi], 2)
    if a <= 0:
        return lams[i], False
    x = -b / (2 * a)
    return float(math.exp(min(max(x, math.log(lams[lo])), math.log(lams[hi - 1])))), True


def mean_over_seeds(runs: list[dict]) -> list[dict]:
    """One row per (B, lambda): mean final val loss over the seeds run, and their spread."""
    out = []
    for B, lam in sorted({(r["batch_size"], r["weight_decay"]) for r in runs}):
        rs = [r for r in runs if (r["batch_size"], r["weight_decay"]) == (B, lam)]
        losses = [r["val_loss"] for r in rs]
        out.append({"batch_size": B, "weight_decay": lam, "steps": rs[0]["steps"],
                    "val_loss": float(np.mean(losses)), "n_seeds": len(rs),
                    "seed_std": float(np.std(losses, ddof=1)) if len(rs) > 1 else math.nan})
    return out


def analyze(runs: list[dict], lr: float) -> dict:
    per_b = {}
    for B in sorted({r["batch_size"] for r in runs}):
        rs = sorted((r for r in runs if r["batch_size"] == B and r["weight_decay"] > 0),
                    key=lambda r: r["weight_decay"])
        lams, losses = [r["weight_decay"] for r in rs], [r["val_loss"] for r in rs]
        lam, bracketed = optimum(lams, losses)
        steps = rs[0]["steps"]
        per_b[B] = {"lambda_star": lam, "lambda_grid_argmin": lams[int(np.argmin(losses))],
                    "bracketed": bracketed, "steps": steps,
                    "tau_star": tau_from_weight_decay(lam, lr, steps=steps),
                    "best_val_loss": min(losses),
                    "val_loss_no_decay": next((r["val_loss"] for r in runs if r["batch_size"] == B
                                               and r["weight_decay"] == 0), math.nan)}
    bs = sorted(per_b)
    slope = float(np.polyfit(np.log(bs), np.log([per_b[b]["lambda_star"] for b in bs]), 1)[0]) \
        if len(bs) > 1 else math.nan
    return {"per_batch": per_b, "slope_log_lambda_vs_log_B": slope}


def table(runs: list[dict], summary: dict) -> str:
    lams = sorted({r["weight_decay"] for r in runs})
    rows = ["| B | steps | " + " | ".join(f"lambda {x:g}" for x in lams)
            + " | lambda* | tau* | seed std |", "|---" * (len(lams) + 5) + "|"]
    for B, s in summary["per_batch"].items():
        got = {r["weight_decay"]: r["val_loss"] for r in runs if r["batch_size"] == B}
        cells = [("**%.4f**" if x == s["lambda_grid_argmin"] else "%.4f") % got[x]
                 if x in got else "-" for x in lams]
        star = f"{s['lambda_star']:.3g}" + ("" if s["bracketed"] else " (edge)")
        spread = np.nanmean([r.get("seed_std", math.nan) for r in runs if r["batch_size"] == B]
                            or [math.nan])
        rows.append(f"| {B} | {s['steps']} | " + " | ".join(cells)
                    + f" | {star} | {s['tau_star']:.3g} | {spread:.3f} |")
    return "\n".join(rows)


def plot(runs: list[dict], summary: dict, lr: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for B, s in summary["per_batch"].items():
        rs = sorted((r for r in runs if r["batch_size"] == B and r["weight_decay"] > 0),
                    key=lambda r: r["weight_decay"])
        lam = np.array([r["weight_decay"] for r in rs])
        loss = np.array([r["val_loss"] for r in rs])
        err = np.array([r.get("seed_std", math.nan) for r in rs])
        err = None if np.isnan(err).all() else err
        line = axes[0].errorbar(lam, loss, yerr=err, marker="o", capsize=2,
                                label=f"B={B} ({s['steps']} steps)").lines[0]
        # shapes overlaid: a fixed tau* puts every curve's minimum at the same abscissa
        axes[1].errorbar(1 / (lr * lam * s["steps"]), loss - loss.min(), yerr=err, marker="o",
                         capsize=2, color=line.get_color())
        for ax, x in ((axes[0], s["lambda_star"]), (axes[1], s["tau_star"])):
            ax.axvline(x, color=line.get_color(), ls=":", lw=1)
    axes[0].set_xlabel("weight decay lambda")
    axes[1].set_xlabel("tau = B / (eta lambda D)")
    axes[0].set_ylabel("final validation loss")
    axes[1].set_ylabel("minus the best of its batch size")
    axes[0].set_title(f"log lambda* vs log B slope {summary['slope_log_lambda_vs_log_B']:.2f}")
    axes[1].set_title("same runs against the timescale tau")
    for ax in axes:
        ax.set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--lambdas", type=float, nargs="+",
                    default=[0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6])
    ap.add_argument("--tokens", type=int, default=16 * 64 * 1200, help="D, the same for every B")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="each point is the mean final val loss over these seeds")
    ap.add_argument("--quick", action="store_true", help="tiny budget, nothing written to docs/")
    ap.add_argument("--out", default="runs/sweeps/powerlines")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.tokens, args.lambdas, args.out = 16 * 64 * 40, [0.1, 1.0, 10.0], args.out + "_quick"
    for B in args.batch_sizes:
        if args.tokens % (B * args.block_size):
            raise SystemExit(f"--tokens {args.tokens} is not a multiple of B*T = "
                             f"{B * args.block_size}: every batch size must see the same tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    key = lambda r: (r["batch_size"], r["weight_decay"], r["tokens"], r["lr"], r.get("seed", 0))
    done = {key(r) for r in runs}
    for seed in args.seeds:
        for B in args.batch_sizes:
            steps = args.tokens // (B * args.block_size)
            for lam in args.lambdas:
                r = {"batch_size": B, "weight_decay": lam, "tokens": args.tokens, "lr": args.lr,
                     "seed": seed}
                if key(r) in done:
                    continue
                loss, _, wall = train_char_lm(steps=steps, batch_size=B,
                                              block_size=args.block_size, n_layer=args.n_layer,
                                              n_embd=args.n_embd, lr=args.lr, weight_decay=lam,
                                              seed=seed)
                runs.append({**r, "steps": steps, "val_loss": loss, "wall_s": round(wall, 1)})
                print(f"seed {seed} B={B} lambda={lam:g} steps={steps}: val {loss:.4f} "
                      f"({wall:.0f}s)", flush=True)
                path.write_text(json.dumps(runs, indent=1))
    runs = mean_over_seeds([r for r in runs if r["tokens"] == args.tokens and r["lr"] == args.lr
                            and r["batch_size"] in args.batch_sizes
                            and r["weight_decay"] in args.lambdas
                            and r.get("seed", 0) in args.seeds])
    summary = analyze(runs, args.lr)
    md = table(runs, summary)
    print(md, f"\nslope of log lambda* vs log B: {summary['slope_log_lambda_vs_log_B']:.3f}")
    if args.quick:
        return 0
    given = sys.argv[1:] if argv is None else argv
    cmd = " ".join(["python -m scripts.papers.power_lines", *given])
    plot(runs, summary, args.lr, Path("docs/figures/powerlines_sweep.png"))
    Path("docs/figures/powerlines_sweep.md").write_text(
        f"# Power Lines sweep: batch size x weight decay\n\n`{cmd}`: {args.n_layer}x{args.n_embd} "
        f"char GPT, context {args.block_size}, AdamW lr {args.lr:g}, D = {args.tokens} tokens "
        f"for every B. Final validation loss (mean over seeds {args.seeds}); bold: grid argmin; "
        "lambda*: parabola vertex in log lambda; tau* = B / (eta lambda* D).\n\n"
        f"{md}\n\nSlope of "
        f"log lambda* vs log B: {summary['slope_log_lambda_vs_log_B']:.3f} (paper: ~1).\n"
        "![](powerlines_sweep.png)\n")
    values = {"slope_log_lambda_vs_log_B": round(summary["slope_log_lambda_vs_log_B"], 3),
              "tokens": args.tokens, "lr": args.lr, "seeds": len(args.seeds)}
    spread = [r["seed_std"] for r in runs if r["n_seeds"] > 1]
    if spread:  # the noise floor the optimum has to be read against
        values["seed_std_mean"] = round(float(np.mean(spread)), 4)
    for B, s in summary["per_batch"].items():
        values.update({f"lambda_star_B{B}": round(s["lambda_star"], 4),
                       f"tau_star_B{B}": round(s["tau_star"], 4),
                       f"bracketed_B{B}": s["bracketed"],
                       f"best_val_loss_B{B}": round(s["best_val_loss"], 4),
                       f"val_loss_no_decay_B{B}": round(s["val_loss_no_decay"], 4)})
        spread = [r["seed_std"] for r in runs if r["batch_size"] == B and r["n_seeds"] > 1]
        if spread:
            values[f"seed_std_B{B}"] = round(float(np.mean(spread)), 4)
    from scripts.results import record
    record(RECIPE, values, command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
