"""The benchmark harness behind ``python -m scripts.bench``: cases register with :func:`case`,
each repetition runs every implementation once in rotating order, and the result is the
median time of each and the ratio ours / reference."""
from __future__ import annotations

import importlib
import pkgutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Bench:
    impls: dict[str, Callable[[], Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1


@dataclass
class Case:
    name: str
    fn: Callable[[bool], Bench]
    target: float | dict[str, float] | None
    doc: str


CASES: dict[str, Case] = {}


def case(name: str, target: float | dict[str, float] | None = None):
    """Register ``fn(quick) -> Bench``; ``target`` is the ratio ours/reference to stay under
    (one number for every reference, or a dict reference name -> target)."""

    def deco(fn):
        CASES[name] = Case(name, fn, target, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def load_cases() -> None:
    from scripts import bench_cases
    for mod in pkgutil.iter_modules(bench_cases.__path__):
        importlib.import_module(f"scripts.bench_cases.{mod.name}")


def run_case(c: Case, reps: int, quick: bool) -> dict[str, Any]:
    bench = c.fn(quick)
    names = list(bench.impls)
    for _ in range(bench.warmup):
        for n in names:
            bench.impls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU time: robust to a busy host
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0, c0 = time.perf_counter(), time.process_time()
            bench.impls[n]()
            times[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    cpu_med = {n: statistics.median(ts) for n, ts in cpu.items()}
    ours = names[0]
    ratios = {ref: med[ours] / med[ref] for ref in names[1:]}
    return {"case": c.name, "ours": ours, "median_s": med, "times_s": times,
            "ratio_vs": ratios, "target": c.target, "reps": reps,
            "cpu_median_s": cpu_med, "cpu_times_s": cpu,
            "cpu_ratio_vs": {ref: cpu_med[ours] / cpu_med[ref] for ref in names[1:]},
            "extra": bench.extra}


def format_result(res: dict[str, Any]) -> str:
    lines = [f"== {res['case']} (median of {res['reps']}, ours = {res['ours']})"]
    for n, t in res["median_s"].items():
        ratio = res["ratio_vs"].get(n)
        tail = "" if ratio is None else f"   ours/this = {ratio:.3f}"
        target = res["target"].get(n) if isinstance(res["target"], dict) else res["target"]
        if ratio is not None and target is not None:
            tail += "  (target <= %.2f: %s)" % (target, "ok" if ratio <= target else "MISSED")
        cpu = res.get("cpu_ratio_vs", {}).get(n)
        tail += "" if cpu is None else f"  (process CPU time: {cpu:.3f})"
        lines.append(f"  {n:<28} {t * 1e3:10.2f} ms{tail}")
    for k, v in res["extra"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


