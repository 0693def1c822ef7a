"""Step time of the Muon-family options against optimizers.Muon on the same parameters (GPT-2
small shapes; ``--quick``: 4 layers, 256 wide), one ``step()`` with fixed random gradients:

``normuon-step``: NorMuon (per-neuron second moment after Newton-Schulz, arXiv 2510.05491);
``muon-pe-step``: Muon with ``ns_coefficients="polar_express"`` (arXiv 2505.16932);
``muon-cwd-step``: Muon with ``cautious_wd=True`` (arXiv 2510.12402). Target: <= 1.05x Muon.

``qk-clip-train-step`` / ``qk-clip-recipe-step``: a char GPT training step with QKClip's default
forward watch (Kimi K2 arXiv 2507.20534; the per-head max of q.k^T from the forward's own q/k)
against the same step without it, on the quickstart 4x128 model (``--quick``: 4x64) and on
recipes/qk_clip_lm.yaml's 2x64. Target: <= 1.03x. ``qk-clip-post-step-train-step``: the exact
post-step cap's extra forward, for reference.
"""
from __future__ import annotations

from scripts.bench_cases.optimizers import _extra, _ours
from scripts.harness import Bench, case


def _vs_muon(quick: bool, label: str, name: str = "muon", **kw) -> Bench:
    model, ours = _ours(quick, name, **kw)
    return Bench({label: ours, "optimizers.Muon": _ours(quick, "muon")[1]}, extra=_extra(model))


@case("normuon-step", target=1.05)
def normuon_step(quick: bool) -> Bench:
    """NorMuon step vs optimizers.Muon step (GPT-2 small params)."""
    return _vs_muon(quick, "optimizers.NorMuon", "normuon")


@case("muon-pe-step", target=1.05)
def muon_pe_step(quick: bool) -> Bench:
    """Muon with Polar Express coefficients vs the quintic (GPT-2 small params)."""
    return _vs_muon(quick, "Muon(polar_express)", ns_coefficients="polar_express")


@case("muon-cwd-step", target=1.05)
def muon_cwd_step(quick: bool) -> Bench:
    """Muon with cautious weight decay vs plain decoupled decay (GPT-2 small params)."""
    return _vs_muon(quick, "Muon(cautious_wd)", cautious_wd=True)


def _lm_step(clip: str | None, n_embd: int = 128, n_layer: int = 4, n_head: int = 4,
             block: int = 128):
    """One training step (fwd, bwd, Muon step) of a char GPT (batch 32), with QKClip's default
    forward watch (``clip="forward"``: per-head max logit from the training forward's own q/k,
    clip after the step) or its exact post-step clipping forward (``"post_step"``)."""
    import torch

    import optimizers
    from regularizers.qk_clip import attention_modules, clip_forward_, clip_measured_, watch_forward
    from toolkit.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=block, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd))
    opt = optimizers.build_optimizer(model, "muon", lr=0.02, weight_decay=0.1, adam_lr=0.01)
    x = torch.randint(0, 65, (32, block + 1), generator=torch.Generator().manual_seed(0))
    mods, store = attention_modules(model), []

    def step():
        opt.zero_grad()
        handles = watch_forward(mods, store) if clip == "forward" else []
        logits = model(x[:, :-1])
        for h in handles:
            h.remove()
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        if clip == "post_step":
            clip_forward_(model, x[:, :-1], mods, 100.0, 0.5)
        elif clip == "forward":
            clip_measured_(mods, store, 100.0, 0.5)

    return step


@case("qk-clip-train-step", target=1.03)
def qk_clip_train_step(quick: bool) -> Bench:
    """Training step of the quickstart 4x128 LM with QKClip (default: max logits watched in the
    training forward, no extra forward) vs without."""
    n = 64 if quick else 128
    return Bench({"muon+qk_clip": _lm_step("forward", n), "muon": _lm_step(None, n)})


@case("qk-clip-recipe-step", target=1.03)
def qk_clip_recipe_step(quick: bool) -> Bench:
    """Same on recipes/qk_clip_lm.yaml's model (2 layers x 64, 2 heads, block 64)."""
    return Bench({"muon+qk_clip": _lm_step("forward", 64, 2, 2, 64),
                  "muon": _lm_step(None, 64, 2, 2, 64)})


@case("qk-clip-post-step-train-step")
def qk_clip_post_step_train_step(quick: bool) -> Bench:
    """QKClip(measure="post_step"): the exact cap's extra clipping forward (no target: it is a
    whole no-grad forward)."""
    n = 64 if quick else 128
    return Bench({"muon+qk_clip(post_step)": _lm_step("post_step", n), "muon": _lm_step(None, n)})
