"""Fit the massive-activation emergence law per layer to a saved monitor history.

    python -m scripts.papers.massive_activations.fit runs/massive_activations_lm/version_0/massive_activations.csv

Prints the table (ratio at start/end, top-1 position, A, lambda, gamma, t0, K, R^2; then
per layer the steady state, peak step and r(horizon x last step) with their bootstrap
intervals, and ``NOT IDENTIFIABLE`` with the reason where the window cannot determine
them) and writes ``massive_fit.json`` (the same, plus parameter intervals), ``massive_ratio.png`` and ``massive_heatmap.png`` beside the
CSV (or into ``--out``). Law and fit: :mod:`toolkit.monitors.emergence`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


from toolkit.monitors.emergence import fit_history, plot_history, summary_table
from toolkit.monitors.massive import read_history


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv", help="massive_activations.csv written by MassiveActivationMonitor")
    ap.add_argument("--out", default=None, help="folder for the JSON and plots (default: beside the CSV)")
    ap.add_argument("--min-step", type=int, default=0, help="ignore steps before this one")
    ap.add_argument("--horizon", type=float, default=3.0,
                    help="predict r at this multiple of the last step (default 3)")
    ap.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (0: none; "
                    "default: fit_emergence's)")
    ap.add_argument("--rtol", type=float, default=None, help="largest relative half-width of "
                    "an identifiable prediction (default: fit_emergence's)")
    ap.add_argument("--level", type=float, default=None, help="interval level")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rows = [r for r in read_history(args.csv) if r["step"] >= args.min_step]
    if not rows:
        ap.error(f"{args.csv} holds no rows at or after step {args.min_step}")
    out = Path(args.out or Path(args.csv).parent)
    out.mkdir(parents=True, exist_ok=True)
    kw = {k: v for k, v in dict(n_boot=args.n_boot, rtol=args.rtol, level=args.level).items()
          if v is not None}
    fits = fit_history(rows, horizon=args.horizon, **kw)
    print(summary_table(rows, fits))
    result = {str(i): f.to_dict() for i, f in fits.items()}
    (out / "massive_fit.json").write_text(json.dumps(result, indent=2))
    if not args.no_plots:
        import matplotlib.pyplot as plt
        for fig in plot_history(rows, fits, out).values():
            plt.close(fig)
    return result


if __name__ == "__main__":
    main()
