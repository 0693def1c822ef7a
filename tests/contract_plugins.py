"""The registered plug-ins the contract tests run over, each with the module family it
needs: batch mixers need a classifier (soft targets of images), the massive-activation and
stability monitors need transformer blocks, the rest take any module."""
from __future__ import annotations

import regularizers
from toolkit.monitors import MassiveActivationMonitor, SpectralMonitor, StabilityMonitor

# name -> (factory, modules it applies to)
CALLBACKS = {
    "KMixup": (lambda: regularizers.KMixup(k=4, alpha=0.5, num_classes=10), {"image"}),
    "Mixup": (lambda: regularizers.Mixup(alpha=0.5, num_classes=10), {"image"}),
    "LangevinNoise": (lambda: regularizers.LangevinNoise(temperature=1e-6), {"image", "lm"}),
    "IterateAveraging": (lambda: regularizers.IterateAveraging(start_step=2), {"image", "lm"}),
    "RadiusControl": (lambda: regularizers.RadiusControl(r_max=0.05), {"image", "lm"}),
    "LRSpike": (lambda: regularizers.LRSpike(start=3, length=2, factor=100.0), {"image", "lm"}),
    # a cap below the tiny model's logits, so heads are clipped from the first step
    "QKClip": (lambda: regularizers.QKClip(tau=0.05), {"lm"}),
    "SpectralMonitor": (lambda: SpectralMonitor(every_n_steps=2), {"image", "lm"}),
    "MassiveActivationMonitor": (lambda: MassiveActivationMonitor(every_n_steps=2, fit=False,
                                                                  plots=False), {"lm"}),
    "StabilityMonitor": (lambda: StabilityMonitor(every_n_steps=2), {"lm"}),
    # seeded so a straight and a resumed run draw the same batches and noise
    "DPSGD": (lambda: regularizers.DPSGD(noise_multiplier=1.0, delta=1e-3, max_grad_norm=1.0,
                                         seed=3), {"image"}),
}
# pairs refused at fit start, with a fragment of the error
REFUSED = {frozenset({"KMixup", "Mixup"}): "both mix examples",
           frozenset({"DPSGD", "KMixup"}): "mix examples",
           frozenset({"DPSGD", "Mixup"}): "mix examples",
           frozenset({"DPSGD", "RadiusControl"}): "no DP-SGD noise covers"}

def pairs():
    names = sorted(CALLBACKS)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = CALLBACKS[a][1] & CALLBACKS[b][1]
            if common:
                out.append((a, b, "image" if "image" in common else "lm"))
    return out
