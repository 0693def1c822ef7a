"""Architecture -> emergence-law parameters at CPU scale (Gallego-Feliciano et al. 2025,
"Hidden Dynamics of Massive Activations in Transformer Training", Sec. 5: the law's
parameters predicted from architecture and optimizer settings).

    python -m scripts.papers.massive_activations.grid run --jobs 2          # trains the grid (skips finished runs)
    python -m scripts.papers.massive_activations.grid analyze               # fits, regression, docs/figures

``run`` trains the char GPT of ``recipes/massive_activations_lm.yaml`` (constant lr, no
weight decay, fixed probe batch) with its width, depth, heads and lr overridden, through
``python -m toolkit fit``, one torch thread per run, into ``runs/emergence_grid/<name>/``.
``analyze`` fits the law per layer (:func:`toolkit.monitors.emergence.fit_emergence`, with
its bootstrap identifiability check), regresses the per-layer targets on the architecture
(:mod:`emergence_regression`) and writes ``docs/figures/emergence_grid.md`` and ``.png``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

RECIPE = ROOT / "recipes" / "massive_activations_lm.yaml"
WIDTHS, DEPTHS, LRS = (32, 64), (2, 3, 4), (0.005, 0.02)


def grid() -> list[dict]:
    """12 configurations: width x depth x lr in full, heads 2 or 4 alternating so that heads
    is balanced against each of the other three factors (a fractional design)."""
    out = []
    for (iw, w), (idp, d), (il, lr) in itertools.product(enumerate(WIDTHS), enumerate(DEPTHS),
                                                           enumerate(LRS)):
        heads = 2 if (iw + idp + il) % 2 == 0 else 4
        out.append(dict(name=f"w{w}_d{d}_h{heads}_lr{lr:g}", width=w, depth=d, heads=heads, lr=lr))
    return out


def command(cfg: dict, steps: int, every: int, out: Path) -> list[str]:
    monitor = [{"class_path": "toolkit.monitors.MassiveActivationMonitor",
                "init_args": {"every_n_steps": every, "probe": "fixed", "plots": False}}]
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
              "init_args": {"save_dir": str(out), "name": cfg["name"], "version": "",
                            "default_hp_metric": False}}
    return [sys.executable, "-m", "toolkit", "fit", "--config", str(RECIPE),
            "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
            "--trainer.enable_checkpointing", "false",
            "--trainer.callbacks", json.dumps(monitor), "--trainer.logger", json.dumps(logger),
            "--model.init_args.n_embd", str(cfg["width"]),
            "--model.init_args.n_layer", str(cfg["depth"]),
            "--model.init_args.n_head", str(cfg["heads"]),
            "--model.init_args.lr", str(cfg["lr"])]


def run_grid(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def one(cfg):
        folder = out / cfg["name"]
        if (folder / "massive_fit.json").is_file():
            return cfg["name"], "done before", 0.0
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with (folder / "train.log").open("w") as log:
            rc = subprocess.call(command(cfg, args.steps, args.every, out), cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        (folder / "config.json").write_text(json.dumps(dict(cfg, steps=args.steps,
                                                            every=args.every)))
        return cfg["name"], f"rc={rc}", time.perf_counter() - t

    todo = [c for c in grid() if (not args.widths or c["width"] in args.widths)
            and (not args.lrs or c["lr"] in args.lrs)]
    todo = todo[: args.limit] if args.limit else todo
    todo.sort(key=lambda c: -c["depth"] * c["width"])  # longest first: the two jobs end together
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, status, secs in pool.map(one, todo):
            print(f"{name}: {status} ({secs:.0f} s)", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the grid")
    r.add_argument("--out", default=str(ROOT / "runs" / "emergence_grid"))
    r.add_argument("--steps", type=int, default=1500)
    r.add_argument("--every", type=int, default=25)
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--limit", type=int, default=0, help="only the first N configurations")
    r.add_argument("--widths", type=int, nargs="*", help="only these widths")
    r.add_argument("--lrs", type=float, nargs="*", help="only these learning rates")
    a = sub.add_parser("analyze", help="fit, regress, write the table and plot")
    a.add_argument("--out", default=str(ROOT / "runs" / "emergence_grid"))
    a.add_argument("--docs", default=str(ROOT / "docs" / "figures"))
    a.add_argument("--name", default="emergence_grid", help="stem of the .md/.json/.png")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run_grid(args)
    else:
        from scripts.papers.massive_activations.regression import analyze
        analyze(Path(args.out), Path(args.docs), grid(), args.name)


if __name__ == "__main__":
    main()
