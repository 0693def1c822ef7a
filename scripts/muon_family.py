"""The Muon family at CPU scale: Polar Express vs quintic, NorMuon vs Muon, cautious weight decay.

A small char GPT (2 layers, 64 wide, 2 heads, block 64, batch 32; far below the papers' 124M-1.1B models)
on Tiny Shakespeare, the muon_lm settings otherwise (Muon lr 0.02, adam_lr 0.01, wd 0.1, cosine
to 0.1x after 5% warmup), validated every ``--eval_every`` steps on 256 fixed windows. One thread.

    python -m scripts.muon_family --arm muon --arm normuon --seeds 0 1 2 --steps 600
    python -m scripts.muon_family --summary            # aggregate runs/muon_family/*.json

Arms: ``muon`` (quintic), ``muon_pe`` (ns_coefficients polar_express), ``normuon``,
``muon_cwd`` (cautious_wd), ``adamw``. Each run writes runs/muon_family/<arm>-s<seed>.json with
its val curve; ``--summary`` prints mean/spread of final val loss and the steps each arm needs
to reach Muon's final val loss (first eval at or below it, per seed).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

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


def run(arm: str, seed: int, steps: int, eval_every: int, lr: float | None = None,
        width: int = 64, layers: int = 2) -> dict:
    from toolkit import LanguageModel, TextDataModule
    name, default_lr, extra = ARMS[arm]
    lr = default_lr if lr is None else lr
    kw = {"betas": [0.9, 0.99]}
    if name != "adamw":
        kw.update(adam_lr=0.01, momentum=0.95, nesterov=True, ns_steps=5, adjust_lr="original")
    kw.update(extra)
    L.seed_everything(seed, verbose=False)
    model = LanguageModel(block_size=64, n_layer=layers, n_head=max(1, width // 32), n_embd=width,
                          optimizer=name, lr=lr, weight_decay=0.1, optimizer_kwargs=kw,
                          warmup_steps=round(0.05 * steps), lr_decay="cosine", min_lr_ratio=0.1)
    data = TextDataModule(block_size=64, batch_size=32, val_blocks=256, seed=seed)
    curve = _Curve()
    trainer = L.Trainer(max_steps=steps, val_check_interval=eval_every,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1,
                        callbacks=[curve])
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return {"arm": arm, "seed": seed, "lr": lr, "steps": steps, "curve": curve.points,
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
        res[arm] = {"seeds": [r["seed"] for r in rs], "finals": finals,
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
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval_every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for arm in args.arm:
        for seed in args.seeds:
            r = run(arm, seed, args.steps, args.eval_every, args.lr)
            (OUT / f"{arm}{args.tag}-s{seed}.json").write_text(json.dumps(r))
            print(f"{arm} seed {seed}: final {r['final']:.4f} ({r['wall_s']} s)", flush=True)
    if args.summary:
        summary()


if __name__ == "__main__":
    main()
