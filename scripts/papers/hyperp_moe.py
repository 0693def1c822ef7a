"""SqrtGate vs the plain gate across MoE granularity, and HyperP + MoE vs dense on the char GPT.

    python -m scripts.papers.hyperp_moe            # ~15 CPU-minutes; writes the files below
    python -m scripts.papers.hyperp_moe --quick    # a smoke run (few steps), writes nothing under docs/

Granularity as in ArchScale (``n_experts = sparsity * top_k``, expert hidden = dense hidden /
top_k, so the active parameters stay the dense MLP's): sparsity 4, n_experts 4 / 8 / 16 with
top_k 1 / 2 / 4.

1. At initialization: output RMS of one ``MoEMLP`` (width 128) on unit-RMS Gaussian tokens, its
   expert matrices on HyperP's muP sphere (``||W_e||_F = sqrt(fan_out)``, where the ``hyperp``
   optimizer with ``radius_scale: 1.0`` puts them at its first step), router at the GPT's std
   0.02; mean over 3 seeds.
2. After training: ``recipes/hyperp_moe_lm.yaml`` (HyperP, depth-muP) with each of the six MoE
   settings and the dense MLP; the MoE output RMS is the stability monitor's ``mlp_rms`` on 8
   validation batches divided by the branch scale 1/sqrt(2L), averaged over layers; val loss is
   the recipe's final validation loss.

Writes ``docs/results/hyperp_moe_lm.json`` and ``docs/figures/moe_rms.png``.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import lightning as L
import torch
import yaml

from scripts.lm_run import fit_quietly
from toolkit import LanguageModel, TextDataModule
from toolkit.models import MoEConfig, MoEMLP
from toolkit.monitors.stability import stability_indicators

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "hyperp_moe_lm.yaml"
SPARSITY = 4
EXPERTS = (4, 8, 16)
GATES = ("sqrt", "plain")
COMMAND = "python -m scripts.papers.hyperp_moe"


def on_mup_sphere_(layer: MoEMLP) -> MoEMLP:
    """Each expert matrix rescaled to Frobenius norm sqrt(fan_out) (HyperP, radius_scale 1)."""
    with torch.no_grad():
        for w in (layer.w_in, layer.w_out):
            w.mul_(math.sqrt(w.shape[1]) / torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True))
    return layer


@torch.no_grad()
def init_rms(n_experts: int, gate: str, width: int = 128, tokens: int = 4096,
             seeds: int = 3) -> float:
    vals = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        cfg = MoEConfig(n_experts, n_experts // SPARSITY, gate=gate)
        layer = on_mup_sphere_(MoEMLP(width, cfg, 4 * width))
        torch.nn.init.normal_(layer.router.weight, std=0.02)
        vals.append(layer(torch.randn(tokens, width)).square().mean().sqrt().item())
    return sum(vals) / len(vals)


def recipe_args() -> tuple[dict, dict, dict]:
    cfg = yaml.safe_load(RECIPE.read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]


def train(moe: dict | None, steps: int | None) -> dict:
    model_args, data_args, trainer_args = recipe_args()
    L.seed_everything(0, verbose=False)
    model = LanguageModel(**{**model_args, "moe": moe})
    data = TextDataModule(**data_args)
    val_loss, wall = fit_quietly(model, data, steps or trainer_args["max_steps"],
                                 trainer_args["limit_val_batches"])
    scale = model.model.blocks[0].branch_scale
    model.eval()
    rms, load = [], []
    for i, (x, _) in enumerate(data.val_dataloader()):
        if i == 8:
            break
        ind = stability_indicators(model.model, x)
        rms.append(ind["mlp_rms/mean"] / scale)
        load.append(ind.get("expert_load/mean", float("nan")))
    out = {"val_loss": val_loss,
           "mlp_rms": sum(rms) / len(rms), "expert_load": sum(load) / len(load),
           "train_s": round(wall, 1),
           "active_mlp_params": active_mlp_params(model)}
    print(f"moe={moe}: {out}", flush=True)
    return out


def active_mlp_params(model: LanguageModel) -> int:
    """Parameters of one block's MLP that one token uses (router included)."""
    mlp = model.model.blocks[0].mlp
    if not isinstance(mlp, MoEMLP):
        return sum(p.numel() for p in mlp.parameters())
    per_expert = (mlp.w_in[0].numel() + mlp.w_out[0].numel())
    shared = sum(p.numel() for p in mlp.shared.parameters()) if mlp.shared is not None else 0
    return mlp.top_k * per_expert + shared + mlp.router.weight.numel()


def plot(values: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, stage, title in ((axes[0], "init", "MoE output RMS at init (muP sphere)"),
                             (axes[1], "trained", "MoE output RMS after training")):
        for gate, style in (("sqrt", "o-"), ("plain", "s--")):
            ax.plot(EXPERTS, [values[f"rms_{stage}_{gate}_E{e}"] for e in EXPERTS], style,
                    label=f"{gate} gate")
        if stage == "trained":
            ax.axhline(values["rms_trained_dense"], color="gray", ls=":", label="dense MLP")
        ax.set_xscale("log", base=2)
        ax.set_xticks(EXPERTS, [f"E={e}\nk={e // SPARSITY}" for e in EXPERTS])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("RMS")
        ax.legend(fontsize=8)
    ax = axes[2]
    for gate, style in (("sqrt", "o-"), ("plain", "s--")):
        ax.plot(EXPERTS, [values[f"val_loss_{gate}_E{e}"] for e in EXPERTS], style,
                label=f"MoE, {gate} gate")
    ax.axhline(values["val_loss_dense"], color="gray", ls=":", label="dense (equal active)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(EXPERTS, [f"E={e}\nk={e // SPARSITY}" for e in EXPERTS])
    ax.set_title("val loss, HyperP (recipe hyperp_moe_lm)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 training steps, no files written")
    args = ap.parse_args(argv)
    steps = 20 if args.quick else None
    values: dict[str, float] = {}
    for e in EXPERTS:
        for gate in GATES:
            values[f"rms_init_{gate}_E{e}"] = round(init_rms(e, gate), 4)
    print({k: v for k, v in values.items()}, flush=True)
    dense = train(None, steps)
    values.update(val_loss_dense=round(dense["val_loss"], 4),
                  rms_trained_dense=round(dense["mlp_rms"], 4), train_s_dense=dense["train_s"],
                  active_mlp_params_dense=dense["active_mlp_params"])
    for e in EXPERTS:
        for gate in GATES:
            r = train({"n_experts": e, "top_k": e // SPARSITY, "gate": gate}, steps)
            values[f"val_loss_{gate}_E{e}"] = round(r["val_loss"], 4)
            values[f"rms_trained_{gate}_E{e}"] = round(r["mlp_rms"], 4)
            values[f"expert_load_{gate}_E{e}"] = round(r["expert_load"], 3)
            values[f"train_s_{gate}_E{e}"] = r["train_s"]
            values[f"active_mlp_params_E{e}"] = r["active_mlp_params"]
    print(json.dumps(values, indent=1))
    if args.quick:
        return 0
    from scripts.results import record
    record("hyperp_moe_lm", values, command=COMMAND)
    plot(values, ROOT / "docs" / "figures" / "moe_rms.png")
    print("wrote docs/results/hyperp_moe_lm.json and docs/figures/moe_rms.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
