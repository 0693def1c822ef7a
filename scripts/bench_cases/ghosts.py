"""RadiusControl overhead (Ghosts of Softmax controller): a training step with the controller
(pre-step snapshot, one forward-mode JVP for rho_a, rescale when r > r_max) vs a plain step,
with the controller's earlier ``torch.func.jvp`` path (``method="func"``) and its 32-example
subsample (``max_examples=32``) timed in the same interleaved run; ``jvp-alone`` (rho_a of a
fixed step, ``softmax_radius``) and ``forward-no-grad`` split the controller's cost."""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from scripts.harness import Bench, case

from regularizers import RadiusControl, softmax_radius
from toolkit.models import MLP, SmallCNN


def _stepper(model, x, y, control: RadiusControl | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if control is not None:  # the callback's own hooks, without a Trainer around them
        control.on_fit_start(SimpleNamespace(optimizers=[opt]), model)

    def step():
        if control is not None:
            control.on_train_batch_start(None, model, (x, y), 0)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _bench(make_model, x, y, steps: int) -> Bench:
    torch.manual_seed(0)
    models = {k: make_model() for k in ("control", "control-32", "control-func", "plain")}
    for m in models.values():
        m.load_state_dict(models["plain"].state_dict())
    steppers = {"control": _stepper(models["control"], x, y, RadiusControl(r_max=1.0)),
                "control-32": _stepper(models["control-32"], x, y,
                                       RadiusControl(r_max=1.0, max_examples=32)),
                "control-func": _stepper(models["control-func"], x, y,
                                         RadiusControl(r_max=1.0, method="func")),
                "plain": _stepper(models["plain"], x, y, None)}
    alone = make_model()
    delta = {n: 1e-3 * torch.randn_like(p) for n, p in alone.named_parameters()}
    steppers["jvp"] = lambda: softmax_radius(alone, x, delta)

    @torch.no_grad()
    def forward():
        alone(x)
    steppers["forward"] = forward
    run = lambda name: (lambda: [steppers[name]() for _ in range(steps)])
    return Bench({"radius-control": run("control"), "plain-step": run("plain"),
                  "radius-control-32-examples": run("control-32"),
                  "radius-control-torch-func": run("control-func"),
                  "jvp-alone": run("jvp"), "forward-no-grad": run("forward")},
                 extra={"steps per repetition": steps, "batch": len(x)})


@case("ghosts-mlp-step", target={"plain-step": 1.35})
def ghosts_mlp_step(quick: bool) -> Bench:
    """MLP 784-256-256-10 (the ghosts_lr_spike recipe), batch 128, AdamW: RadiusControl / plain."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    return _bench(lambda: MLP(784, (256, 256), 10), x, y, 10 if quick else 50)


@case("ghosts-cnn-step", target={"plain-step": 1.35})
def ghosts_cnn_step(quick: bool) -> Bench:
    """SmallCNN width 16 (GroupNorm), batch 128, AdamW: RadiusControl / plain."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    return _bench(lambda: SmallCNN(1, 10, 8 if quick else 16, "group"), x, y, 2 if quick else 5)
