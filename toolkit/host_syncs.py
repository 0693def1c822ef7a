"""Count host synchronizations on CPU: ``with HostSyncs() as s: step()`` records every call of
a tensor method that, on an accelerator, waits for the device and copies to the host.

On a GPU, ``.item()``, ``bool(t)`` (``if t:``), ``float(t)``, ``int(t)``, ``.tolist()``,
``.cpu()``, ``.numpy()``, ``.to("cpu")`` and ``.nonzero()`` of a device tensor block the Python
thread until every queued kernel has run, so the CPU cannot run ahead and queue the next
kernels. The calls are made from Python, so patching them on ``torch.Tensor`` finds them on a
CPU-only machine, with the line that made each one (the first frame outside torch, numpy and
Lightning). What this does not see, and ``torch.cuda.set_sync_debug_mode("error")`` does on a
GPU (tests/test_gpu.py): syncs inside C++ ops (boolean-mask indexing, ``torch.unique``) and
host-to-device copies from pageable memory.
"""
from __future__ import annotations

import collections
import os
import sys

import torch

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__",
           "nonzero")
_SKIP_NAMES = ("/torch/_tensor.py", "/torch/_tensor_str.py", "/torch/overrides.py",
               "/lightning/", "/lightning_fabric/", "/numpy/", "/contextlib.py", __file__)


def _site() -> str:
    """``path:line`` of the first caller outside tensor plumbing, Lightning, numpy and this
    file (``torch/optim/...`` lines are kept: torch's own optimizers are callers too)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not any(s in name for s in _SKIP_NAMES):
            return f"{_short(name)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _short(path: str) -> str:
    for top in ("toolkit", "optimizers", "regularizers", "tests", "scripts", "torch"):
        key = os.sep + top + os.sep
        if key in path:
            return top + os.sep + path.rsplit(key, 1)[1]
    return path


class HostSyncs:
    """Context manager; ``calls`` maps ``(method, "file:line")`` to a count. ``only`` keeps
    sites whose path starts with one of these prefixes (e.g. ``("optimizers/",)``)."""

    def __init__(self, only: tuple[str, ...] | None = None):
        self.only = only
        self.calls: collections.Counter = collections.Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self) -> "HostSyncs":
        for name in METHODS:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._saved["to"] = to = torch.Tensor.to
        torch.Tensor.to = self._wrap_to(to)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved = {}

    def _record(self, name: str) -> None:
        site = _site()
        if self.only is None or site.startswith(self.only):
            self.calls[(name, site)] += 1

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            self._record(name)
            return original(t, *args, **kwargs)
        return counted

    def _wrap_to(self, original):
        def to(t, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" \
                    and "/lightning_utilities/" not in sys._getframe(1).f_code.co_filename:
                # (Lightning's batch transfer: on a GPU the batch's host-to-device copy)
                self._record("to(cpu)")
            return original(t, *args, **kwargs)
        return to

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def sites(self) -> dict[str, int]:
        """``"method @ file:line" -> count``, for messages."""
        return {f"{m} @ {s}": n for (m, s), n in sorted(self.calls.items())}

    def by_file(self) -> dict[str, int]:
        """``"method @ file" -> count``: allow-lists that survive edits moving lines."""
        out: collections.Counter = collections.Counter()
        for (m, s), n in self.calls.items():
            out[f"{m} @ {s.rsplit(':', 1)[0]}"] += n
        return dict(out)
