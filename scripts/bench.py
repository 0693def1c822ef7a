"""Benchmark harness: ``python scripts/bench.py CASE [CASE ...] [--reps N] [--quick]``.

Each case times our implementation against one or more named references in the same
process, interleaved (the order rotates every repetition so drift and caches hit all
alike), and reports the median time of each and the ratio ours / reference. Results are
printed as a table and written to ``bench_results/<case>.json``.

Cases live in ``scripts/bench_cases/*.py`` and register themselves::

    @case("trainer-overhead", target=1.10)
    def trainer_overhead(quick: bool) -> Bench:
        return Bench({"toolkit": run_ours, "plain-torch": run_reference})

The first entry of ``Bench.impls`` is ours; every other entry is a reference. Each
callable runs one timed repetition; ``Bench.extra`` carries other figures (peak memory,
matching time ...) into the table and JSON.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


@dataclass
class Bench:
    impls: dict[str, Callable[[], Any]]
    extra: dict[str, Any] = field(default_factory=dict)
    warmup: int = 1


@dataclass
class Case:
    name: str
    fn: Callable[[bool], Bench]
    target: float | None
    doc: str


CASES: dict[str, Case] = {}
# Case modules do `from bench import case`; run as a script this module is __main__, so
# alias it to keep one registry.
sys.modules.setdefault("bench", sys.modules[__name__])


def case(name: str, target: float | None = None):
    """Register ``fn(quick) -> Bench``; ``target`` is the ratio ours/reference to stay under."""

    def deco(fn):
        CASES[name] = Case(name, fn, target, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


def load_cases() -> None:
    import bench_cases
    for mod in pkgutil.iter_modules(bench_cases.__path__):
        importlib.import_module(f"bench_cases.{mod.name}")


def run_case(c: Case, reps: int, quick: bool) -> dict[str, Any]:
    bench = c.fn(quick)
    names = list(bench.impls)
    for _ in range(bench.warmup):
        for n in names:
            bench.impls[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            bench.impls[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    ours = names[0]
    ratios = {ref: med[ours] / med[ref] for ref in names[1:]}
    return {"case": c.name, "ours": ours, "median_s": med, "times_s": times,
            "ratio_vs": ratios, "target": c.target, "reps": reps, "extra": bench.extra}


def format_result(res: dict[str, Any]) -> str:
    lines = [f"== {res['case']} (median of {res['reps']}, ours = {res['ours']})"]
    for n, t in res["median_s"].items():
        ratio = res["ratio_vs"].get(n)
        tail = "" if ratio is None else f"   ours/this = {ratio:.3f}"
        if ratio is not None and res["target"] is not None:
            tail += "  (target <= %.2f: %s)" % (res["target"], "ok" if ratio <= res["target"] else "MISSED")
        lines.append(f"  {n:<28} {t * 1e3:10.2f} ms{tail}")
    for k, v in res["extra"].items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    load_cases()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="cases: " + ", ".join(sorted(CASES)))
    ap.add_argument("cases", nargs="*", help="case names (default: list them)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for smoke tests")
    ap.add_argument("--out", default="bench_results")
    args = ap.parse_args(argv)
    if not args.cases:
        for c in sorted(CASES.values(), key=lambda c: c.name):
            print(f"{c.name:<20} target {c.target}  {c.doc}")
        return 0
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.cases:
        res = run_case(CASES[name], args.reps, args.quick)
        print(format_result(res), flush=True)
        (out / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
