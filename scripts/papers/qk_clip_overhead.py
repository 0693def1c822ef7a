"""QKClip's step overhead in CPU time of the calling thread (``time.thread_time``), a cross-check
of ``python -m scripts.bench qk-clip-train-step qk-clip-recipe-step`` on a shared machine, where
wall-clock medians move with the other jobs' load:

    OMP_NUM_THREADS=1 python -m scripts.papers.qk_clip_overhead --reps 20

Same steps as those bench cases (``scripts.bench_cases.muon_family._lm_step``), with and without
the forward watch, alternating order each repetition; prints the median CPU ms and the ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from scripts.bench_cases.muon_family import _lm_step

MODELS = {"4x128 (qk-clip-train-step)": (128, 4, 4, 128), "4x64 (--quick)": (64, 4, 4, 128),
          "2x64 (qk-clip-recipe-step)": (64, 2, 2, 64)}


def measure(shape: tuple[int, int, int, int], reps: int) -> dict[str, float]:
    impl = {"muon+qk_clip": _lm_step("forward", *shape), "muon": _lm_step(None, *shape)}
    for f in impl.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in impl}
    names = list(impl)
    for r in range(reps):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.thread_time()
            impl[k]()
            times[k].append(time.thread_time() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {**{f"{k}_cpu_ms": round(v, 1) for k, v in med.items()},
            "ratio": round(med["muon+qk_clip"] / med["muon"], 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps({name: measure(shape, args.reps) for name, shape in MODELS.items()}, indent=1))


if __name__ == "__main__":
    main()
