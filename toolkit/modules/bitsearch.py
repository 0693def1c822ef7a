"""BitWidthSearch: per-layer bit-widths of a trained toolkit GPT under an average-bits budget,
found by RCO (optimizers.RCO; Helcig & Alistarh 2026, arXiv 2605.00649) or a penalty method.

The GPT's weights are frozen; the only trainable tensor is ``logits`` (N layers x K bit-widths).
Layer n at b bits costs b * numel_n / sum numel (``toolkit.models.quant.bit_costs``), so the
budget is the parameter-weighted average bit-width. Each training step draws a Gumbel
straight-through one-hot (RCO: the budget DP's choice on the perturbed logits, every sample
within budget; penalty: the argmax), sets every layer's weight to its fake-quantized choice and
back-propagates the loss to the logits: ``objective="kl"`` (default, as the reference code) the
KL divergence from the full-precision model's next-token distribution on the batch, which
removes the data noise common to both models, or ``"ce"`` the LM loss. ``init="uniform"`` starts
every layer from the same logits t * bits with E[bits] = avg_bits (the reference's
``init_alpha_to_bits``), ``"sensitivity"`` (the reference's default) from -log of each option's weight
MSE (it ignores how much each layer matters: see docs/rco.md); both are retracted onto the budget; temperature tau anneals exponentially from
``tau_init`` to ``tau_min`` over ``max_steps``. RCO keeps the relaxation's expected bits equal to
the budget; the penalty method adds ``penalty * ((E_p[bits] - B) / B)^2``. The final assignment
(``assignment()``) is the exact-budget DP over log p for both methods (the penalty method's own
argmax, which need not meet the budget, is ``assignment(rounding="argmax")``); validation
reports the LM loss of that discrete assignment.
"""
from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

import optimizers
from optimizers import budget_dp
from optimizers.rco import gumbel_straight_through

from ..checkpoint_io import last_checkpoint
from ..models import GPT, GPTConfig
from ..models.quant import bit_costs, wrap_linears
from ..seeding import generator
from .base import cross_entropy


def resolve_checkpoint(path: str) -> Path:
    """A .ckpt file, or a run folder whose newest ``version_N/checkpoints/last.ckpt`` is taken."""
    p = Path(path)
    if p.is_file():
        return p
    found = last_checkpoint(p)
    if found is None or not found.is_file():
        raise FileNotFoundError(
            f"BitWidthSearch: no checkpoint at {path!r} (a .ckpt file or a run folder with "
            f"version_N/checkpoints/last.ckpt); train the model first: python -m toolkit fit "
            f"--config recipes/quickstart.yaml")
    return found


def load_gpt(path: Path) -> GPT:
    """The GPT of a ``LanguageModel`` checkpoint, rebuilt from its hyperparameters (plain
    torch.load: Lightning's ``load_from_checkpoint`` fails inside the CLI's instantiation).

    Loaded with ``weights_only=True``: a checkpoint may come from elsewhere, and unpickling
    arbitrary objects would run its code. Our checkpoints hold tensors and plain values only."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds objects beyond tensors and plain values, and loading them would run "
            f"code from the file ({str(e).splitlines()[0]}); train the model with this toolkit "
            f"(python -m toolkit fit --config recipes/quickstart.yaml), or re-save only its "
            f"state_dict and hyper_parameters as plain values") from None
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("vocab_size") is None:
        raise ValueError(f"{path} is not a toolkit LanguageModel checkpoint with a vocab_size")
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    gpt = GPT(GPTConfig(**{k: v for k, v in hp.items() if k in fields}))
    state = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    gpt.load_state_dict(state)
    return gpt


class BitWidthSearch(L.LightningModule):
    def __init__(self, checkpoint: str = "runs/quickstart", bits: tuple[int, ...] = (2, 3, 4, 8),
                 avg_bits: float = 4.0, method: str = "rco", lr: float = 0.05,
                 penalty: float = 10.0, tau_init: float = 1.0, tau_min: float = 0.05,
                 skip: tuple[str, ...] = ("lm_head",), sample_seed: int = 0,
                 objective: str = "kl", init: str = "uniform"):
        super().__init__()
        if method not in ("rco", "penalty"):
            raise ValueError(f"BitWidthSearch method must be 'rco' or 'penalty', got {method!r}")
        if objective not in ("kl", "ce"):
            raise ValueError(f"BitWidthSearch objective must be 'kl' or 'ce', got {objective!r}")
        if init not in ("sensitivity", "uniform"):
            raise ValueError(f"BitWidthSearch init must be 'sensitivity' or 'uniform', got {init!r}")
        self.save_hyperparameters()
        self.gpt = load_gpt(resolve_checkpoint(checkpoint))
        self.gpt.requires_grad_(False)
        self.layers = wrap_linears(self.gpt, tuple(bits), tuple(skip))
        costs, unit = bit_costs(self.layers)
        self.register_buffer("costs", costs)
        self.budget = float(avg_bits) * float(costs[:, 0].sum() / bits[0])  # avg * sum numel / g
        self.bits_per_unit = costs[:, 0].sum() / bits[0]  # sum numel / g
        lo = costs.min(1).values.sum() / self.bits_per_unit
        hi = costs.max(1).values.sum() / self.bits_per_unit
        if not lo < avg_bits < hi:
            raise ValueError(f"avg_bits {avg_bits} must lie strictly between {float(lo)} and "
                             f"{float(hi)} (all layers at the fewest / most bits)")
        self.logits = torch.nn.Parameter(torch.zeros(len(self.layers), len(bits)))
        with torch.no_grad():
            if init == "sensitivity":
                self.logits.copy_(self.sensitivity_logits())
                optimizers.retract_([self.logits], [self.costs], self.budget)
            else:  # the reference's init_alpha_to_bits: every layer t * bits, E[bits] = avg_bits
                row = torch.zeros(1, len(bits), dtype=torch.float64)
                optimizers.retract_([row], [torch.tensor(bits, dtype=torch.float64)], avg_bits)
                self.logits.copy_(row.expand_as(self.logits))

    @torch.no_grad()
    def sensitivity_logits(self) -> torch.Tensor:
        """-log of each option's mean squared weight error, centred per layer (the reference's
        ``init_alpha_from_sensitivity``): fewer bits where quantizing costs less."""
        mse = torch.stack([((layer.quantized() - layer.linear.weight) ** 2).mean(dim=(1, 2))
                           for _, layer in self.layers])
        logits = -torch.log(mse + 1e-12)
        return logits - logits.mean(-1, keepdim=True)

    # ---- the assignment ------------------------------------------------------------------
    def avg_bits_of(self, choice: torch.Tensor) -> float:
        return float(self.costs[torch.arange(len(choice)), choice].sum() / self.bits_per_unit)

    @torch.no_grad()
    def expected_avg_bits(self) -> float:
        return float((self.logits.double().softmax(-1) * self.costs).sum() / self.bits_per_unit)

    @torch.no_grad()
    def assignment(self, rounding: str = "dp") -> torch.Tensor:
        """Option index per layer: exact-budget DP over log p, or the plain argmax."""
        if rounding == "argmax":
            return self.logits.argmax(-1)
        logp = torch.log_softmax(self.logits.double(), -1).clamp_min(-1e6)
        return budget_dp(self.costs, logp, self.budget, exact=True).choice

    def set_choice(self, choice: torch.Tensor | None) -> None:
        for n, (_, layer) in enumerate(self.layers):
            layer.set_choice(None if choice is None else int(choice[n]))

    def bits_table(self, choice: torch.Tensor) -> dict[str, int]:
        return {name: self.hparams.bits[int(k)] for (name, _), k in zip(self.layers, choice)}

    # ---- Lightning -----------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)

    def configure_optimizers(self):
        if self.hparams.method == "rco":
            group = {"params": [self.logits], "costs": self.costs, "budget": self.budget}
            return optimizers.build_optimizer([group], "rco", lr=self.hparams.lr)
        return optimizers.build_optimizer([self.logits], "adam", lr=self.hparams.lr)

    def _tau(self) -> float:
        total = max(int(self.trainer.max_steps) - 1, 1) if self._trainer is not None else 1
        frac = min(self.global_step / total, 1.0)
        return self.hparams.tau_init * (self.hparams.tau_min / self.hparams.tau_init) ** frac

    def training_step(self, batch, batch_idx):
        x, y = batch
        # a generator per step: the sample is a function of (seed, step), so resume is exact;
        # on the logits' device, where gumbel_straight_through draws
        gen = generator(self.hparams.sample_seed, self.global_step, device=self.logits.device)
        if self.hparams.method == "rco":
            onehot, _ = gumbel_straight_through(self.logits, self._tau(), gen, costs=self.costs,
                                                budget=self.budget)
        else:
            onehot, _ = gumbel_straight_through(self.logits, self._tau(), gen)
        if self.hparams.objective == "kl":  # KL to the full-precision model, as the reference
            self.set_choice(None)
            with torch.no_grad():
                ref = torch.log_softmax(self.gpt(x), -1).flatten(0, -2)
        for n, (_, layer) in enumerate(self.layers):
            layer.set_probs(onehot[n])
        out = self.gpt(x)
        if self.hparams.objective == "kl":
            loss = F.kl_div(torch.log_softmax(out, -1).flatten(0, -2), ref, log_target=True,
                            reduction="batchmean")
        else:
            loss = cross_entropy(out, y)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=x.shape[0])
        if self.hparams.method == "penalty":
            expected = (self.logits.softmax(-1) * self.costs).sum()
            loss = loss + self.hparams.penalty * ((expected - self.budget) / self.budget) ** 2
        self.log("search/expected_avg_bits", self.expected_avg_bits(), batch_size=x.shape[0])
        self.log("search/tau", self._tau(), batch_size=x.shape[0])
        return loss

    def on_validation_epoch_start(self):
        self._val_choice = self.assignment()
        self.set_choice(self._val_choice)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = cross_entropy(self.gpt(x), y)
        self.log("val/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("val/avg_bits", self.avg_bits_of(self._val_choice), batch_size=x.shape[0])

    def on_fit_end(self):
        choice = self.assignment()
        self.final = {"method": self.hparams.method, "avg_bits": self.avg_bits_of(choice),
                      "expected_avg_bits": self.expected_avg_bits(),
                      "bits": self.bits_table(choice)}
        log_dir = self.trainer.log_dir if self.trainer.logger is not None else None
        if log_dir and self.trainer.is_global_zero:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "bit_assignment.json").write_text(json.dumps(self.final, indent=1))
        self.set_choice(choice)


__all__ = ["BitWidthSearch", "resolve_checkpoint"]
