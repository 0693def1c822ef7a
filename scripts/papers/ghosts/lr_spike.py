"""The lr-spike experiment of Ghosts of Softmax (P. Sao, arXiv 2603.13552) from a recipe:

    python -m scripts.papers.ghosts.lr_spike recipes/ghosts_lr_spike.yaml --seeds 0 1 2 \\
        --set data.root=../shared/data/mnist

Arms, all from the recipe's config: ``no-spike`` (LRSpike and RadiusControl removed),
``no-spike+control`` (the controller's cost without a spike), ``spike`` (no control),
``spike+clip`` (gradient clipping, ``trainer.gradient_clip_val``) and ``spike+control`` (the
recipe itself). Each arm trains, records per step the training loss, the controller's r (for
the uncontrolled arms r is measured by a RadiusControl with r_max=inf, which never scales) and
test accuracy every ``--eval-every`` steps on the first 2,000 test images, then tests the
final weights on the full test split. Writes ``<out>/results.json``, a markdown table and a
plot (``<out>/ghosts_lr_spike.png``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]

ARMS = ("no-spike", "no-spike+control", "spike", "spike+clip", "spike+control")


def arm_config(cfg: dict, arm: str, clip: float) -> dict:
    cfg = copy.deepcopy(cfg)
    cbs = cfg["trainer"].get("callbacks", [])
    is_ctrl = lambda c: c["class_path"].endswith("RadiusControl")
    is_spike = lambda c: c["class_path"].endswith("LRSpike")
    if not any(map(is_ctrl, cbs)) or not any(map(is_spike, cbs)):
        raise ValueError("the recipe needs both regularizers.LRSpike and regularizers.RadiusControl "
                         "under trainer.callbacks")
    if "spike" not in arm.replace("no-spike", ""):
        cbs = [c for c in cbs if not is_spike(c)]
    if "control" not in arm:  # measure r without acting on it
        cbs = [{**c, "init_args": {**c.get("init_args", {}), "r_max": math.inf}} if is_ctrl(c) else c
               for c in cbs]
    if arm.endswith("clip"):
        cfg["trainer"]["gradient_clip_val"] = clip
    cfg["trainer"]["callbacks"] = cbs
    return cfg


def run_arm(cfg: dict, seed: int, overrides: list[str], eval_every: int, out: Path, name: str) -> dict:
    import lightning as L
    import torch

    from toolkit.cli import ToolkitCLI

    class Trace(L.Callback):
        def __init__(self):
            self.rows, self.test = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ctrl = next(c for c in trainer.callbacks if type(c).__name__ == "RadiusControl")
            self.rows.append({"step": trainer.global_step, "loss": float(outputs["loss"]),
                              "r": ctrl.last.get("r", float("nan")),
                              "scale": ctrl.last.get("scale", 1.0)})
            if trainer.global_step % eval_every == 0:
                x, y = self.xy
                with torch.no_grad():
                    acc = (pl_module(x.to(pl_module.device)).argmax(-1).cpu() == y).float().mean()
                self.test.append((trainer.global_step, float(acc)))

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    args = ["--config", f.name, "--seed_everything", str(seed)] + [f"--{o}" for o in overrides]
    cli = ToolkitCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                     subclass_mode_data=True, seed_everything_default=seed, args=args, run=False,
                     save_config_kwargs={"overwrite": True}, runs_root=str(out / "runs"),
                     run_name=f"{name}/seed{seed}")
    trace = Trace()
    cli.datamodule.setup("test")
    xs, ys = zip(*[cli.datamodule.test_dataloader().dataset[i] for i in range(2000)])
    trace.xy = (torch.stack(xs), torch.as_tensor(ys))
    cli.trainer.callbacks.append(trace)
    error = None
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except Exception as e:  # the default FiniteGuard stops a diverged run; record it
        error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    res = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"test_acc": float(res["test/acc"]), "test_loss": float(res["test/loss"]),
            "steps": int(cli.trainer.global_step), "error": error, "trace": trace.rows,
            "test_trace": trace.test}


def table(results: dict, spike_start: int) -> str:
    lines = ["| arm | seeds | final test acc (%) | min test acc after spike (%) | steps scaled |",
             "|---|---|---|---|---|"]
    for arm in ARMS:
        runs = list(results.get(arm, {}).values())
        if not runs:
            continue
        acc = [100 * r["test_acc"] for r in runs]
        low = [100 * min(a for s, a in r["test_trace"] if s > spike_start) for r in runs]
        scaled = [sum(t["scale"] < 1 for t in r["trace"]) for r in runs]
        sd = lambda v: f" ± {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        lines.append(f"| {arm} | {len(runs)} | {statistics.mean(acc):.2f}{sd(acc)} | "
                     f"{statistics.mean(low):.2f} | {statistics.mean(scaled):.1f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ARMS:
        runs = list(results.get(arm, {}).values())
        if not runs:
            continue
        r0 = runs[0]
        steps = [t["step"] for t in r0["trace"]]
        axes[0].semilogy(steps, np.nanmedian([[t["loss"] for t in r["trace"]] for r in runs], 0), label=arm)
        ts = [s for s, _ in r0["test_trace"]]
        axes[1].plot(ts, 100 * np.median([[a for _, a in r["test_trace"]] for r in runs], 0), label=arm)
        axes[2].semilogy(steps, np.nanmedian([[t["r"] * t["scale"] for t in r["trace"]] for r in runs], 0),
                         label=arm)
    axes[2].axhline(1.0, color="k", ls="--", lw=0.8)
    for ax, title in zip(axes, ("training loss", "test accuracy (%, 2,000 images)",
                                "applied r = tau / rho_a")):
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def recorded_values(results: dict) -> dict:
    """The recipe header's numbers (docs/results/ghosts_lr_spike.json) from the runs."""
    def acc(arm):
        a = [100 * r["test_acc"] for r in results[arm].values()]
        return round(statistics.mean(a), 2), round(statistics.stdev(a), 2) if len(a) > 1 else 0.0
    out = {}
    for key, arm in (("no_spike", "no-spike"), ("control", "spike+control"), ("none", "spike"),
                     ("clip", "spike+clip")):
        if arm in results:
            out[key], out[f"{key}_std"] = acc(arm)
    if "spike+control" in results:
        runs = results["spike+control"].values()
        out["steps_scaled"] = round(statistics.mean(sum(t["scale"] < 1 for t in r["trace"])
                                                    for r in runs), 1)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient_clip_val of spike+clip")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    ap.add_argument("--out", default="runs/ghosts_lr_spike")
    ap.add_argument("--record", action="store_true",
                    help="write the figures to docs/results/ghosts_lr_spike.json, README, header")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for arm in args.arms:
        for seed in args.seeds:
            if str(seed) in results.get(arm, {}):
                continue
            res = run_arm(arm_config(cfg, arm, args.clip), seed, args.set, args.eval_every, out, arm)
            results.setdefault(arm, {})[str(seed)] = res
            path.write_text(json.dumps(results))
            print(f"{arm} seed {seed}: test acc {100 * res['test_acc']:.2f}%"
                  f"{' (' + res['error'] + ')' if res['error'] else ''}", flush=True)
    spike = next(c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("LRSpike"))
    tab = table(results, int(spike["init_args"]["start"]))
    print(tab)
    (out / "table.md").write_text(tab + "\n")
    plot(results, out / "ghosts_lr_spike.png")
    if args.record:
        from scripts.results import record
        record("ghosts_lr_spike", recorded_values(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
