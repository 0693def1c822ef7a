"""Run recipes over seeds; print mean and std of test accuracy and loss, and plot them.

    python -m scripts.compare recipes/erm_mnist.yaml recipes/mixup_mnist.yaml \\
        recipes/kmixup_mnist.yaml --seeds 0 1 2 --set trainer.max_epochs=10

Each (recipe, seed) trains with the recipe's config and ``seed_everything=seed`` (the data
subset and order stay those of ``data.seed``, so recipes are compared on the same data),
then tests the final weights on the test split. ``--set key=value`` overrides any config
entry for every run (budget, ``data.root`` ...). Results go to ``<out>/results.json`` after
each run, and runs already there are skipped, so an interrupted sweep picks up where it was.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from scripts.sweep_io import open_sweep

ROOT = Path(__file__).resolve().parent.parent


def run_one(recipe: str, seed: int, overrides: list[str], runs_root: str) -> dict[str, float]:
    import lightning as L

    from toolkit.cli import ToolkitCLI
    args = ["--config", recipe, "--seed_everything", str(seed)] + [f"--{o}" for o in overrides]
    cli = ToolkitCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                     subclass_mode_data=True, seed_everything_default=seed, args=args, run=False,
                     save_config_kwargs={"overwrite": True}, runs_root=runs_root,
                     run_name=f"{Path(recipe).stem}/seed{seed}")
    t0 = time.time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    val = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    res = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"test_acc": float(res["test/acc"]), "test_loss": float(res["test/loss"]),
            "val_acc": val.get("val/acc", float("nan")), "val_loss": val.get("val/loss", float("nan")),
            "train_s": time.time() - t0, "steps": int(cli.trainer.global_step)}


def summarize(results: dict[str, dict[str, dict]], recipes: list[str]) -> str:
    lines = ["| recipe | seeds | test acc (%) mean ± std | test loss mean ± std | val acc (%) |",
             "|---|---|---|---|---|"]
    for r in recipes:
        runs = list(results.get(Path(r).stem, {}).values())
        if not runs:
            continue
        acc = [100 * x["test_acc"] for x in runs]
        loss = [x["test_loss"] for x in runs]
        val = [100 * x.get("val_acc", float("nan")) for x in runs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else float("nan")
        lines.append(f"| {Path(r).stem} | {len(runs)} | {statistics.mean(acc):.2f} ± {sd(acc):.2f} "
                     f"| {statistics.mean(loss):.4f} ± {sd(loss):.4f} | {statistics.mean(val):.2f} |")
    return "\n".join(lines)


def plot(results, recipes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [Path(r).stem for r in recipes if results.get(Path(r).stem)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    lowest = min(100 * x["test_acc"] for n in names for x in results[n].values())
    for ax, key, label in ((axes[0], "test_acc", "test accuracy (%)"), (axes[1], "test_loss", "test loss")):
        for i, n in enumerate(names):
            v = [x[key] * (100 if key == "test_acc" else 1) for x in results[n].values()]
            ax.bar(i, statistics.mean(v), yerr=statistics.stdev(v) if len(v) > 1 else 0,
                   color=f"C{i}", alpha=0.6, capsize=4)
            ax.plot([i] * len(v), v, "k.", ms=5)
        if key == "test_acc":
            axes[0].set_ylim(lowest - 0.5, 100)
        ax.set_xticks(range(len(names)), names, rotation=15)
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="config override for every run, e.g. trainer.max_epochs=5")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--record", action="store_true", help="write each recipe's mean/std test "
                    "accuracy and loss to docs/results/<recipe>.json, README and its header")
    args = ap.parse_args(argv)
    out, path, results = open_sweep(args.out, args.threads, {})
    for seed in args.seeds:  # seed-major: a partial sweep still has every recipe at some seeds
        for r in args.recipes:
            name = Path(r).stem
            if str(seed) in results.get(name, {}):
                continue
            print(f"=== {name} seed {seed}", flush=True)
            results.setdefault(name, {})[str(seed)] = run_one(r, seed, args.overrides, str(out))
            path.write_text(json.dumps(results, indent=2))
            print(summarize(results, args.recipes), flush=True)
    table = summarize(results, args.recipes)
    print(table)
    (out / "summary.md").write_text(f"overrides: {args.overrides}\n\n{table}\n")
    plot(results, args.recipes, out / "compare.png")
    if args.record:
        from scripts.results import record
        for name, runs in results.items():
            acc = [100 * r["test_acc"] for r in runs.values()]
            loss = [r["test_loss"] for r in runs.values()]
            record(name, {"acc_mean": round(statistics.mean(acc), 2),
                          "acc_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
                          "test_loss": round(statistics.mean(loss), 3)})
    print(f"wrote {path}, {out / 'summary.md'}, {out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
