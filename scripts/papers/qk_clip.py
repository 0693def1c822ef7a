"""QK-clip under stress (Kimi K2's MuonClip, arXiv 2507.20534), from recipes/qk_clip_lm.yaml:

    python -m scripts.papers.qk_clip recipes/qk_clip_lm.yaml --seeds 0 1

Arms: ``high`` (the recipe's Muon lr, QKClip removed), ``high+clip`` (the recipe's QKClip with
``measure="forward"``, Kimi K2's order, clipping by the pre-update logits of the step's
training forward), ``high+clip_post`` (QKClip's default ``measure="post_step"``: exact cap, one extra forward) and
``stable`` (lr ``--stable_lr``, no QKClip); ``--taus`` runs the clip arms at other tau values. After every optimizer step the max attention logit on that
step's batch is recomputed here, from each block's input and ``c_attn``'s weights in eval mode,
independently of the callback's code. Prints and returns, per arm and seed, the final val loss,
the largest post-step max logit over the run and the fraction of steps above tau.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from pathlib import Path

import lightning as L
import torch
import yaml


@torch.no_grad()
def gpt_max_logit(gpt, x: torch.Tensor) -> float:
    """max over layers, heads, causal pairs of q.k / sqrt(d), eval mode (toolkit GPT)."""
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in gpt.blocks]
    was = gpt.training
    gpt.eval()
    try:
        gpt(x)
    finally:
        gpt.train(was)
        for h in hooks:
            h.remove()
    worst = -math.inf
    for block, h in zip(gpt.blocks, inputs):
        z = block.ln_1(h)
        C, H = z.shape[-1], block.attn.n_head
        qkv = torch.nn.functional.linear(z, block.attn.c_attn.weight, block.attn.c_attn.bias)
        B, T, _ = z.shape
        q, k = (t.reshape(B, T, H, C // H).transpose(1, 2) for t in (qkv[..., :C], qkv[..., C:2 * C]))
        s = (q @ k.transpose(-1, -2)) / math.sqrt(C // H)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
        worst = max(worst, s.max().item())
    return worst


class _Probe(L.Callback):
    def __init__(self):
        self.after: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(gpt_max_logit(pl_module.model, batch[0]))


def run(cfg: dict, arm: str, seed: int, stable_lr: float, tau: float | None = None) -> dict:
    from toolkit import LanguageModel, TextDataModule
    import regularizers
    margs = copy.deepcopy(cfg["model"]["init_args"])
    cbs = cfg["trainer"].get("callbacks", [])
    clip_args = dict(next(c.get("init_args", {}) for c in cbs if c["class_path"].endswith("QKClip")))
    if tau is not None:
        clip_args["tau"] = tau
    clip_args["measure"] = "post_step" if arm == "high+clip_post" else "forward"
    if arm == "stable":
        margs["lr"] = stable_lr
    L.seed_everything(seed, verbose=False)
    model = LanguageModel(**margs)
    dargs = {**cfg["data"]["init_args"], "seed": seed}
    probe = _Probe()
    callbacks = [probe]
    if arm.startswith("high+clip"):  # before the probe: the probe reads the clipped weights
        callbacks.insert(0, regularizers.QKClip(**clip_args))
    tr = cfg["trainer"]
    trainer = L.Trainer(max_steps=tr["max_steps"], val_check_interval=tr["max_steps"],
                        check_val_every_n_epoch=None, limit_val_batches=tr.get("limit_val_batches"),
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, callbacks=callbacks)
    trainer.fit(model, TextDataModule(**dargs))
    tau = clip_args.get("tau", 100.0)
    return {"arm": arm, "seed": seed, "lr": margs["lr"], "tau": tau,
            "val": float(trainer.callback_metrics["val/loss"]),
            "max_logit": max(probe.after), "final_logit": probe.after[-1],
            "steps_above_tau": sum(v > tau * (1 + 1e-5) for v in probe.after) / len(probe.after),
            "clipped_total": (callbacks[0].state_dict()["clipped_total"]
                              if arm.startswith("high+clip") else 0),
            "logits": [round(v, 3) for v in probe.after]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=["stable", "high", "high+clip"])
    ap.add_argument("--stable_lr", type=float, default=0.02)
    ap.add_argument("--taus", type=float, nargs="+", default=[None],
                    help="tau values for the clip arms (default: the recipe's)")
    ap.add_argument("--out", default="runs/qk_clip_stress.json")
    ap.add_argument("--record", nargs="+", metavar="RUNS_JSON",
                    help="only aggregate these outputs into docs/results/qk_clip_lm.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = yaml.safe_load(Path(args.recipe).read_text())
    if args.record:
        return record([r for f in args.record for r in json.loads(Path(f).read_text())], cfg)
    rows = []
    for arm in args.arms:
        for tau in (args.taus if arm.startswith("high+clip") else [None]):
            for seed in args.seeds:
                r = run(cfg, arm, seed, args.stable_lr, tau)
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "logits"}), flush=True)
    for arm, tau in sorted({(r["arm"], r["tau"]) for r in rows}):
        rs = [r for r in rows if (r["arm"], r["tau"]) == (arm, tau)]
        print(f"{arm:>14} (tau {tau:g}): val {statistics.mean(r['val'] for r in rs):.4f} "
              f"{[r['val'] for r in rs]}, max logit {max(r['max_logit'] for r in rs):.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


def plot(rows: list[dict], tau: float, path: Path = Path("docs/figures/qk_clip_lm.png")) -> None:
    """Post-step max logit per step (the separate measurement) for the runs that kept it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r.get("logits"):
            ax.plot(range(1, len(r["logits"]) + 1), r["logits"],
                    label=f"{r['arm']} (lr {r['lr']:g}, seed {r['seed']})")
    ax.axhline(tau, color="k", ls="--", lw=0.8, label=f"tau = {tau:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max attention logit after the step")
    ax.set_title("QK-clip stress (recipes/qk_clip_lm.yaml)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _arm(rows: list[dict], arm: str, tau: float | None = None) -> list[dict]:
    return sorted((r for r in rows if r["arm"] == arm and (tau is None or r["tau"] == tau)),
                  key=lambda r: r["seed"])


def record(rows: list[dict], cfg: dict) -> None:
    """docs/results/qk_clip_lm.json: per arm mean val, largest post-step max logit (the separate
    measurement) and share of steps above tau; the tau sweep of the recipe's clip arm."""
    from scripts.results import record as write
    clip = next(c["init_args"] for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("QKClip"))
    tau = clip["tau"]
    v = {"tau": tau, "lr": cfg["model"]["init_args"]["lr"]}
    for arm, key in (("stable", "stable"), ("high", "high"), ("high+clip", "clip"),
                     ("high+clip_post", "post")):
        rs = _arm(rows, arm, None if arm in ("stable", "high") else tau)
        if not rs:
            continue
        v[f"{key}_val"] = round(statistics.mean(r["val"] for r in rs), 4)
        v[f"{key}_vals"] = " / ".join(f"{r['val']:.3f}" for r in rs)
        v[f"{key}_max_logit"] = round(max(r["max_logit"] for r in rs), 2)
        v[f"{key}_steps_above"] = round(max(r["steps_above_tau"] for r in rs), 3)
        v[f"{key}_vs_stable_pct"] = round(100 * (v[f"{key}_val"] / v.get("stable_val", v[f"{key}_val"]) - 1), 1)
        if arm.startswith("high+clip"):
            v[f"{key}_clipped_per_run"] = round(statistics.mean(r["clipped_total"] for r in rs))
        v["seeds"] = len(rs)
    v["stable_lr"] = next(r["lr"] for r in rows if r["arm"] == "stable")
    v["clip_overshoot_pct"] = round(100 * (v["clip_max_logit"] / tau - 1), 1)
    sweep = []
    for t in sorted({r["tau"] for r in rows if r["arm"] == "high+clip"}):
        rs = _arm(rows, "high+clip", t)
        val = statistics.mean(r["val"] for r in rs)
        sweep.append(f"tau {t:g}: val {val:.3f} ({100 * (val / v['stable_val'] - 1):+.1f}% vs "
                     f"stable), post-step max {max(r['max_logit'] for r in rs):.1f}")
    v["tau_sweep"] = "; ".join(sweep)
    write("qk_clip_lm", v, "python -m scripts.papers.qk_clip recipes/qk_clip_lm.yaml --seeds 0 1 "
          "--arms stable high high+clip high+clip_post; python -m scripts.papers.qk_clip "
          "recipes/qk_clip_lm.yaml --seeds 0 1 --arms high+clip --taus 15 50 100; then --record "
          "<both outputs>")
    plot([r for r in rows if r["tau"] == tau and r["seed"] == min(r["seed"] for r in rows)], tau)


if __name__ == "__main__":
    main()
