"""Width transfer of AdamW with the layerwise weight-decay rule ("Robust Layerwise Scaling
Rules by Proper Weight Decay Tuning", arXiv 2510.15262): in AdamW's steady state a hidden
matrix's top singular value scales as sqrt(eta / lambda) d^0.75, so muP's eta ~ 1/d with
lambda ~ sqrt(d) keeps it the same at every width d.

    python -m scripts.papers.layerwise_wd            # ~20 min on one thread
    python -m scripts.papers.layerwise_wd --quick    # a smoke run, results under runs/ only

Trains the 2-layer char GPT at widths 64, 128, 256 (head dim 32) with AdamW twice: with the
rule ``{kind: layerwise, width: d, base_width: 64}``, with plain shared lr and decay, and with
muP's lr alone (eta ~ 1/d, lambda fixed: the rule with the base decay divided by sqrt(d / 64),
which here also lowers the head's decay). At
the end of each run the spectral monitor's measure gives ||W||_2 / sqrt(fan_out / fan_in) of
every hidden matrix (the scale factor depends on the shape's aspect only, so equal values are
equal top singular values); the same is measured at initialization. Transfer: an lr x decay
grid around the base point at the base width, and the lr and decay lines through the base
point at the largest width, with the rule.

Writes runs/sweeps/layerwise/results.json (per run; rerunning resumes), and unless --quick
docs/results/layerwise_wd_lm.json and docs/figures/layerwise_widths.{md,png}.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from scripts.lm_run import train_char_lm
from toolkit.monitors.spectral import SpectralMonitor

RECIPE = "layerwise_wd_lm"


def top_singular(model) -> dict[str, float]:
    """Mean and max over hidden matrices of ||W||_2 / sqrt(fan_out/fan_in) (converged power
    iteration)."""
    m = SpectralMonitor(iters=50).measure(model)
    return {"sigma_mean": m["W/mean"], "sigma_max": m["W/max"]}


def at_init(width: int, seed: int) -> dict[str, float]:
    from toolkit import LanguageModel
    torch.manual_seed(seed)
    return top_singular(LanguageModel(vocab_size=65, block_size=64, n_layer=2,
                                      n_head=max(1, width // 32), n_embd=width))


ARMS = {"layerwise": "layerwise rule", "plain": "plain (shared lr, decay)",
        "mup_lr": "muP lr only (decay fixed)"}


def run(args, width: int, arm: str, lr_mult: float = 1.0, wd_mult: float = 1.0) -> dict:
    lr, wd = args.lr * lr_mult, args.weight_decay * wd_mult
    kw = {"weight_decay_rule": {"kind": "layerwise", "width": width,
                                "base_width": args.base_width}} if arm != "plain" else {}
    if arm == "mup_lr":  # undo the rule's sqrt(d / d0) on the decay
        wd /= (width / args.base_width) ** 0.5
    loss, model, wall = train_char_lm(steps=args.steps, batch_size=args.batch_size,
                                      n_embd=width, lr=lr, weight_decay=wd, optimizer_kwargs=kw,
                                      seed=args.seed)
    r = {"width": width, "base_width": args.base_width, "arm": arm, "lr_mult": lr_mult,
         "wd_mult": wd_mult, "lr": lr,
         "weight_decay": wd, "steps": args.steps, "val_loss": loss, "wall_s": round(wall, 1),
         **top_singular(model)}
    print(f"w={width} {arm} lr x{lr_mult:g} wd x{wd_mult:g}: val {loss:.4f} "
          f"sigma mean {r['sigma_mean']:.3f} max {r['sigma_max']:.3f} ({wall:.0f}s)", flush=True)
    return r


def plan(args) -> list[tuple]:
    jobs = [(w, arm, 1.0, 1.0) for arm in ("layerwise", "plain") for w in args.widths
            if arm == "layerwise" or w != args.base_width]  # the base width: all arms agree
    jobs += [(args.base_width, "layerwise", a, b) for a in args.mults for b in args.mults]
    jobs += [(max(args.widths), "layerwise", a, 1.0) for a in args.mults]
    jobs += [(max(args.widths), "layerwise", 1.0, b) for b in args.mults]
    jobs += [(w, "mup_lr", 1.0, 1.0) for w in args.widths if w != args.base_width]
    seen, out = set(), []
    for j in jobs:
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


def find(runs, width, arm, a=1.0, b=1.0):
    """The run at (width, arm, lr multiplier, decay multiplier); at the base width the arms
    coincide, so only its layerwise run exists."""
    arm = "layerwise" if width == runs[0]["base_width"] else arm
    return next(r for r in runs if (r["width"], r["arm"], r["lr_mult"], r["wd_mult"])
                == (width, arm, a, b))


def summarize(runs, args, init) -> dict:
    base, top = args.base_width, max(args.widths)
    v = {}
    for arm in ARMS:
        for w in args.widths:
            r = find(runs, w, arm)
            v[f"sigma_mean_{arm}_w{w}"] = round(r["sigma_mean"], 4)
            v[f"sigma_max_{arm}_w{w}"] = round(r["sigma_max"], 4)
            v[f"val_loss_{arm}_w{w}"] = round(r["val_loss"], 4)
        v[f"sigma_mean_ratio_{arm}_w{top}_over_w{base}"] = round(
            v[f"sigma_mean_{arm}_w{top}"] / v[f"sigma_mean_{arm}_w{base}"], 3)
    for w in args.widths:
        v[f"sigma_mean_init_w{w}"] = round(init[w]["sigma_mean"], 4)
    for w in (base, top):
        lr_line = {a: find(runs, w, "layerwise", a, 1.0)["val_loss"] for a in args.mults}
        wd_line = {b: find(runs, w, "layerwise", 1.0, b)["val_loss"] for b in args.mults}
        v[f"best_lr_mult_w{w}"] = min(lr_line, key=lr_line.get)
        v[f"best_wd_mult_w{w}"] = min(wd_line, key=wd_line.get)
    grid = {(a, b): find(runs, base, "layerwise", a, b)["val_loss"]
            for a in args.mults for b in args.mults}
    v[f"best_grid_lr_mult_w{base}"], v[f"best_grid_wd_mult_w{base}"] = min(grid, key=grid.get)
    v.update(base_lr=args.lr, base_weight_decay=args.weight_decay, steps=args.steps,
             batch_size=args.batch_size)
    return v


def table(runs, args, init) -> str:
    rows = ["| width | sigma at init | " + " | ".join(f"{a}: sigma mean / max | {a}: val"
                                                     for a in ARMS) + " |", "|---" * 8 + "|"]
    for w in args.widths:
        cells = [f"{r['sigma_mean']:.3f} / {r['sigma_max']:.3f} | {r['val_loss']:.4f}"
                 for r in (find(runs, w, a) for a in ARMS)]
        rows.append(f"| {w} | {init[w]['sigma_mean']:.3f} | " + " | ".join(cells) + " |")
    rows += ["", "| width | " + " | ".join(f"lr x{a:g}" for a in args.mults) + " | "
             + " | ".join(f"decay x{b:g}" for b in args.mults) + " |",
             "|---" * (2 * len(args.mults) + 1) + "|"]
    for w in (args.base_width, max(args.widths)):
        lr_line = [find(runs, w, "layerwise", a, 1.0)["val_loss"] for a in args.mults]
        wd_line = [find(runs, w, "layerwise", 1.0, b)["val_loss"] for b in args.mults]
        rows.append(f"| {w} (rule) | " + " | ".join(f"{x:.4f}" for x in lr_line + wd_line) + " |")
    return "\n".join(rows)


def plot(runs, args, init, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ws = args.widths
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.5))
    for arm, label in ARMS.items():
        ax[0].plot(ws, [find(runs, w, arm)["sigma_mean"] for w in ws], marker="o", label=label)
        ax[1].plot(ws, [find(runs, w, arm)["val_loss"] for w in ws], marker="o", label=label)
    ax[0].plot(ws, [init[w]["sigma_mean"] for w in ws], marker="x", ls="--", label="at init")
    ax[0].set_ylabel("mean ||W||_2 / sqrt(fan_out/fan_in)")
    ax[1].set_ylabel("final validation loss")
    for a in ax[:2]:
        a.set_xscale("log", base=2)
        a.set_xlabel("width d")
        a.legend(fontsize=8)
    for w, ls in ((args.base_width, "-"), (max(args.widths), "--")):
        ax[2].plot(args.mults, [find(runs, w, "layerwise", m, 1.0)["val_loss"] for m in args.mults],
                   ls=ls, marker="o", color="C0", label=f"lr x, width {w}")
        ax[2].plot(args.mults, [find(runs, w, "layerwise", 1.0, m)["val_loss"] for m in args.mults],
                   ls=ls, marker="s", color="C3", label=f"decay x, width {w}")
    ax[2].set_xscale("log", base=2)
    ax[2].set_xlabel("multiplier of the base lr / decay (rule on)")
    ax[2].set_ylabel("final validation loss")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--base-width", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01, help="base lr (at the base width)")
    ap.add_argument("--weight-decay", type=float, default=0.5, help="base decay")
    ap.add_argument("--mults", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                    help="lr and decay multipliers of the transfer grid")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny budget, nothing written to docs/")
    ap.add_argument("--out", default="runs/sweeps/layerwise")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.widths, args.base_width, args.steps, args.out = [32, 64], 32, 20, args.out + "_quick"
    if args.base_width not in args.widths or 1.0 not in args.mults:
        raise SystemExit("--widths must include --base-width and --mults must include 1.0 "
                         "(the base point)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    runs = json.loads(path.read_text()) if path.exists() else []
    config = {"steps": args.steps, "base_width": args.base_width, "base_lr": args.lr,
              "base_weight_decay": args.weight_decay, "batch_size": args.batch_size,
              "seed": args.seed}
    runs = [r for r in runs if r["config"] == config]  # a changed setting starts afresh
    for r in runs:  # results written before the third arm: rule on / off
        if "arm" not in r:
            r["arm"] = "layerwise" if r.pop("rule") else "plain"
    for job in plan(args):
        if any((r["width"], r["arm"], r["lr_mult"], r["wd_mult"]) == job for r in runs):
            continue
        runs.append({**run(args, *job), "config": config})
        path.write_text(json.dumps(runs, indent=1))
    init = {w: at_init(w, args.seed) for w in args.widths}
    md = table(runs, args, init)
    values = summarize(runs, args, init)
    print(md)
    print(json.dumps(values, indent=1))
    if args.quick:
        return 0
    cmd = "python -m scripts.papers.layerwise_wd"
    plot(runs, args, init, Path("docs/figures/layerwise_widths.png"))
    Path("docs/figures/layerwise_widths.md").write_text(
        f"# Layerwise weight decay across widths\n\n`{cmd}`: 2-layer char GPT, context 64, "
        f"batch {args.batch_size}, {args.steps} steps, AdamW base lr {args.lr:g} and decay "
        f"{args.weight_decay:g} at width {args.base_width} (seed {args.seed}). sigma: "
        "||W||_2 / sqrt(fan_out/fan_in) of the hidden matrices at the end (mean / max).\n\n"
        f"{md}\n\n![](layerwise_widths.png)\n")
    from scripts.results import record
    record(RECIPE, values, command=cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
