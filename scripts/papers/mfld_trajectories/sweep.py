"""Private synthetic trajectories by MFLD (Gu, Chien & Greenewald, arXiv 2506.12203): W2 between
generated and true marginals at observed and held-out times against epsilon, one point per
person against a whole trajectory per person at equal epsilon.

Data: the rotating limit-cycle SDE of ``regularizers.dp_trajectories.core.simulate`` at 9 times
in [0, 2]; times 0, 0.5, 1, 1.5, 2 observed (n people each), 0.25, 0.75, 1.25, 1.75 held out.
W2 is exact (``ot.emd2``) against 500 fresh samples per time. Same settings as the recipe
recipes/mfld_private_trajectories.yaml (which runs one of these configurations).

    python -m scripts.papers.mfld_trajectories.sweep     # -> docs/results/mfld_private_trajectories.json + plot
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from regularizers.dp_trajectories import generate, kernel_bound, privacy_report, simulate, step_noise, w2

ROOT = Path(__file__).resolve().parents[3]
TIMES = np.linspace(0.0, 2.0, 9)
OBSERVED = [0, 2, 4, 6, 8]
HELD_OUT = [1, 3, 5, 7]
CFG = dict(n_particles=64, steps=150, lr=1.0, temperature=1e-3, path_weight=0.02, reg=0.1)
N_PEOPLE, DELTA = 2000, 1e-6


def snapshots(adjacency: str, seed: int = 0) -> dict[int, torch.Tensor]:
    """n points per observed time: independent people per time ("point"), or the same n people
    followed through every observed time ("trajectory")."""
    if adjacency == "point":
        paths = simulate(N_PEOPLE * len(OBSERVED), TIMES, seed)
        return {s: torch.tensor(paths[i * N_PEOPLE:(i + 1) * N_PEOPLE, s]) for i, s in enumerate(OBSERVED)}
    paths = simulate(N_PEOPLE, TIMES, seed)
    return {s: torch.tensor(paths[:, s]) for s in OBSERVED}


def run(epsilon: float, adjacency: str, seed: int, truth: np.ndarray) -> dict:
    clip = kernel_bound(CFG["n_particles"])
    sigma, noise = step_noise(epsilon, DELTA, CFG["steps"], clip, adjacency, len(OBSERVED))
    Z = generate(snapshots(adjacency), torch.tensor(TIMES), clip=clip, noise_std=noise, seed=seed,
                 counts={s: float(N_PEOPLE) for s in OBSERVED}, **CFG)
    w = [w2(Z[:, s].numpy(), truth[:, s]) for s in range(len(TIMES))]
    people = N_PEOPLE * (len(OBSERVED) if adjacency == "point" else 1)
    rep = privacy_report(sigma, CFG["steps"], DELTA, clip, adjacency, len(OBSERVED), people)
    return {"w2_observed": float(np.mean([w[s] for s in OBSERVED])),
            "w2_held_out": float(np.mean([w[s] for s in HELD_OUT])), "w2_by_time": w,
            "epsilon_reported": rep["epsilon"], "sigma": sigma, "Z": Z.numpy()}


def plot(Z: dict, truth: np.ndarray, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(Z) + 1, figsize=(3.3 * (len(Z) + 1), 3.3), sharex=True, sharey=True)
    for p in truth[:40]:
        axes[0].plot(p[:, 0], p[:, 1], lw=0.6, alpha=0.6)
    axes[0].set_title("true SDE paths")
    for ax, (name, z) in zip(axes[1:], Z.items()):
        for p in z[:40]:
            ax.plot(p[:, 0], p[:, 1], lw=0.6, alpha=0.6)
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


SUMMARY = ("private synthetic trajectories by MFLD, one point per person, (4, 1e-6)-DP: held-out W2 "
           "{point_4:.3f} (non-private {point_inf:.3f}; whole trajectory per person at the same eps {trajectory_4:.3f})")
MEASURED = ("sweep, 3 seeds, 150 steps, 64 particles, 2000 people per observed time, delta 1e-6: mean W2 to "
            "the true marginals at the 4 held-out times, one point / whole trajectory per person: eps 1 "
            "{point_1:.3f} / {trajectory_1:.3f}, eps 2 {point_2:.3f} / {trajectory_2:.3f}, eps 4 {point_4:.3f} / "
            "{trajectory_4:.3f}, eps 8 {point_8:.3f} / {trajectory_8:.3f}, no noise {point_inf:.3f} (observed times at "
            "eps 4: {point_4_obs:.3f}). This recipe (seed 0): held-out W2 {recipe_w2_held_out:.3f}, observed "
            "{recipe_w2_observed:.3f}, epsilon {recipe_epsilon:.3f}, {recipe_wall_s:.0f} s wall on 2 shared cores.")


def record(recipe_run: Path | None, wall_s: float | None) -> None:
    """docs/results/mfld_private_trajectories.json from the sweep file and one recipe run folder."""
    from scripts.results import RESULTS, record as write
    runs = json.loads((ROOT / "docs" / "results" / "mfld_sweep.json").read_text())["runs"]
    values = {}
    for key, row in runs.items():
        adj, eps = key.split("@")
        values[f"{adj}_{eps}"] = round(row["w2_held_out"], 4)
        values[f"{adj}_{eps}_obs"] = round(row["w2_observed"], 4)
    if recipe_run is not None:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        ea = EventAccumulator(str(recipe_run))
        ea.Reload()
        for tag in ("val/w2_held_out", "val/w2_observed"):
            values["recipe_" + tag.split("/")[1]] = round(ea.Scalars(tag)[-1].value, 4)
        values["recipe_epsilon"] = round(json.loads((recipe_run / "dp_report.json").read_text())["epsilon"], 4)
        values["recipe_wall_s"] = wall_s
    path = RESULTS / "mfld_private_trajectories.json"
    if not path.exists():
        path.write_text(json.dumps({"recipe": "mfld_private_trajectories", "summary": SUMMARY,
                                    "measured": MEASURED, "values": {}}, indent=2) + "\n")
    write("mfld_private_trajectories", values,
          command="python -m scripts.papers.mfld_trajectories.sweep --seeds 3 && python -m toolkit fit --config "
                  "recipes/mfld_private_trajectories.yaml")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0, math.inf])
    ap.add_argument("--record", type=Path, default=None,
                    help="only write docs/results from mfld_sweep.json and this recipe run folder")
    ap.add_argument("--wall", type=float, default=None, help="the recipe run's wall time (s)")
    args = ap.parse_args()
    if args.record is not None:
        record(args.record, args.wall)
        return
    torch.set_num_threads(1)
    truth = simulate(500, TIMES, 10_000)
    rows, shown, t0 = {}, {}, time.time()
    for eps in args.epsilons:
        for adjacency in (("point",) if math.isinf(eps) else ("point", "trajectory")):
            res = [run(eps, adjacency, s, truth) for s in range(args.seeds)]
            key = f"{adjacency}@{eps:g}"
            rows[key] = {m: float(np.mean([r[m] for r in res])) for m in ("w2_observed", "w2_held_out")}
            rows[key].update({m + "_std": float(np.std([r[m] for r in res])) for m in ("w2_observed", "w2_held_out")})
            rows[key].update(epsilon_reported=res[0]["epsilon_reported"], sigma=res[0]["sigma"])
            if eps in (1.0, 4.0, math.inf):
                shown[f"{adjacency}, eps={eps:g}"] = res[0]["Z"]
            print(key, rows[key], f"{time.time() - t0:.0f}s", flush=True)
    plot(shown, truth, ROOT / "docs" / "figures" / "mfld_private_trajectories.png")
    out = ROOT / "docs" / "results" / "mfld_sweep.json"
    out.write_text(json.dumps({"config": {**CFG, "people_per_time": N_PEOPLE, "delta": DELTA,
                                          "times": TIMES.tolist(), "observed": OBSERVED,
                                          "seeds": args.seeds}, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
