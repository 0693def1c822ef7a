"""User-level DP on Tiny Shakespeare speakers: ULS against ELS at equal compute.

    python -m scripts.papers.dp_user_lm                          # all 15 runs, then record + plot
    python -m scripts.papers.dp_user_lm --runs uls:8:0.01 els:8::2  # mode:epsilon[:lr[:k]]
    python -m scripts.papers.dp_user_lm --record                 # record + plot what --out holds

Charles et al. 2024 (arXiv 2407.07737) compare user-level sampling (ULS: sample users, clip
each user's average gradient over up to k examples) with example-level sampling (ELS: cap
users at k examples, example-level DP-SGD, group privacy). Here both use the recipe
``recipes/dp_user_lm.yaml`` (k, steps, model, optimizer) at the same user-level (epsilon,
delta), and the same compute: ULS samples users at rate q = batch / U, so a step holds
q * sum_u min(n_u, k) examples in expectation, and ELS's expected batch is set to exactly
that. The validation loss (held-out turns) of each run, the epsilon spent and sigma go to
``--out``/rows.json; ``--record`` keeps, for each (mode, epsilon), the run of the learning
rate with the lowest validation loss (every run's loss is recorded too), and writes
``docs/results/dp_user_lm.json`` and ``docs/figures/dp_user_lm.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import yaml

from scripts.papers.dpsgd import build

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "dp_user_lm.yaml"
FIGURE = ROOT / "docs" / "figures" / "dp_user_lm.png"
# what docs/results/dp_user_lm.json holds: both methods at eps 3 and 8 (the recipe's lr), the
# lr on both sides at eps 8 (and the default 0.003 at eps 3), k = 2 (a quarter of the
# compute), and the non-private run at the same compute
RUNS = ["uls:3", "els:3", "uls:8", "els:8"] + [f"{m}:{e}:{lr}" for m in ("uls", "els")
                                               for e, lr in ((8, 0.001), (8, 0.003), (8, 0.03),
                                                             (3, 0.003))] \
    + ["uls:8::2", "els:8::2", "none:0:0.003"]


def run(mode: str, eps: float, recipe: dict, seed: int, lr: float | None = None,
        k: int | None = None) -> dict:
    """One run: ``mode`` in uls / els / none (non-private at ULS's expected batch)."""
    import lightning as L
    import torch

    L.seed_everything(seed, verbose=False)
    tr, dp_node = recipe["trainer"], recipe["trainer"]["callbacks"][0]
    k = k or dp_node["init_args"]["examples_per_user"]
    data = build(recipe["data"])
    owners = data.train_set.owner
    users = len(owners.unique())
    q = data.hparams.batch_size / users
    per_step = q * float(torch.bincount(owners).clamp(max=k).sum())  # expected examples
    if mode == "uls":
        callbacks = [build(dp_node, target_epsilon=eps, examples_per_user=k)]
    elif mode == "els":
        callbacks = [build(dp_node, target_epsilon=eps, examples_per_user=k, user_sampling="els",
                           accountant="rdp")]
        data = build(recipe["data"], batch_size=round(per_step))
    else:
        callbacks = []
        data = build(recipe["data"], batch_size=round(per_step))
    lr = lr if lr is not None else recipe["model"]["init_args"]["lr"]
    model = build(recipe["model"], lr=lr)
    trainer = L.Trainer(max_steps=tr["max_steps"], callbacks=callbacks, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=tr.get("limit_val_batches"),
                        val_check_interval=10 ** 6, check_val_every_n_epoch=None)
    t0 = time.time()
    trainer.fit(model, data)
    row = {"mode": mode, "target_epsilon": eps if callbacks else math.inf, "k": k, "lr": lr,
           "users": users, "examples_per_step": per_step, "train_s": time.time() - t0,
           "steps": trainer.global_step, "seed": seed,
           "val_loss": trainer.validate(model, data, verbose=False)[0]["val/loss"]}
    if callbacks:
        r = callbacks[0].report
        row.update(epsilon=r["epsilon"], sigma=r["noise_multiplier"], q=r["sample_rate"],
                   batch=r["expected_batch_size"], accountant=r["accountant"])
    return row


def main_k(rows: list[dict]) -> int:
    """The recipe's k: the one most runs used."""
    ks = [r["k"] for r in rows]
    return max(set(ks), key=ks.count)


def plot(rows: list[dict], path: Path, k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kk in sorted({r["k"] for r in rows}, key=lambda v: v != k):
        for mode, style, color in (("uls", "o-", "C0"), ("els", "s--", "C1")):
            pts = sorted((r["target_epsilon"], r["val_loss"]) for r in rows
                         if r["mode"] == mode and r["k"] == kk)
            if pts:
                ax.plot(*zip(*pts), style, color=color, alpha=1.0 if kk == k else 0.45,
                        label=f"{mode.upper()}, k = {kk}")
    for r in rows:
        if r["mode"] == "none" and r["k"] == k:
            ax.axhline(r["val_loss"], color="gray", ls=":", label="non-private, same compute")
    ax.set_xlabel("user-level epsilon (delta 1e-5, N = users)")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title("Tiny Shakespeare speakers as users, equal compute per k", fontsize=10)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def best(rows: list[dict]) -> list[dict]:
    """Per (mode, epsilon, k), the learning rate's run with the lowest validation loss."""
    out: dict = {}
    for r in rows:
        key = (r["mode"], r["target_epsilon"], r["k"])
        if key not in out or r["val_loss"] < out[key]["val_loss"]:
            out[key] = r
    return list(out.values())


def record(rows: list[dict], command: str) -> None:
    from scripts.results import record as write
    k = main_k(rows)
    first = next(r for r in rows if r["k"] == k)
    values = {"steps": first["steps"], "k": k, "users": first["users"],
              "examples_per_step": round(first["examples_per_step"], 1)}
    for r in rows:  # every run
        tag = "non_private" if r["mode"] == "none" else f"{r['mode']}_eps{r['target_epsilon']:g}"
        tag += "" if r["k"] == k else f"_k{r['k']}"
        values[f"{tag}_lr{r['lr']:g}_val"] = round(r["val_loss"], 3)
        if r["k"] != k:
            values[f"examples_per_step_k{r['k']}"] = round(r["examples_per_step"], 1)
    for r in best([r for r in rows if r["k"] != k]):  # the other k, by their best lr
        values[f"{r['mode']}_eps{r['target_epsilon']:g}_k{r['k']}_val"] = round(r["val_loss"], 3)
    for r in best([r for r in rows if r["k"] == k]):
        if r["mode"] == "none":
            values.update(non_private_val=round(r["val_loss"], 3), non_private_lr=r["lr"])
            continue
        tag = f"{r['mode']}_eps{r['target_epsilon']:g}"
        values.update({f"{tag}_val": round(r["val_loss"], 3), f"{tag}_lr": r["lr"],
                       f"{tag}_spent": round(r["epsilon"], 3), f"{tag}_sigma": round(r["sigma"], 3)})
    write("dp_user_lm", values, command)


def main(argv: list[str] | None = None) -> None:
    import torch
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--runs", nargs="*", default=RUNS,
                    help="mode:epsilon[:lr[:k]]; mode uls, els or none (epsilon ignored)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/dp_user_lm")
    ap.add_argument("--record", action="store_true", help="only record and plot --out's rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "rows.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    if not args.record:
        recipe = yaml.safe_load(Path(args.recipe).read_text())
        for spec in args.runs:
            mode, eps, *rest = spec.split(":")
            lr = float(rest[0]) if rest and rest[0] else None
            row = run(mode, float(eps), recipe, args.seed, lr, int(rest[1]) if rest[1:] else None)
            key = ("mode", "target_epsilon", "seed", "lr", "k")
            rows = [r for r in rows if [r[k] for k in key] != [row[k] for k in key]] + [row]
            store.write_text(json.dumps(rows, indent=2))
            print(json.dumps(row))
    if not (args.record or args.runs == ap.get_default("runs")):
        return
    plot(best(rows), FIGURE, main_k(rows))
    record(rows, "OMP_NUM_THREADS=1 python -m scripts.papers.dp_user_lm (15 runs, one thread)")


if __name__ == "__main__":
    main()
