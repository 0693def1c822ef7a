"""DP-SGD step on transformer LMs: ours vs Opacus (hooks, ghost clipping) vs non-private."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from scripts.harness import Bench, case
from scripts.bench_cases.dp import peak_bytes

SIGMA, C, LR = 1.0, 1.0, 0.05
TARGET = {"opacus-hooks": 0.8, "opacus-ghost": 0.8, "non-private": 1.4, "ours-checked": 1.0}


def _toolkit_gpt(bias: bool):
    from toolkit.models import GPT, GPTConfig
    return GPT(GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128,
                         bias=bias)), 65


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    class Llama(nn.Module):  # logits only, like the toolkit GPT
        def __init__(self):
            super().__init__()
            self.m = LlamaForCausalLM(LlamaConfig(
                vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                tie_word_embeddings=True, attn_implementation="eager"))

        def forward(self, x):
            return self.m(input_ids=x).logits
    return Llama(), 256


def _steps(base: nn.Module, x, y, V: int) -> tuple[dict, dict]:
    """name -> one training step, and name -> why it could not be built."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    from regularizers.dp import PerSampleGradients, privatize_
    B = len(x)
    ce = lambda out: F.cross_entropy(out.reshape(-1, V), y.reshape(-1))  # noqa: E731
    steps, failed, resets = {}, {}, {}

    ours_model = copy.deepcopy(base)
    ours_opt = torch.optim.SGD(ours_model.parameters(), lr=LR)
    engine = PerSampleGradients(ours_model)
    engine.skip_weight_grads = True  # as DPSGD in one process
    gen = torch.Generator().manual_seed(0)

    def ours():
        ours_opt.zero_grad(set_to_none=True)
        with engine.capture(batch_size=B):
            ce(ours_model(x)).backward()
        privatize_(engine, C, SIGMA, B, generator=gen)
        ours_opt.step()
    steps["ours"] = ours
    resets["ours"] = lambda: ours_opt.zero_grad(set_to_none=True)

    # what the DPSGD callback runs on every step since issue 23: the row tracker over the
    # forward and the canonical loss gradient (regularizers.dp.step), then the same engine
    from regularizers.dp.rows import RowTracker
    checked_model = copy.deepcopy(base)
    checked_opt = torch.optim.SGD(checked_model.parameters(), lr=LR)
    checked_engine = PerSampleGradients(checked_model, "sum")
    checked_engine.skip_weight_grads = True

    def checked():
        checked_opt.zero_grad(set_to_none=True)
        tracker = RowTracker(B)
        tracker.mark((x, y))
        with checked_engine.capture(batch_size=B):
            with tracker:
                loss = ce(checked_model(x))
            verdict = tracker.verdict(loss)
            assert verdict.separable, verdict.reasons  # the fast path, or the bench is moot
            handles = verdict.install()
            loss.backward()
            for h in handles:
                h.remove()
        privatize_(checked_engine, C, SIGMA, B, generator=gen)
        checked_opt.step()
    steps["ours-checked"] = checked
    resets["ours-checked"] = lambda: checked_opt.zero_grad(set_to_none=True)

    def opacus_copy():
        m = copy.deepcopy(base)
        if hasattr(m, "wpe"):  # Opacus's embedding norm sampler .view()s the expanded index
            m.wpe.register_forward_pre_hook(lambda mod, args: (args[0].contiguous(),))
        return m

    def hooks():
        gsm = GradSampleModule(opacus_copy())
        opt = DPOptimizer(torch.optim.SGD(gsm._module.parameters(), lr=LR), noise_multiplier=SIGMA,
                          max_grad_norm=C, expected_batch_size=B)

        def step():
            opt.zero_grad(set_to_none=True)
            ce(gsm(x)).backward()
            opt.step()
        step.reset = lambda: opt.zero_grad(set_to_none=True)
        return step

    def ghost():
        gsm = GradSampleModuleFastGradientClipping(opacus_copy(), max_grad_norm=C,
                                                   use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm._module.parameters(), lr=LR),
                                              noise_multiplier=SIGMA, max_grad_norm=C,
                                              expected_batch_size=B)
        crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss())

        def step():
            opt.zero_grad(set_to_none=True)
            out = gsm(x)
            crit(out.reshape(-1, V), y.reshape(-1), shape=out.shape).backward()
            opt.step()
        step.reset = lambda: opt.zero_grad(set_to_none=True)
        return step

    for name, make in (("opacus-hooks", hooks), ("opacus-ghost", ghost)):
        try:
            fn = make()
            fn()
            steps[name], resets[name] = fn, fn.reset
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

    plain_model = copy.deepcopy(base)
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=LR)

    def plain():
        plain_opt.zero_grad(set_to_none=True)
        ce(plain_model(x)).backward()
        plain_opt.step()
    steps["non-private"] = plain
    resets["non-private"] = lambda: plain_opt.zero_grad(set_to_none=True)
    return steps, failed, resets


def _bench(model_fn, B: int, T: int = 128) -> Bench:
    torch.manual_seed(0)
    base, V = model_fn()
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    steps, failed, resets = _steps(base, x, y, V)
    for fn in steps.values():
        fn()
    extra = {}
    for n, fn in steps.items():
        resets[n]()  # free what the last step left (grads, grad samples): count a whole step
        extra[f"peak_MB[{n}]"] = round(peak_bytes(fn) / 2 ** 20, 1)
    extra.update({f"failed[{n}]": why for n, why in failed.items()})
    extra.update(batch=B, context=T, params=sum(p.numel() for p in base.parameters()))
    return Bench(steps, extra=extra)


def _register(name: str, model_fn, B: int, what: str):
    def fn(quick: bool) -> Bench:
        return _bench(model_fn, B // 4 if quick else B, 32 if quick else 128)
    fn.__doc__ = (f"DP-SGD step, {what}, batch {B}, context 128: ours vs Opacus hooks / ghost "
                  "clipping (target <= 0.8) and non-private (<= 1.4)")
    case(name, target=TARGET)(fn)


for _B in (16, 64):
    _register(f"dp-lm-step-{_B}", lambda: _toolkit_gpt(True), _B, "toolkit GPT 4x128 bias")
    _register(f"dp-lm-step-{_B}-nobias", lambda: _toolkit_gpt(False), _B,
              "toolkit GPT 4x128 no bias")
_register("dp-lm-step-llama", _llama, 16, "Llama-style 4x128 GQA, tied")
