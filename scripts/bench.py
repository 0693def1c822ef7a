"""Benchmark harness: ``python -m scripts.bench CASE [CASE ...] [--reps N] [--quick]``.

Each case times our implementation against one or more named references in the same
process, interleaved (the order rotates every repetition so drift and caches hit all
alike), and reports the median time of each and the ratio ours / reference. Results are
printed as a table and written to ``bench_results/<case>.json``.

Cases live in ``scripts/bench_cases/*.py`` and register themselves with ``scripts.harness.case``::

    @case("trainer-overhead", target=1.10)
    def trainer_overhead(quick: bool) -> Bench:
        return Bench({"toolkit": run_ours, "plain-torch": run_reference})

The first entry of ``Bench.impls`` is ours; every other entry is a reference. Each
callable runs one timed repetition; ``Bench.extra`` carries other figures (peak memory,
matching time ...) into the table and JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.harness import CASES, format_result, load_cases, run_case


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
