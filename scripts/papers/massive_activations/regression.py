"""Architecture -> emergence-law targets (Gallego-Feliciano et al. 2025, "Hidden Dynamics of
Massive Activations in Transformer Training", Sec. 5: the law's parameters predicted from
architecture, high accuracy for the steady state, moderate for timing), at CPU scale.

Per layer of every run of ``scripts/papers/massive_activations/grid.py``, the law (Eq. 1) is fitted with
:func:`toolkit.monitors.emergence.fit_emergence`; the targets are
  * steady state K, only where the fit is identifiable (peak inside the window, K and the
    3x-horizon prediction within +-10 % in the bootstrap);
  * emergence timing: the peak step, where the peak lies inside the window in >= 95 % of
    bootstrap replicates and its interval is within +-25 %;
  * in-window timing: the half-rise step, where the fitted law first gets halfway from r(0)
    to its maximum over the window (an interpolation, so it needs no peak; kept where its
    bootstrap interval is within +-25 %);
  * the fitted K of every layer, flags ignored (what a free fit would hand a regressor);
  * the ratio at the end of the window (mean of the last 4 measurements): measured, always
    available, but not a steady state.
Features: log2 width, depth, log2 heads, log10 lr, relative layer position (l + 0.5) / depth.
Regressor: ridge (alpha = 1 on standardized features, fixed beforehand) on log targets.
Accuracy: leave-one-configuration-out (all layers of a run held out together, since they
share the run), as R^2 of log target, median |relative error| and Spearman rho, next to the
same held-out error of the training-fold mean.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

FEATURES = ("log2 width", "depth", "log2 heads", "log10 lr", "layer position")
ALPHA = 1.0
MIN_N = 8


def features(cfg: dict, layer: int) -> list[float]:
    return [math.log2(cfg["width"]), cfg["depth"], math.log2(cfg["heads"]),
            math.log10(cfg["lr"]), (layer + 0.5) / cfg["depth"]]


def ridge_fit(X: np.ndarray, y: np.ndarray, alpha: float = ALPHA):
    """Ridge on standardized columns with an unpenalized intercept; returns a predictor."""
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = (X - mu) / sd
    ym = y.mean()
    w = np.linalg.solve(Z.T @ Z + alpha * np.eye(Z.shape[1]), Z.T @ (y - ym))
    return lambda Xn: ym + ((np.asarray(Xn) - mu) / sd) @ w


def loo_by_group(X, y, groups, alpha: float = ALPHA):
    """Held-out predictions, each group predicted by ridge (and by the mean) fitted on the
    others."""
    pred, base = np.empty_like(y), np.empty_like(y)
    for g in np.unique(groups):
        out = groups == g
        pred[out] = ridge_fit(X[~out], y[~out], alpha)(X[out])
        base[out] = y[~out].mean()
    return pred, base


def scores(log_y, log_pred, log_base) -> dict:
    ss = lambda p: float(((log_y - p) ** 2).sum())
    tot = float(((log_y - log_y.mean()) ** 2).sum())
    rel = lambda p: float(np.median(np.abs(np.exp(p - log_y) - 1)))
    return {"n": int(log_y.size), "loo_r2_log": 1 - ss(log_pred) / tot if tot > 0 else math.nan,
            "median_rel_err": rel(log_pred), "baseline_median_rel_err": rel(log_base),
            "spearman": float(spearmanr(log_y, log_pred).statistic)}


def half_rise(fit, n: int = 400) -> tuple[float, tuple[float, float]]:
    """Step where the fitted law first reaches r(0) + (max_window r - r(0)) / 2, and its
    bootstrap percentile interval (from ``fit.samples``)."""
    from toolkit.monitors.emergence import emergence_law
    tt = np.linspace(0.0, fit.t_max, n)

    def first_half(curves):
        r0, top = curves[:, :1], curves.max(1, keepdims=True)
        return tt[np.argmax(curves >= r0 + 0.5 * (top - r0), axis=1)]
    point = float(first_half(fit(tt)[None])[0])
    boot = first_half(emergence_law(tt[None], *fit.samples.T[..., None]))
    a = (1 - fit.level) / 2
    return point, (float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a)))


def layer_records(out: Path, grid: list[dict]) -> list[dict]:
    from toolkit.monitors.emergence import fit_history
    from toolkit.monitors.massive import read_history
    recs = []
    for cfg in grid:
        csv = out / cfg["name"] / "massive_activations.csv"
        if not (out / cfg["name"] / "config.json").is_file():  # written when the run ends
            continue
        rows = read_history(csv)
        fits = fit_history(rows)
        for i, f in fits.items():
            mine = [r["ratio"] for r in rows if r["layer"] == i]
            lo, hi = f.intervals["peak_step"]
            pk = f.peak_step
            timing = bool(hi <= f.t_max and 0 < pk and max(pk - lo, hi - pk) <= 0.25 * pk)
            hr, (hr_lo, hr_hi) = half_rise(f)
            recs.append(dict(cfg, layer=i, fit=f.to_dict(), ratio_end=float(np.mean(mine[-4:])),
                             steady_ok=bool(f.identifiable), timing_ok=timing, half_rise=hr,
                             half_rise_iv=[hr_lo, hr_hi],
                             half_ok=bool(max(hr - hr_lo, hr_hi - hr) <= 0.25 * hr)))
    return recs


TARGETS = {  # name -> (value of a record, which records)
    "steady state K (identifiable fits)": (lambda r: r["fit"]["K"], lambda r: r["steady_ok"]),
    "peak step (peak inside the window)": (lambda r: r["fit"]["peak_step"], lambda r: r["timing_ok"]),
    "half-rise step (in-window timing)": (lambda r: r["half_rise"], lambda r: r["half_ok"]),
    "fitted K, all layers (flags ignored)": (lambda r: r["fit"]["K"], lambda r: True),
    "ratio at the end of the window (measured)": (lambda r: r["ratio_end"], lambda r: True),
}


def regress(recs: list[dict]) -> dict:
    res = {}
    for name, (value, keep) in TARGETS.items():
        sel = [r for r in recs if keep(r)]
        n_cfg = len({r["name"] for r in sel})
        if len(sel) < MIN_N or n_cfg < 3:
            res[name] = {"n": len(sel), "configs": n_cfg, "note": f"fewer than {MIN_N} layers "
                         "or 3 configurations: no regression"}
            continue
        X = np.array([features(r, r["layer"]) for r in sel])
        y = np.log(np.array([float(value(r)) for r in sel]))
        groups = np.array([r["name"] for r in sel])
        pred, base = loo_by_group(X, y, groups)
        full = ridge_fit(X, y)
        coef = [float(full(np.eye(len(FEATURES))[k] + X.mean(0)) - full(X.mean(0)[None])[0])
                for k in range(len(FEATURES))]
        res[name] = dict(scores(y, pred, base), configs=n_cfg, log_effect_per_unit=dict(
            zip(FEATURES, coef)), points=[[r["name"], r["layer"], float(np.exp(a)),
                                           float(np.exp(b))] for r, a, b in zip(sel, y, pred)])
    return res


def _iv(v) -> str:
    return "[" + ", ".join(f"{float(x):.3g}" for x in v) + "]"


def markdown(recs: list[dict], res: dict, grid: list[dict], steps: str, reproduce: str) -> str:
    ran = {r["name"] for r in recs}
    lines = ["# Emergence law from the architecture (CPU scale)", "",
             f"Char GPT of `recipes/massive_activations_lm.yaml` (AdamW, constant lr, no weight "
             f"decay, fixed probe batch, ratio every 25 steps), {steps} steps per run, "
             f"{len(ran)} grid configurations ran. Reproduce: `{reproduce}`.", "",
             f"Of {len(recs)} layer curves, the law's steady state is identifiable in "
             f"{sum(r['steady_ok'] for r in recs)} and the peak step in "
             f"{sum(r['timing_ok'] for r in recs)}, the half-rise step in "
             f"{sum(r['half_ok'] for r in recs)} (90% block bootstrap; criteria in "
             "`scripts/papers/massive_activations/regression.py`); "
             f"{sum('peak beyond' in r['fit']['reason'] for r in recs)} are still rising at "
             "the last step in at least 10% of replicates. Targets without enough identified "
             "layers get no regression: the fitted values exist but the window does not "
             "determine them (the 'flags ignored' row shows what a regressor makes of them).",
             "", "## Leave-one-configuration-out accuracy (ridge on log target)", "",
             "| target | layers | configs | LOO R^2 (log) | median rel. err | mean-baseline "
             "rel. err | Spearman |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in res.items():
        if "note" in s:
            lines.append(f"| {name} | {s['n']} | {s['configs']} | {s['note']} | | | |")
        else:
            lines.append(f"| {name} | {s['n']} | {s['configs']} | {s['loo_r2_log']:.2f} | "
                         f"{s['median_rel_err']:.0%} | {s['baseline_median_rel_err']:.0%} | "
                         f"{s['spearman']:.2f} |")
    lines += ["", "## Per-layer fits (90% bootstrap intervals)", "",
              "| config | layer | R^2 | ratio end | K | K interval | peak step | peak interval "
              "| r(3x) | r(3x) interval | half-rise step | identifiable | timing |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in recs:
        f, iv = r["fit"], r["fit"]["intervals"]
        lines.append(f"| {r['name']} | {r['layer']} | {f['r2']:.3f} | {r['ratio_end']:.1f} | "
                     f"{f['K']:.3g} | {_iv(iv['steady'])} | {float(f['peak_step']):.4g} | "
                     f"{_iv(iv['peak_step'])} | {f['prediction']:.3g} | {_iv(iv['horizon'])} | "
                     f"{r['half_rise']:.0f} {_iv(r['half_rise_iv'])} | "
                     f"{'yes' if r['steady_ok'] else 'no'} | {'yes' if r['timing_ok'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plots(recs: list[dict], res: dict, out: Path, grid: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.monitors.emergence import by_layer
    from toolkit.monitors.massive import read_history
    done = [res[k] for k in res if "points" in res[k]]
    names = [k for k in res if "points" in res[k]]
    fig, axes = plt.subplots(1, max(len(done), 1), figsize=(4 * max(len(done), 1), 3.8),
                             squeeze=False)
    for ax, name, s in zip(axes.flat, names, done):
        y = np.array([p[2] for p in s["points"]])
        p = np.array([p[3] for p in s["points"]])
        lr = np.array([next(r["lr"] for r in recs if r["name"] == q[0]) for q in s["points"]])
        for v, c in zip(sorted(set(lr)), ("C0", "C3", "C2")):
            ax.loglog(y[lr == v], p[lr == v], "o", ms=4, color=c, label=f"lr {v:g}")
        lim = [min(y.min(), p.min()) * 0.8, max(y.max(), p.max()) * 1.25]
        ax.plot(lim, lim, "k-", lw=0.6)
        ax.set_title(f"{name}\nLOO R²={s['loo_r2_log']:.2f}, med. err {s['median_rel_err']:.0%}",
                     fontsize=8)
        ax.set_xlabel("measured (fitted)", fontsize=8)
        ax.set_ylabel("predicted, config held out", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)

    ran = [c for c in grid if any(r["name"] == c["name"] for r in recs)]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(ran) / cols), cols, figsize=(13, 2.5 * math.ceil(
        len(ran) / cols)), squeeze=False)
    for ax, cfg in zip(axes.flat, ran):
        for i, (t, r) in by_layer(read_history(out / cfg["name"] / "massive_activations.csv")).items():
            ok = next(q["steady_ok"] for q in recs if q["name"] == cfg["name"] and q["layer"] == i)
            ax.plot(t, r, "-" if ok else ":", lw=1, label=f"L{i}" + ("" if ok else " (n.i.)"))
        ax.set_title(cfg["name"], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ran):]:
        ax.axis("off")
    fig.supylabel("max|h| / median|h|", fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_curves.png"), dpi=100)
    plt.close(fig)


def analyze(out: Path, docs: Path, grid: list[dict], name: str = "emergence_grid") -> dict:
    recs = layer_records(out, grid)
    if not recs:
        raise SystemExit(f"no finished runs under {out}: run `emergence_grid.py run` first")
    res = regress(recs)
    steps = sorted({json.loads((out / r["name"] / "config.json").read_text())["steps"]
                    for r in recs if (out / r["name"] / "config.json").is_file()})
    docs.mkdir(parents=True, exist_ok=True)
    path = docs / f"{name}.md"
    rel = out.resolve().relative_to(Path.cwd().resolve()) if out.resolve().is_relative_to(
        Path.cwd().resolve()) else out
    widths, lrs = sorted({r["width"] for r in recs}), sorted({r["lr"] for r in recs})
    wflag = ("" if len(widths) > 1 else f" --widths {widths[0]}") + (
        "" if len(lrs) > 1 else f" --lrs {lrs[0]:g}")
    reproduce = (f"python -m scripts.papers.massive_activations.grid run --jobs 2 --steps {steps[0] if steps else '?'}"
                 f"{wflag} --out {rel} && python -m scripts.papers.massive_activations.grid analyze --out {rel} "
                 f"--name {name}")
    path.write_text(markdown(recs, res, grid, "/".join(map(str, steps)) or "?", reproduce))
    path.with_suffix(".json").write_text(json.dumps({"layers": recs, "regression": res},
                                                    indent=1, default=str))
    plots(recs, res, out, grid, path)
    print(path.read_text().split("## Per-layer")[0])
    return res
