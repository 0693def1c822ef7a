"""The Muon family at CPU scale: Polar Express vs quintic, NorMuon vs Muon, cautious weight decay.

recipes/muon_family_lm.yaml (the Muon arm): a small char GPT (2 layers, 64 wide, 2 heads, block 64,
batch 32; far below the papers' 124M-1.1B models) on Tiny Shakespeare, the muon_lm settings
otherwise (Muon lr 0.02, adam_lr 0.01, wd 0.1, cosine to 0.1x after 5% warmup), validated every
``--eval_every`` steps on 256 fixed windows. One thread.

    python -m scripts.papers.muon_family.arms --arm muon --arm normuon --seeds 0 1 2 --steps 600
    python -m scripts.papers.muon_family.arms --summary            # aggregate runs/muon_family/*.json

Arms: ``muon`` (quintic), ``muon_pe`` (ns_coefficients polar_express), ``normuon``,
``muon_cwd`` (cautious_wd), ``adamw``. Each run writes runs/muon_family/<arm>-s<seed>.json with
its val curve; ``--summary`` prints mean/spread of final val loss and the steps each arm needs
to reach Muon's final val loss (first eval at or below it, per seed).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import yaml

ARMS = {
    "muon": ("muon", 0.02, {}),
    "muon_pe": ("muon", 0.02, {"ns_coefficients": "polar_express"}),
    "normuon": ("normuon", 0.02, {}),
    "muon_cwd": ("muon", 0.02, {"cautious_wd": True}),
    "adamw": ("adamw", 0.005, {}),
}
OUT = Path("runs/muon_family")


class _Curve(L.Callback):
    def __init__(self):
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "muon_family_lm.yaml"


def run(arm: str, seed: int, steps: int | None = None, eval_every: int | None = None,
        lr: float | None = None, recipe: Path = RECIPE) -> dict:
    """One arm from the recipe (the Muon arm itself), its optimizer and options swapped."""
    from toolkit import LanguageModel, TextDataModule
    cfg = yaml.safe_load(Path(recipe).read_text())
    name, default_lr, extra = ARMS[arm]
    margs = copy.deepcopy(cfg["model"]["init_args"])
    steps = steps or cfg["trainer"]["max_steps"]
    eval_every = eval_every or cfg["trainer"]["val_check_interval"]
    kw = dict(margs.get("optimizer_kwargs") or {})
    if name == "adamw":  # AdamW takes none of Muon's options
        kw = {"betas": kw.get("betas", [0.9, 0.99])}
    margs.update(optimizer=name, lr=default_lr if lr is None else lr,
                 optimizer_kwargs={**kw, **extra}, warmup_steps=round(0.05 * steps))
    L.seed_everything(seed, verbose=False)
    model = LanguageModel(**margs)
    data = TextDataModule(**{**cfg["data"]["init_args"], "seed": seed})
    curve = _Curve()
    trainer = L.Trainer(max_steps=steps, val_check_interval=eval_every,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[curve])
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return {"arm": arm, "seed": seed, "lr": margs["lr"], "steps": steps, "curve": curve.points,
            "final": curve.points[-1][1], "wall_s": round(time.perf_counter() - t0, 1)}


def steps_to(curve: list, target: float) -> int | None:
    return next((s for s, v in curve if v <= target), None)


def summary(out: Path = OUT) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    by_arm: dict[str, list[dict]] = {}
    for r in runs:
        by_arm.setdefault(r["arm"], []).append(r)
    ref = {r["seed"]: r["final"] for r in by_arm.get("muon", [])}
    res = {}
    for arm, rs in sorted(by_arm.items()):
        finals = [r["final"] for r in rs]
        reach = [steps_to(r["curve"], ref[r["seed"]]) for r in rs if r["seed"] in ref]
        res[arm] = {"seeds": [r["seed"] for r in rs], "finals": finals, "steps": rs[0]["steps"],
                    "mean": round(statistics.mean(finals), 4),
                    "spread": round(max(finals) - min(finals), 4),
                    "steps_to_muon_final": reach}
        print(f"{arm:>10}: final {res[arm]['mean']:.4f} (spread {res[arm]['spread']:.4f}, "
              f"{finals}), steps to Muon's final: {reach}")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", action="append", choices=sorted(ARMS), default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--eval_every", type=int, default=None, help="default: the recipe's")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--summary", action="store_true")
    ap.add_argument("--record", action="store_true",
                    help="with --summary: write docs/results/muon_family_lm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for arm in args.arm:
        for seed in args.seeds:
            r = run(arm, seed, args.steps, args.eval_every, args.lr)
            out = OUT / "sweep" if args.tag else OUT  # tagged runs (lr sweeps) stay out of --summary
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{arm}{args.tag}-s{seed}.json").write_text(json.dumps(r))
            print(f"{arm} seed {seed}: final {r['final']:.4f} ({r['wall_s']} s)", flush=True)
    if args.summary:
        res = summary()
        if args.record:
            record(res)
            plot()


def plot(out: Path = OUT, path: Path = Path("docs/figures/muon_family_lm.png")) -> None:
    """Val loss against steps, mean over seeds, per arm (and lr-tuned Muon if swept)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    runs += [dict(r, arm=f"{r['arm']} lr {r['lr']:g}") for r in
             (json.loads(p.read_text()) for p in sorted((out / "sweep").glob("muon_lr0.04-*.json")))]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in sorted({r["arm"] for r in runs}):
        curves = [r["curve"] for r in runs if r["arm"] == arm]
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps[2:], mean[2:], label=f"{arm} ({len(curves)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("val loss")
    ax.set_title("Muon family, 2x64 char GPT (recipes/muon_family_lm.yaml)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def sweep_values(res: dict, out: Path = OUT / "sweep") -> dict:
    """The lr sweeps (``--tag _lr<x>`` runs): seed-0 final val of Muon and NorMuon per lr, and
    Muon at its best swept lr over the seeds it ran, against each arm at the recipe lr."""
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not runs:
        return {}
    v = {}
    for arm in ("muon", "normuon"):
        curve = {r["lr"]: r["final"] for r in runs if r["arm"] == arm and r["seed"] == 0}
        curve.update((ARMS[arm][1], f) for s, f in zip(res[arm]["seeds"], res[arm]["finals"])
                     if s == 0)
        v[f"{arm}_lr_sweep"] = ", ".join(f"{lr:g}: {f:.3f}" for lr, f in sorted(curve.items()))
        v[f"{arm}_best_lr"] = min(curve, key=curve.get)
    best = v["muon_best_lr"]
    tuned = sorted((r for r in runs if r["arm"] == "muon" and r["lr"] == best), key=lambda r: r["seed"])
    if best == ARMS["muon"][1]:
        tuned = [{"seed": s, "final": f} for s, f in zip(res["muon"]["seeds"], res["muon"]["finals"])]
    by_seed = {r["seed"]: r["final"] for r in tuned}
    v["muon_tuned_mean"] = round(statistics.mean(by_seed.values()), 4)
    v["muon_tuned_n"] = len(by_seed)
    curves = {(r["arm"], r["seed"]): r["curve"] for r in
              (json.loads(p.read_text()) for p in sorted(OUT.glob("*.json")))}
    for arm in ("muon_pe", "normuon", "muon_cwd"):
        reach = [steps_to(curves[arm, s], f) for s, f in by_seed.items() if (arm, s) in curves]
        if reach and None not in reach:
            v[f"{arm}_steps_frac_tuned"] = round(statistics.mean(reach) / res[arm]["steps"], 2)
        d = [f - by_seed[s] for s, f in zip(res[arm]["seeds"], res[arm]["finals"]) if s in by_seed]
        v[f"{arm}_delta_tuned"] = round(statistics.mean(d), 4)
        v[f"{arm}_wins_tuned"] = sum(x < 0 for x in d)
    return v


def record(res: dict) -> None:
    """docs/results/muon_family_lm.json from the summary (mean, spread, steps to Muon's final)."""
    from scripts.results import record as write
    values = {}
    for arm, r in res.items():
        values[f"{arm}_mean"], values[f"{arm}_spread"] = r["mean"], r["spread"]
        values[f"{arm}_n"] = len(r["finals"])
        reach = [s for s in r["steps_to_muon_final"] if s is not None]
        values[f"{arm}_reached"] = len(reach)
        if arm != "muon" and reach:
            values[f"{arm}_steps_frac"] = round(statistics.mean(reach) / r["steps"], 2)
    muon = res["muon"]["finals"]
    for arm in res:
        if arm != "muon":  # per-seed differences to Muon (same seeds, same batches)
            d = [a - b for a, b in zip(res[arm]["finals"], muon)]
            values[f"{arm}_delta"] = round(statistics.mean(d), 4)
            values[f"{arm}_wins"] = sum(x < 0 for x in d)
    values.update(sweep_values(res))
    write("muon_family_lm", values)  # the command (runs and sweeps) is kept in the JSON


if __name__ == "__main__":
    main()
