"""The step guard: each training step is checked as it runs, and computed exactly.

:class:`StepGuard` wraps the module's ``training_step`` for the fit. On every step it

1. releases noise only on an empty Poisson batch (the model never sees zero rows, which
   some models cannot take, and the release is the one the accountant assumes);
2. runs the step under :class:`.rows.RowTracker` and, for a custom ``collate_fn``, checks
   that each row of the batch is that example collated alone;
3. if both hold, replaces the loss's incoming gradient by the canonical per-example sum
   (:meth:`.rows.Verdict.install`) so the hooks' pieces are each example's own gradient,
   in any precision; otherwise computes this step's clipped sum with every example alone
   (:mod:`.isolated`), before the update is applied.

So a branch that couples examples on some steps only, or only on some data, is caught on
the step it runs, and costs that step speed rather than privacy.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.data import default_collate

from .errors import PrivacyError
from .isolated import isolated_clipped_sum
from .pieces import wide
from .probe import batch_rows, muted_logging, rows_of, same_batch
from .rows import RowTracker
from .sampling import PoissonLoader


def _loss(out):
    loss = out["loss"] if isinstance(out, dict) else out
    return loss if isinstance(loss, torch.Tensor) else None


@contextlib.contextmanager
def _logging_untracked(module):
    """``self.log`` outside the tracker: Lightning accumulates logged values in place into
    its own result tensors, which is logging (a release of its own, see
    ``hide_training_metrics``), not a write into the model."""
    had = "log" in vars(module), "log_dict" in vars(module)
    saved = module.log, module.log_dict

    def quiet(fn):
        def call(*a, **k):
            with _disable_current_modes():
                return fn(*a, **k)
        return call
    module.log, module.log_dict = quiet(saved[0]), quiet(saved[1])
    try:
        yield
    finally:
        for name, was, fn in (("log", had[0], saved[0]), ("log_dict", had[1], saved[1])):
            if was:
                setattr(module, name, fn)
            else:
                vars(module).pop(name, None)


class StepGuard:
    """Wraps ``pl_module.training_step`` while a DPSGD fit runs (see module docstring)."""

    def __init__(self, dp, trainer, module):
        self.dp, self.trainer, self.module = dp, trainer, module
        self.original = module.training_step
        self.handles: list = []
        self.clipped = None
        self.path = None          # "rows", "isolated" or "empty", for tests and docs
        self.why: list = []
        module.training_step = self._step
        dp._patched.add("training_step")

    # ----------------------------------------------------------- per step
    def begin(self, batch) -> None:
        self.end()
        self.clipped, self.path, self.why = None, None, []

    def end(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def finish(self):
        """The isolated path's (sums, norms, B), or None when the hooks' pieces hold."""
        self.end()
        return self.clipped

    def remove(self) -> None:
        self.end()
        if vars(self.module).get("training_step") == self._step:
            del self.module.training_step
        self.dp._patched.discard("training_step")

    # ----------------------------------------------------------- the step
    def _step(self, batch, batch_idx=0, *args, **kwargs):
        B = batch_rows(batch) or 0
        params = self.dp.engine.params
        if B == 0:
            self.path = "empty"
            self.clipped = ([torch.zeros_like(p, dtype=wide(p).dtype) for p in params],
                            torch.zeros(0), 0)
            # a loss connected to every weight, so the backward (and DDP's reducer) runs
            return sum(p.reshape(-1)[:1].sum() * 0.0 for p in params)
        tracker = RowTracker(B)
        tracker.mark(batch)
        engine = self.dp.engine
        engine.in_step, engine.inner_backward = True, False
        try:
            with tracker, _logging_untracked(self.module):
                out = self.original(batch, batch_idx, *args, **kwargs)
        finally:
            engine.in_step = False
        tracker.check_kept(self.module)
        verdict = tracker.verdict(_loss(out))
        if engine.inner_backward:
            verdict.red, verdict.public = None, False
            verdict.reasons = ["a backward runs inside the training step"]
        singles = None
        if verdict.separable and not self._collated_alone():
            singles = self._singles(batch, B)
            if not all(same_batch(rows_of(batch, i), s) for i, s in enumerate(singles)):
                verdict.red, verdict.public = None, False
                verdict.reasons = ["the collate_fn makes a row differ from its example "
                                   "collated alone (padding to the batch's longest, mixing)"]
        if verdict.separable:
            self.path = "rows"
            self.handles = verdict.install()
            return out
        self.path, self.why = "isolated", verdict.reasons
        self.clipped = self._isolated(singles if singles is not None else
                                      self._singles(batch, B), batch_idx, args, kwargs)
        return out

    def _collated_alone(self) -> bool:
        """Rows are each example collated alone by construction: default collation."""
        loader = self.dp.data.loader if self.dp.data is not None else None
        collate = getattr(loader, "collate_fn", None)
        return collate is None or collate is default_collate

    def _singles(self, batch, B: int) -> list:
        """Each example of this step as a batch of one, collated alone and sent through the
        same input conversion, batch hooks and device transfer as the batch."""
        loader = self.dp.data.loader
        trainer = self.trainer
        if isinstance(loader, PoissonLoader):
            idx = loader.batch_sampler.indices(trainer.global_step)
            if len(idx) != B:
                raise PrivacyError(f"the batch has {B} rows but the sampler's draw of step "
                                   f"{trainer.global_step} has {len(idx)} examples: a loader "
                                   "or batch hook changes the number of rows")
            out = []
            for i in idx:
                one = loader._collate([loader.dataset[i]])
                one = trainer.precision_plugin.convert_input(one)
                one = self.module._on_before_batch_transfer(one, dataloader_idx=0)
                out.append(trainer.strategy.batch_to_device(one, dataloader_idx=0))
            return out
        raise PrivacyError(f"the training loader is a {type(loader).__name__}, not DP-SGD's: "
                           "the examples of this batch are unknown")

    def _isolated(self, singles: list, batch_idx, args, kwargs):
        engine, dp = self.dp.engine, self.dp
        was = engine.capturing
        engine.capturing = False
        try:
            with muted_logging(self.module):
                loss_of = lambda b: _loss(self.original(b, batch_idx, *args, **kwargs))  # noqa: E731
                if dp.user_unit is not None and dp.user_unit.clips_users:  # users, not examples
                    return dp.user_unit.isolated_sum(loss_of, singles, engine.params,
                                                     dp.data.loader, self.trainer.global_step,
                                                     dp.max_grad_norm)
                return isolated_clipped_sum(loss_of, singles, engine.params, dp.max_grad_norm,
                                            dp.clipping)
        except PrivacyError:
            raise
        except Exception as e:
            raise PrivacyError(
                f"step {self.trainer.global_step} couples examples ({'; '.join(self.why)}), so "
                f"DP-SGD computes each example's gradient alone, and the training step fails on "
                f"a batch of one: {type(e).__name__}: {e}. Remove the coupling (use "
                "GroupNorm/LayerNorm instead of batch statistics)") from e
        finally:
            engine.capturing = was
