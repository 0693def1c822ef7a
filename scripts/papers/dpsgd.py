"""Utility against epsilon for DP-SGD recipes: MNIST accuracy (dpsgd_mnist) or char-LM
validation loss (dp_lm), each beside the non-private run at equal steps.

    python -m scripts.papers.dpsgd --epsilons 0.5 1 2 3 8 --out runs/dp_tradeoff
    python -m scripts.papers.dpsgd --recipe recipes/dp_lm.yaml --epsilons 1 3 8 --non-private

For each target epsilon (the recipe's delta and accountant) sigma is calibrated for the
planned steps, the recipe's unmodified module is trained with the DPSGD callback, and the
metric, the epsilon actually spent, sigma and wall time go into ``tradeoff.md`` /
``tradeoff.json`` and ``tradeoff.png``. Everything else comes from the recipe.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def build(node: dict, **override):
    module, name = node["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**node.get("init_args", {}), **override})


def run(eps: float | None, recipe: dict, data_root: str | None, epochs: int | None,
        seed: int) -> dict:
    """One run at target ``eps`` (None: the same run without DP-SGD)."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    tr = recipe["trainer"]
    callbacks = [build(tr["callbacks"][0], target_epsilon=eps)] if eps is not None else []
    model = build(recipe["model"])
    data = build(recipe["data"], **({"root": data_root} if data_root else {}))
    lm = "max_steps" in tr
    budget = {"max_steps": tr["max_steps"]} if lm else {"max_epochs": epochs or tr["max_epochs"]}
    trainer = L.Trainer(**budget, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=tr.get("limit_val_batches"),
                        check_val_every_n_epoch=10 ** 6 if not lm else None,
                        val_check_interval=10 ** 6 if lm else None)
    t0 = time.time()
    trainer.fit(model, data)
    train_s = time.time() - t0
    if lm:
        metric = {"val_loss": trainer.validate(model, data, verbose=False)[0]["val/loss"]}
    else:
        metric = {"test_acc": trainer.test(model, data, verbose=False)[0]["test/acc"]}
    row = {"target_epsilon": eps if eps is not None else math.inf, **metric,
           "train_s": train_s, "steps": trainer.global_step}
    if callbacks:
        r = callbacks[0].report
        row.update(epsilon=r["epsilon"], delta=r["delta"], sigma=r["noise_multiplier"],
                   q=r["sample_rate"], steps=r["accounted_steps"], accountant=r["accountant"])
    else:
        row.update(epsilon=math.inf, delta=0.0, sigma=0.0, q=math.nan, accountant="none")
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    key = "val_loss" if "val_loss" in rows[0] else "test_acc"
    scale = 1 if key == "val_loss" else 100
    private = [r for r in rows if math.isfinite(r["epsilon"])]
    eps = [r["epsilon"] for r in private]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, [scale * r[key] for r in private], "o-", label="DP-SGD")
    for r in rows:
        if not math.isfinite(r["epsilon"]):
            ax.axhline(scale * r[key], color="gray", ls="--", label="non-private, same steps")
    ax.legend()
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:.2g}" for e in eps])
    ax.set_xlabel("epsilon spent (delta 1e-5, PRV)")
    ax.set_ylabel("validation loss (nats/char)" if key == "val_loss" else "test accuracy (%)")
    ax.set_title(path.parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 3, 8])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "dpsgd_mnist.yaml"))
    ap.add_argument("--data-root", default=None,
                    help="data folder (default: ../shared/data/mnist for image recipes)")
    ap.add_argument("--non-private", action="store_true", help="also run without DP-SGD")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dp_tradeoff")
    ap.add_argument("--record", action="store_true", help="write the figures to "
                    "docs/results/<recipe>.json (dp_lm, dpsgd_mnist), README and the header")
    args = ap.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = args.data_root
    if root is None and "root" in recipe["data"].get("init_args", {}):
        root = str(ROOT.parent / "shared" / "data" / "mnist")
    rows = []
    for eps in list(args.epsilons) + ([None] if args.non_private else []):
        rows.append(run(eps, recipe, root, args.epochs, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    (out / "tradeoff.json").write_text(json.dumps(rows, indent=2))
    lm = "val_loss" in rows[0]
    lines = [f"| target eps | spent eps | sigma | q | steps | {'val loss' if lm else 'test acc'} "
             "| train s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target_epsilon']:g} | {r['epsilon']:.3f} | {r['sigma']:.3f} | {r['q']:.4f} | "
              f"{r['steps']} | {r['val_loss']:.4f} | {r['train_s']:.0f} |" if lm else
              f"| {r['target_epsilon']:g} | {r['epsilon']:.3f} | {r['sigma']:.3f} | {r['q']:.4f} | "
              f"{r['steps']} | {100 * r['test_acc']:.2f}% | {r['train_s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    (out / "tradeoff.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "tradeoff.png")
    if args.record:  # CPU time (user + sys) of this command: on a shared machine wall time is not
        record_rows(Path(args.recipe).stem, rows, cpu_s=time.process_time())  # a figure
    return 0


def record_rows(recipe: str, rows: list[dict], cpu_s: float) -> None:
    """The numbers the recipe's header and README row quote, from this sweep's rows."""
    from scripts.results import record
    by_target = {r["target_epsilon"]: r for r in rows if math.isfinite(r["epsilon"])}
    if recipe == "dp_lm":
        values = {f"eps{t:g}_val": round(r["val_loss"], 3) for t, r in by_target.items()}
        if 8 in by_target:
            values["eps8_spent"] = round(by_target[8]["epsilon"], 3)
        for r in rows:  # the non-private run (the last one, if several)
            if not math.isfinite(r["epsilon"]):
                values["non_private_val"] = round(r["val_loss"], 3)
    elif recipe == "dpsgd_mnist" and 3 in by_target:
        r = by_target[3]
        values = {"test_acc": round(100 * r["test_acc"], 2), "epsilon": round(r["epsilon"], 2),
                  "cpu_s": round(cpu_s)}
    else:
        print(f"--record: no results layout for {recipe}; nothing recorded")
        return
    record(recipe, values)


if __name__ == "__main__":
    sys.exit(main())
