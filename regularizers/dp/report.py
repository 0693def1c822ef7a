"""What a DP-SGD run reports: epsilon, the mechanism's parameters and the analysis used."""
from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

SHUFFLE_ANALYSIS = ("fixed-size batches of a secret random permutation per pass, no privacy "
                    "amplification by sampling: each pass counted as one full-batch Gaussian "
                    "release (sensitivity C under zero-out adjacency), composed over passes. "
                    "Not add/remove: removing a row shifts every later batch of its pass")
POISSON_ANALYSIS = "Poisson-subsampled Gaussian mechanism (add/remove adjacency)"
# What "neighbouring datasets" means for the epsilon of each sampling (docs/dp.md, Shuffling):
# zero-out replaces one row by one whose clipped gradient is zero, N and the order unchanged.
ADJACENCY = {"poisson": "add/remove-one", "shuffle": "zero-out"}
EPSILON_LOG = {"poisson": "dp/epsilon", "shuffle": "dp/epsilon_zero_out"}
# Hooks that see the private training batch: with hide_training_metrics their logs are dropped.
TRAINING_HOOKS = {"training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward",
                  "on_after_backward", "on_before_optimizer_step", "on_train_epoch_end",
                  "optimizer_step", "on_before_zero_grad"}


def without_training_metrics(module):
    """``module.log`` that drops what training hooks log (their values are functions of
    the private batch released without noise)."""
    log = module.log

    def quiet_log(*args, **kwargs):
        if module._current_fx_name not in TRAINING_HOOKS:
            log(*args, **kwargs)
    return quiet_log


def build_report(dp, steps: int) -> dict:
    """The report of a ``DPSGD`` callback after ``steps`` trainer steps."""
    d = dp.data
    return {
        "epsilon": dp.epsilon(), "delta": dp.delta, "noise_multiplier": dp.sigma,
        "sample_rate": d and d.sample_rate, "steps": steps, "accounted_steps": dp.budget.steps,
        "accountant": dp.accountant, "max_grad_norm": dp.max_grad_norm, "clipping": dp.clipping,
        "expected_batch_size": d and d.expected_batch_size, "num_samples": d and d.num_samples,
        "sampling": dp.sampling, "adjacency": ADJACENCY[dp.sampling],
        "analysis": POISSON_ANALYSIS if dp.sampling == "poisson" else SHUFFLE_ANALYSIS,
        "training_metrics_logged": not dp.hide_training_metrics,
        "fits": dp.budget.fits, "noise_from_seed": dp.seeded,
        "ledger": [list(s) for s in dp.ledger],
        **({"epsilon_replace_one": replace_one_epsilon(dp)} if dp.sampling == "shuffle" else {}),
        # BandMF: noise, bands, strategy, column norm, and its own analysis line
        **(dp.bandmf.report(dp.sigma) if getattr(dp, "bandmf", None) else {"noise": "gaussian"})}


def replace_one_epsilon(dp) -> float:
    """Under shuffle, the epsilon for replacing one row by any other (substitution): two
    clipped gradients differ by at most 2C, so the ledger at half the noise multiplier."""
    return dp.budget.epsilon_of([[s / 2, q, n] for s, q, n in dp.ledger])


def publish(r: dict, log_dir: str | None) -> None:
    """Print the report and write ``dp_report.json`` into the run folder (rank 0 only)."""
    q = r["sample_rate"] if r["sample_rate"] is not None else float("nan")
    rank_zero_info(f"DP-SGD report: {r.get('epsilon_level', 'example-level')} "
                   f"epsilon={r['epsilon']:.4f} delta={r['delta']:g} N={r['num_samples']} "
                   f"sigma={r['noise_multiplier'] or float('nan'):.4g} q={q:.5g} "
                   f"steps={r['accounted_steps']} accountant={r['accountant']} "
                   f"C={r['max_grad_norm']} {r['adjacency']} adjacency ({r['analysis']})"
                   + (f" noise=bandmf bands={r['bands']} strategy={r['strategy']} "
                      f"||c||={r['column_norm']:.4g}" if r.get("noise") == "bandmf" else ""))
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(log_dir) / "dp_report.json.tmp"
        tmp.write_text(json.dumps(r, indent=2))
        tmp.replace(Path(log_dir) / "dp_report.json")  # never a half-written report
