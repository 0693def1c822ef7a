"""Tools (top level) and paper experiments (``scripts/papers/``); scripts/README.md says what
lives where. Run each as ``python -m scripts.<name>`` from the repository root.

The paper experiments lived at the top level until they moved into ``scripts/papers/``;
``MOVED`` keeps the old ``python -m scripts.<old>`` and ``import scripts.<old>`` working
(recipe headers, results files and user notes name them). Add no new names here.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module (under scripts.) -> where it lives now (under scripts.)
MOVED = {
    "moe_rms": "papers.hyperp_moe",
    "powerlines_sweep": "papers.power_lines",
    "layerwise_widths": "papers.layerwise_wd",
    "umup_sweep": "papers.umup",
    "qk_clip_stress": "papers.qk_clip",
    "kmixup_toy": "papers.kmixup",
    "dp_tradeoff": "papers.dpsgd",
    "dp_barycenter": "papers.dp_barycenter",
    "muon_family": "papers.muon_family.arms",
    "ns_spectrum": "papers.muon_family.ns_spectrum",
    "ghosts_lr_spike": "papers.ghosts.lr_spike",
    "ghosts_onset": "papers.ghosts.onset",
    "langevin_single_index": "papers.langevin_swa.single_index",
    "langevin_swa_report": "papers.langevin_swa.report",
    "bandmf_bands": "papers.bandmf.bands",
    "bandmf_linear_mnist": "papers.bandmf.linear_mnist",
    "mfld_trajectories": "papers.mfld_trajectories.sweep",
    "mfld_audit": "papers.mfld_trajectories.audit",
    "fit_massive": "papers.massive_activations.fit",
    "emergence_grid": "papers.massive_activations.grid",
    "emergence_regression": "papers.massive_activations.regression",
    "emergence_calibration": "papers.massive_activations.calibration",
    "minilm_massive": "papers.massive_activations.minilm",
    "rco_knapsack": "papers.rco.knapsack",
    "rco_mixed_precision": "papers.rco.mixed_precision",
}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``scripts.<old>`` resolves to the module it moved to: an import gets that same module
    object, and ``python -m scripts.<old>`` runs its code (runpy asks the loader for it)."""

    @staticmethod
    def _target(fullname: str) -> str | None:
        head, _, tail = fullname.partition(".")
        return f"scripts.{MOVED[tail]}" if head == __name__ and tail in MOVED else None

    def find_spec(self, fullname, path=None, target=None):
        new = self._target(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=importlib.util.find_spec(new).origin)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        # the import system hands out whatever sys.modules holds under the old name afterwards
        sys.modules[module.__name__] = importlib.import_module(self._target(module.__name__))

    def get_code(self, fullname):
        new = self._target(fullname)
        print(f"note: scripts.{fullname.partition('.')[2]} is now {new}", file=sys.stderr)
        return importlib.util.find_spec(new).loader.get_code(new)


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
