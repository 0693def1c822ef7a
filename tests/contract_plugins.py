"""The plug-ins the contract tests run over, discovered: every Lightning callback exported by
the plug-in packages (``PLUGIN_PACKAGES``' ``__all__``) and every registered optimizer.

A new plug-in takes part without an entry here when its constructor needs no arguments and it
works on any module. Otherwise it gets a line in ``CALLBACKS`` (how to build it for a short
test run, and the module families it applies to: batch mixers need a classifier, the
massive-activation and stability monitors need transformer blocks). A plug-in that cannot take
part says why in ``NOT_IN_CONTRACT``, the one declared place; one without a recipe says why in
``NO_RECIPE``. ``docs/contributing.md`` walks the whole path.
"""
from __future__ import annotations

import importlib
import inspect

import lightning as L

import optimizers
import regularizers
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

PLUGIN_PACKAGES = ("regularizers", "toolkit.monitors")
FAMILIES = {"image", "lm"}

# name -> (factory, module families it applies to); absent: (cls(), FAMILIES)
CALLBACKS = {
    "KMixup": (lambda: regularizers.KMixup(k=4, alpha=0.5, num_classes=10), {"image"}),
    "Mixup": (lambda: regularizers.Mixup(alpha=0.5, num_classes=10), {"image"}),
    "LangevinNoise": (lambda: regularizers.LangevinNoise(temperature=1e-6), FAMILIES),
    "IterateAveraging": (lambda: regularizers.IterateAveraging(start_step=2), FAMILIES),
    "RadiusControl": (lambda: regularizers.RadiusControl(r_max=0.05), FAMILIES),
    "LRSpike": (lambda: regularizers.LRSpike(start=3, length=2, factor=100.0), FAMILIES),
    # a cap below the tiny model's logits, so heads are clipped from the first step
    "QKClip": (lambda: regularizers.QKClip(tau=0.05), {"lm"}),
    "SpectralMonitor": (lambda: SpectralMonitor(every_n_steps=2), FAMILIES),
    "MassiveActivationMonitor": (lambda: MassiveActivationMonitor(every_n_steps=2, fit=False,
                                                                  plots=False), {"lm"}),
    "StabilityMonitor": (lambda: StabilityMonitor(every_n_steps=2), {"lm"}),
    # seeded so a straight and a resumed run draw the same batches and noise
    "DPSGD": (lambda: regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0,
                                         seed=3), {"image"}),
}
# plug-ins (callback class or optimizer name) the contract cannot run, and why
NOT_IN_CONTRACT = {
    "BatchTransform": "abstract base of the batch mixers; KMixup and Mixup take part",
    "rco": "optimizes BitWidthSearch's relaxation logits (registered model_params=False), not "
           "a model's parameters; tests/test_rco.py checks it against brute force",
}
# plug-ins whose resume is deliberately not a bitwise continuation, and why; the contract
# checks instead that the resumed run differs (fresh draws) and finishes the same budget
FRESH_ON_RESUME = {
    "DPSGD": "every fit and resume draws fresh noise and batches, so no released noise is ever "
             "replayed (issue 23); tests/test_dp_fresh_noise.py checks the ledger continues",
}
# plug-ins no recipe names, and why (every other one is named in some recipes/*.yaml)
NO_RECIPE = {
    "BatchTransform": "abstract base of KMixup and Mixup",
    "adam": "torch.optim.Adam, a baseline beside AdamW: no paper result to reproduce",
}
# pairs refused at fit start, with a fragment of the error
REFUSED = {frozenset({"KMixup", "Mixup"}): "both mix examples",
           frozenset({"DPSGD", "KMixup"}): "mix examples",
           frozenset({"DPSGD", "Mixup"}): "mix examples",
           frozenset({"DPSGD", "RadiusControl"}): "no DP-SGD noise covers"}


def exported_callbacks() -> dict[str, type]:
    """Every ``lightning.Callback`` class in a plug-in package's ``__all__``."""
    found = {}
    for pkg in PLUGIN_PACKAGES:
        mod = importlib.import_module(pkg)
        for name in getattr(mod, "__all__", ()):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, L.Callback):
                found[name] = obj
    return found


def contract_callbacks() -> list[str]:
    return sorted(n for n in exported_callbacks() if n not in NOT_IN_CONTRACT)


def contract_optimizers() -> list[str]:
    return sorted(n for n in optimizers.OPTIMIZERS if n not in NOT_IN_CONTRACT)


def plugin_names() -> list[str]:
    """Every discovered plug-in: exported callback classes and registered optimizer names."""
    return sorted(exported_callbacks()) + sorted(optimizers.OPTIMIZERS)


def undeclared_needs_arguments(name: str) -> str:
    """Why a discovered callback without a ``CALLBACKS`` entry cannot be built as ``cls()``
    (its missing arguments), or "" when it can."""
    if name in CALLBACKS:
        return ""
    try:
        inspect.signature(exported_callbacks()[name]).bind()
    except TypeError as e:
        return (f"{name}() cannot be built without arguments ({e}): add how to build it for a "
                "short run, and the module families it applies to, to CALLBACKS in "
                "tests/contract_plugins.py, or say why it cannot take part in NOT_IN_CONTRACT")
    return ""


def callback(name: str):
    """(factory, families) of a discovered callback; a factory that fails naming the fix where
    the callback needs arguments nobody declared."""
    if name in CALLBACKS:
        return CALLBACKS[name]
    if why := undeclared_needs_arguments(name):
        def refuse():
            raise TypeError(why)
        return refuse, FAMILIES
    return exported_callbacks()[name], FAMILIES


def pairs():
    names = contract_callbacks()
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = callback(a)[1] & callback(b)[1]
            if common:
                out.append((a, b, "image" if "image" in common else "lm"))
    return out
