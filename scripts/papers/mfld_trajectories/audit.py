"""One-run audit (Steinke, Nasr & Jagielski 2023; statistics from scripts.dp_audit) of the private
MFLD trajectory generator, white-box, with gradient canaries.

m canary people are put into the first observed snapshot, each with probability 1/2, and the
generator (``regularizers.dp_trajectories.core.mfld_step``, the recipe's settings, fewer people)
runs once. The auditor sees every iterate Z_t and knows the real people, so from each step it
recovers n * (the snapshot's data gradient) minus the real people's clipped sum: the included
canaries' sum plus the DP noise (plus the Langevin noise / lr, which the audit run switches off
since it is not counted towards epsilon). Scores: the least-squares estimate, over all steps,
of every canary's inclusion indicator from those residuals (it separates canaries whose
kernel gradients overlap). ``--broken`` runs with no
gradient noise: the audit must then refute the claimed epsilon. Each recorded claim also gets
``ideal``: the same statistics on simulated releases of the textbook Gaussian mechanism at the
same noise, steps and number of canaries (``scripts.dp_audit.ideal_bound``), the most any
auditor of this design can show against a correct implementation of the claim.

    python -m scripts.papers.mfld_trajectories.audit [--broken]
    python -m scripts.papers.mfld_trajectories.audit --epsilon 1 4 8 --canaries 128 1000 1000 --record   # -> docs/results/mfld_audit.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from regularizers.dp_trajectories import kernel_bound, mfld_step, simulate, step_noise
from regularizers.dp_trajectories.core import clipped_sum, person_gradients, smooth_gradient
from scripts.dp_audit import audit, ideal_bound

TIMES = np.linspace(0.0, 2.0, 9)
OBSERVED = [0, 2, 4, 6, 8]


def run(epsilon: float, broken: bool, m: int = 128, people: int = 200, steps: int = 60,
        n_particles: int = 32, seed: int = 0, delta: float = 1e-5) -> dict:
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    paths = simulate(people * len(OBSERVED), TIMES, seed)
    real = {s: torch.tensor(paths[i * people:(i + 1) * people, s]) for i, s in enumerate(OBSERVED)}
    canaries = torch.tensor(rng.uniform(-2, 2, (m, 2)))
    member = rng.random(m) < 0.5
    data = dict(real)
    data[0] = torch.cat([real[0], canaries[torch.from_numpy(member)]])
    counts = {s: float(people) for s in OBSERVED}  # public sizes: canaries do not change them
    n0 = counts[0]
    clip = kernel_bound(n_particles)
    sigma, noise = step_noise(epsilon, delta, steps, clip, "point", len(OBSERVED))
    cfg = dict(lr=1.0, temperature=0.0, path_weight=0.02, reg=0.1)
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n_particles, len(TIMES), 2, generator=g, dtype=torch.float64)
    times = torch.tensor(TIMES)
    gram, proj = np.zeros((m, m)), np.zeros(m)
    for _ in range(steps):
        new = mfld_step(Z, data, times, clip=clip, noise_std=0.0 if broken else noise, generator=g,
                       counts=counts, **cfg)
        # what the released iterates reveal about snapshot 0's clipped sum (plus noise)
        grad0 = (Z[:, 0] - new[:, 0]) / cfg["lr"]
        smooth0 = smooth_gradient(Z, times, OBSERVED, cfg["path_weight"], cfg["reg"])[:, 0]
        resid = n0 * (grad0 - smooth0) - clipped_sum(person_gradients(real[0], Z[:, 0]), clip)
        a = person_gradients(canaries, Z[:, 0])
        a = a * (clip / a.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)[:, None, None]
        A = a.flatten(1).numpy()  # (m, N d): canary c's vector in row c
        gram += A @ A.T
        proj += A @ resid.flatten().numpy()
        Z = new
    # least squares over all steps for the inclusion indicators: unlike a per-canary likelihood
    # ratio it removes the other canaries' overlapping contributions
    scores = np.linalg.solve(gram + 1e-9 * np.trace(gram) / m * np.eye(m), proj)
    res = audit(scores, member, delta)
    with np.errstate(divide="ignore"):  # ideal_bound takes log(1 - q) = log 0 at q = 1
        ideal = ideal_bound(sigma, 1.0, steps, m, delta)
    return {"epsilon_claimed": epsilon, "broken": broken, "sigma": sigma, "canaries": m,
            "steps": steps, "eps_lower_bound": res["eps_lower_bound"], "best": res["best"],
            "ideal": ideal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilon", type=float, nargs="+", default=[4.0])
    ap.add_argument("--canaries", type=int, nargs="+", default=[1000], help="one per --epsilon")
    ap.add_argument("--broken", action="store_true")
    ap.add_argument("--record", action="store_true", help="run real and broken, write docs/results")
    args = ap.parse_args()
    if len(args.canaries) != len(args.epsilon):
        ap.error("give one --canaries value per --epsilon value")
    if not args.record:
        print(json.dumps([run(e, args.broken, m) for e, m in zip(args.epsilon, args.canaries)], indent=2))
        return
    rows = [run(e, b, m) for e, m in zip(args.epsilon, args.canaries) for b in (False, True)]
    out = Path(__file__).resolve().parents[3] / "docs" / "results" / "mfld_audit.json"
    command = (f"python -m scripts.papers.mfld_trajectories.audit --epsilon {' '.join(f'{e:g}' for e in args.epsilon)} "
               f"--canaries {' '.join(map(str, args.canaries))} --record")
    out.write_text(json.dumps({"command": command, "runs": rows}, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
