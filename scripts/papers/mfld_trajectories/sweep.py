"""Private synthetic trajectories by MFLD (Gu, Chien & Greenewald, arXiv 2506.12203): W2 between
generated and true marginals at observed and held-out times against epsilon, one point per
person against a whole trajectory per person at equal epsilon.

Data (``--data``): ``sde``, the rotating limit-cycle SDE of ``toolkit.data.sde.SDESnapshots``;
``digits``, an MNIST "2" read as a point density, turned and slid by a known drift
(``toolkit.data.shapes.DigitSnapshots``). Both at 9 times in [0, 2]: 0, 0.5, 1, 1.5, 2 observed
(2000 people each), 0.25, 0.75, 1.25, 1.75 held out. W2 is exact (``ot.emd2``) against 500 fresh
samples per time. Same settings as recipes/mfld_private_trajectories*.yaml.

    python -m scripts.papers.mfld_trajectories.sweep --data sde --seeds 3        # -> docs/results/mfld_sweep.json + plot
    python -m scripts.papers.mfld_trajectories.sweep --data digits --seeds 3     # -> mfld_sweep_digits.json + plot
    python -m scripts.papers.mfld_trajectories.sweep --curve --seeds 3           # convergence -> mfld_convergence.json
    python -m scripts.papers.mfld_trajectories.sweep --data sde --record RUN_DIR --wall S   # recipe json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from regularizers.dp_trajectories import generate, kernel_bound, privacy_report, step_noise, w2
from scripts.papers.mfld_trajectories.plots import plot_marginals, plot_paths

ROOT = Path(__file__).resolve().parents[3]
RESULTS = ROOT / "docs" / "results"
MNIST = ROOT.parent / "shared" / "data" / "mnist"
# lr 1 is the largest stable step (lr 2 and 3 oscillate); 600 steps is where the noise-free
# run's held-out W2 stops falling (docs/results/mfld_convergence.json); temperature 1e-3 (1e-2 blurs)
CFG = dict(n_particles=64, steps=600, lr=1.0, temperature=1e-3, path_weight=0.02, reg=0.1)
N_PEOPLE, DELTA = 2000, 1e-6
SWEEP = {"sde": "mfld_sweep.json", "digits": "mfld_sweep_digits.json"}
RECIPE = {"sde": "mfld_private_trajectories", "digits": "mfld_private_trajectories_digits"}


def dataset(name: str, adjacency: str = "point", people: int = N_PEOPLE):
    """The data module of the recipe (seed 0 data, 500 truth samples per time from seed 10,000)."""
    if name == "sde":
        from toolkit.data.sde import SDESnapshots
        return SDESnapshots(people_per_time=people, adjacency=adjacency)
    from toolkit.data.shapes import DigitSnapshots
    return DigitSnapshots(root=str(MNIST), people_per_time=people, adjacency=adjacency)


def run(dm, epsilon: float, seed: int, steps: int, every: int = 0) -> dict:
    """One generator run; with ``every``, the W2 curve every ``every`` steps too."""
    cfg = {**CFG, "steps": steps}
    clip = kernel_bound(cfg["n_particles"])
    sigma, noise = step_noise(epsilon, DELTA, steps, clip, dm.adjacency, len(dm.observed))
    curve = []

    def score(Z) -> tuple[float, float]:
        w = [w2(Z[:, s].numpy(), dm.truth[:, s]) for s in range(len(dm.times))]
        return float(np.mean([w[s] for s in dm.observed])), float(np.mean([w[s] for s in dm.held_out]))

    def on_step(step, Z):
        if every and (step + 1) % every == 0:
            curve.append([step + 1, *score(Z)])

    Z = generate(dm.snapshots, torch.tensor(dm.times), clip=clip, noise_std=noise, seed=seed,
                 counts={s: float(N_PEOPLE) for s in dm.observed}, on_step=on_step, **cfg)
    obs, held = score(Z)
    rep = privacy_report(sigma, steps, DELTA, clip, dm.adjacency, len(dm.observed), dm.people)
    return {"w2_observed": obs, "w2_held_out": held, "epsilon_reported": rep["epsilon"], "sigma": sigma,
            "Z": Z.numpy(), "curve": curve}


def floor(dm, draws: int = 5) -> float:
    """Held-out W2 of n_particles fresh true samples: what a perfect generator would score."""
    return float(np.mean([w2(dm.simulate(CFG["n_particles"], dm.times, 777 + i)[:, s], dm.truth[:, s])
                          for i in range(draws) for s in dm.held_out]))


def sweep(data: str, seeds: int, epsilons: list[float], steps: int) -> None:
    """The epsilon sweep at ``steps`` steps; a length other than the recipe's writes
    mfld_sweep[_digits]_<steps>.json and no plot."""
    rows, shown, t0 = {}, {}, time.time()
    dms = {adj: dataset(data, adj) for adj in ("point", "trajectory")}
    for eps in epsilons:
        for adjacency in (("point",) if math.isinf(eps) else ("point", "trajectory")):
            res = [run(dms[adjacency], eps, s, steps) for s in range(seeds)]
            key = f"{adjacency}@{eps:g}"
            rows[key] = {m: float(np.mean([r[m] for r in res])) for m in ("w2_observed", "w2_held_out")}
            rows[key].update({m + "_std": float(np.std([r[m] for r in res])) for m in ("w2_observed", "w2_held_out")})
            rows[key].update(epsilon_reported=res[0]["epsilon_reported"], sigma=res[0]["sigma"])
            if adjacency == "point" and eps in (1.0, 4.0, math.inf):
                shown[f"one point/person, eps={eps:g}"] = res[0]["Z"]
            print(key, rows[key], f"{time.time() - t0:.0f}s", flush=True)
    dm, name = dms["point"], SWEEP[data]
    if steps != CFG["steps"]:
        name = name.replace(".json", f"_{steps}.json")
    elif data == "sde":
        plot_paths(shown, dm.truth, ROOT / "docs" / "figures" / "mfld_private_trajectories.png")
    else:
        plot_marginals(shown, dm.truth, dm.times, dm.held_out, ROOT / "docs" / "figures" / "mfld_digits.png")
    (RESULTS / name).write_text(json.dumps(
        {"command": f"python -m scripts.papers.mfld_trajectories.sweep --data {data} --seeds {seeds} --steps {steps}",
         "config": {**CFG, "steps": steps, "people_per_time": N_PEOPLE, "delta": DELTA, "times": dm.times.tolist(),
                    "observed": dm.observed, "seeds": seeds},
         "w2_floor_held_out": floor(dm), "sweep_s": round(time.time() - t0), "runs": rows}, indent=2) + "\n")


def convergence(seeds: int, long: int, epsilons: list[float]) -> None:
    """Noise-free runs to ``long`` steps (the curve gives W2 at every shorter length: without
    gradient noise a shorter run is a prefix of a longer one), and private runs calibrated for
    CFG steps and for ``long`` steps (their noise depends on the length)."""
    out = {"command": f"python -m scripts.papers.mfld_trajectories.sweep --curve --seeds {seeds} --long {long}",
           "config": CFG, "data": {}}
    for data in ("sde", "digits"):
        dm, rows = dataset(data), {}
        for eps in epsilons:
            for steps in ((long,) if math.isinf(eps) else (CFG["steps"], long)):
                res = [run(dm, eps, s, steps, every=50) for s in range(seeds if data == "sde" else 1)]
                rows[f"eps={eps:g}, steps={steps}"] = {
                    "w2_held_out": [r["w2_held_out"] for r in res],
                    "curve_step_obs_held": [r["curve"] for r in res]}
                print(data, eps, steps, [round(r["w2_held_out"], 3) for r in res], flush=True)
        out["data"][data] = rows
    (RESULTS / "mfld_convergence.json").write_text(json.dumps(out, indent=1) + "\n")


SUMMARY = {
    "sde": ("private synthetic trajectories by MFLD, one point per person, (4, 1e-6)-DP: held-out W2 "
            "{point_4:.3f} (non-private {point_inf:.3f}; whole trajectory per person at the same eps "
            "{trajectory_4:.3f})"),
    "digits": ("private trajectories of a digit-shaped point cloud (an MNIST 2 turned and slid by a known "
               "drift), one point per person, (4, 1e-6)-DP: held-out W2 {point_4:.3f} (non-private "
               "{point_inf:.3f}; 64 true samples score {floor:.3f})")}
MEASURED = ("sweep, {seeds} seeds, 600 steps, 64 particles, 2000 people per observed time, delta 1e-6: mean W2 to "
            "the true marginals at the 4 held-out times, one point / whole trajectory per person: eps 1 "
            "{point_1:.3f} / {trajectory_1:.3f}, eps 2 {point_2:.3f} / {trajectory_2:.3f}, eps 4 {point_4:.3f} / "
            "{trajectory_4:.3f}, eps 8 {point_8:.3f} / {trajectory_8:.3f}, no noise {point_inf:.3f} (64 true "
            "samples: {floor:.3f}). This recipe (seed 0): held-out W2 {recipe_w2_held_out:.3f}, observed "
            "{recipe_w2_observed:.3f}, epsilon {recipe_epsilon:.3f}, {recipe_wall_s:.0f} s wall on 2 shared cores.")


def record(data: str, recipe_run: Path | None, wall_s: float | None) -> None:
    """docs/results/<recipe>.json from the sweep file and one recipe run folder."""
    from scripts.results import record as write
    sweep_file = json.loads((RESULTS / SWEEP[data]).read_text())
    seeds = sweep_file["config"]["seeds"]
    values = {"floor": round(sweep_file["w2_floor_held_out"], 4), "seeds": seeds}
    for key, row in sweep_file["runs"].items():
        adj, eps = key.split("@")
        values[f"{adj}_{eps}"] = round(row["w2_held_out"], 4)
        values[f"{adj}_{eps}_std"] = round(row["w2_held_out_std"], 4)
        values[f"{adj}_{eps}_obs"] = round(row["w2_observed"], 4)
    if recipe_run is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        ea = EventAccumulator(str(recipe_run))
        ea.Reload()
        for tag in ("val/w2_held_out", "val/w2_observed"):
            values["recipe_" + tag.split("/")[1]] = round(ea.Scalars(tag)[-1].value, 4)
        values["recipe_epsilon"] = round(json.loads((recipe_run / "dp_report.json").read_text())["epsilon"], 4)
        values["recipe_wall_s"] = wall_s
    recipe = RECIPE[data]
    (RESULTS / f"{recipe}.json").write_text(json.dumps(
        {"recipe": recipe, "summary": SUMMARY[data], "measured": MEASURED, "values": {}}, indent=2) + "\n")
    write(recipe, values, command=f"python -m scripts.papers.mfld_trajectories.sweep --data {data} --seeds {seeds} && python -m "
                                  f"toolkit fit --config recipes/{recipe}.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=sorted(SWEEP), default="sde")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, math.inf])
    ap.add_argument("--steps", type=int, default=CFG["steps"], help="sweep length (noise calibrated to it)")
    ap.add_argument("--curve", action="store_true", help="convergence runs instead of the sweep")
    ap.add_argument("--long", type=int, default=1200, help="--curve: the longer run's steps")
    ap.add_argument("--record", type=Path, default=None,
                    help="only write docs/results from the sweep file and this recipe run folder")
    ap.add_argument("--wall", type=float, default=None, help="the recipe run's wall time (s)")
    args = ap.parse_args()
    if args.record is not None:
        record(args.data, args.record, args.wall)
        return
    torch.set_num_threads(1)
    if args.curve:
        convergence(args.seeds, args.long, [math.inf, 4.0] if args.epsilons == ap.get_default("epsilons")
                    else args.epsilons)
    else:
        sweep(args.data, args.seeds, args.epsilons, args.steps)


if __name__ == "__main__":
    main()
