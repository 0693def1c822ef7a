"""Test accuracy against epsilon for DP-SGD on MNIST (the dpsgd_mnist recipe's setup).

    python scripts/dp_tradeoff.py --epsilons 0.5 1 2 3 8 --out runs/dp_tradeoff

For each target epsilon (delta 1e-5, PRV) sigma is calibrated for the planned steps, the
unmodified Classifier is trained with the DPSGD callback, and the test accuracy, the
epsilon actually spent, sigma and wall time go into ``tradeoff.md`` / ``tradeoff.json``
and ``tradeoff.png``. Everything else comes from recipes/dpsgd_mnist.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(eps: float, recipe: dict, data_root: str, epochs: int | None, seed: int) -> dict:
    import lightning as L

    from regularizers import DPSGD
    from toolkit import Classifier
    from toolkit.data.scattering import ScatterImageDataModule

    L.seed_everything(seed, verbose=False)
    dp_args = dict(recipe["trainer"]["callbacks"][0]["init_args"], target_epsilon=eps)
    dp = DPSGD(**dp_args)
    model = Classifier(**recipe["model"]["init_args"])
    data = ScatterImageDataModule(**{**recipe["data"]["init_args"], "root": data_root})
    trainer = L.Trainer(max_epochs=epochs or recipe["trainer"]["max_epochs"], callbacks=[dp],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=10 ** 6)
    t0 = time.time()
    trainer.fit(model, data)
    train_s = time.time() - t0
    acc = trainer.test(model, data, verbose=False)[0]["test/acc"]
    r = dp.report
    return {"target_epsilon": eps, "epsilon": r["epsilon"], "delta": r["delta"],
            "sigma": r["noise_multiplier"], "q": r["sample_rate"], "steps": r["accounted_steps"],
            "accountant": r["accountant"], "test_acc": acc, "train_s": train_s}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    eps = [r["epsilon"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(eps, [100 * r["test_acc"] for r in rows], "o-")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(eps, [f"{e:.2g}" for e in eps])
    ax.set_xlabel("epsilon spent (delta 1e-5, PRV)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("DP-SGD, ScatterNet + GroupNorm-linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 3, 8])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "dpsgd_mnist.yaml"))
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's max_epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dp_tradeoff")
    args = ap.parse_args(argv)
    recipe = yaml.safe_load(Path(args.recipe).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for eps in args.epsilons:
        rows.append(run(eps, recipe, args.data_root, args.epochs, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    (out / "tradeoff.json").write_text(json.dumps(rows, indent=2))
    lines = ["| target eps | spent eps (PRV) | sigma | q | steps | test acc | train s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target_epsilon']:g} | {r['epsilon']:.3f} | {r['sigma']:.3f} | {r['q']:.4f} | "
              f"{r['steps']} | {100 * r['test_acc']:.2f}% | {r['train_s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    (out / "tradeoff.md").write_text(table + "\n")
    print(table)
    plot(rows, out / "tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
