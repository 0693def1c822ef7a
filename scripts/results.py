"""Measured numbers have one source: ``docs/results/<recipe>.json``.

Each file holds ``values`` (the numbers a script measured), ``command`` (how to reproduce them)
and two templates over the values: ``summary`` (the recipe's row in the README table) and
``measured`` (the "Measured:" sentence closing the recipe's header). This script renders both
into README.md (and the docs site's docs/recipes.md) and recipes/*.yaml, and the kept bench
results into docs/benchmarks.md; ``--check`` exits 1 where a file disagrees with its JSON (the
test suite runs it). Scripts that measure call :func:`record` to update the values.

    python -m scripts.results           # rewrite the tables and recipe headers
    python -m scripts.results --check   # list what disagrees, exit 1 if anything does
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
RECIPES = ROOT / "recipes"
README = ROOT / "README.md"
RECIPE_PAGE = ROOT / "docs" / "recipes.md"  # the same recipe table, on the docs site
BENCH_PAGE = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- recipe-table:begin (python -m scripts.results) -->", "<!-- recipe-table:end -->"
BENCH_BEGIN = "<!-- bench-table:begin (python -m scripts.results) -->"
BENCH_END = "<!-- bench-table:end -->"
WIDTH = 110
# README table order: the toolkit first, then the papers family by family; others follow by name
ORDER = ["quickstart", "mnist_cnn", "muon_lm", "hyperp_lm", "hyperp_moe_lm", "powerlines_wd_lm",
         "layerwise_wd_lm", "umup_lm", "muonpp_lm", "auon_lm", "muon_family_lm", "qk_clip_lm",
         "erm_mnist", "mixup_mnist", "kmixup_mnist", "ghosts_lr_spike", "langevin_mnist",
         "langevin_swa_single_index", "dpsgd_mnist", "dp_lm", "dp_user_lm",
         "mfld_private_trajectories", "mfld_private_trajectories_digits",
         "massive_activations_lm", "hf_llama_muon", "minilm_speakers", "rco_mixed_precision_lm"]


def load(recipe: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{recipe}.json").read_text())


def recipe_results() -> dict[str, dict[str, Any]]:
    """Every results file that belongs to a recipe (bench results carry no ``recipe``)."""
    out = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "recipe" in data:
            if data["recipe"] != path.stem:
                raise ValueError(f"{path} says recipe {data['recipe']!r}; name it "
                                 f"{data['recipe']}.json")
            out[path.stem] = data
    return out


def render(data: dict[str, Any], key: str) -> str:
    try:
        return data[key].format(**data["values"])
    except KeyError as e:
        raise KeyError(f"docs/results/{data['recipe']}.json: {key!r} uses {e}, which is not "
                       f"among its values {sorted(data['values'])}") from e


def header_block(data: dict[str, Any]) -> list[str]:
    """The generated closing lines of a recipe header."""
    lines = textwrap.wrap(f"Measured (docs/results/{data['recipe']}.json): {render(data, 'measured')}",
                          WIDTH - 2, subsequent_indent="  ", break_on_hyphens=False)
    lines += textwrap.wrap(f"Reproduce: {data['command']}", WIDTH - 2, subsequent_indent="  ",
                           break_on_hyphens=False, break_long_words=False)
    return [f"# {line}" for line in lines]


def with_header(text: str, data: dict[str, Any]) -> str:
    """``text`` (a recipe) with its header's generated block replaced: everything from the
    first ``# Measured (`` line to the end of the leading comment block."""
    lines = text.splitlines()
    end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    start = next((i for i in range(end) if lines[i].startswith("# Measured (")), end)
    return "\n".join(lines[:start] + header_block(data) + lines[end:]) + "\n"


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    names = [n for n in ORDER if n in results] + sorted(set(results) - set(ORDER))
    rows = ["| recipe | what it shows (measured; docs/results/<recipe>.json) |", "| --- | --- |"]
    rows += [f"| `{n}` | {render(results[n], 'summary')} |" for n in names]
    return "\n".join(rows)


def bench_results() -> dict[str, dict[str, Any]]:
    """Every bench case result kept in docs/results (``python -m scripts.bench CASE --out docs/results``)."""
    out = {}
    for path in sorted(RESULTS.glob("*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "case" in data and "ratio_vs" in data:
            out[data["case"]] = data
    return out


def bench_table(results: dict[str, dict[str, Any]]) -> str:
    rows = ["| case | ours | reference | median ms per repetition, ours / reference | ours / reference | target |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        target = r.get("target")
        for ref, ratio in r["ratio_vs"].items():
            t = target.get(ref) if isinstance(target, dict) else target
            rows.append(f"| `{name}` | {r['ours']} | {ref} | {1e3 * r['median_s'][r['ours']]:.1f} / "
                        f"{1e3 * r['median_s'][ref]:.1f} | {ratio:.2f}x | "
                        f"{'-' if t is None else f'<= {t}'} |")
    return "\n".join(rows)


def with_table(text: str, table: str, begin: str = BEGIN, end: str = END) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"a rendered file lacks the markers {begin} ... {end}")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1]


def expected_files() -> dict[Path, str]:
    """Every file this script writes, with the content its JSON implies."""
    results = recipe_results()
    table = readme_table(results)
    out = {README: with_table(README.read_text(), table),
           RECIPE_PAGE: with_table(RECIPE_PAGE.read_text(), table),
           BENCH_PAGE: with_table(BENCH_PAGE.read_text(), bench_table(bench_results()),
                                  BENCH_BEGIN, BENCH_END)}
    for name, data in results.items():
        path = RECIPES / f"{name}.yaml"
        if not path.exists():
            raise FileNotFoundError(f"docs/results/{name}.json has no recipes/{name}.yaml")
        out[path] = with_header(path.read_text(), data)
    return out


def stale() -> list[Path]:
    return [p for p, text in expected_files().items() if p.read_text() != text]


def record(recipe: str, values: dict[str, Any], command: str | None = None) -> None:
    """Update a recipe's measured values (templates kept), then rewrite README and header."""
    path = RESULTS / f"{recipe}.json"
    data = json.loads(path.read_text()) if path.exists() else {
        "recipe": recipe, "summary": "", "measured": "", "values": {}}
    data["values"].update(values)
    if command is not None:
        data["command"] = command
    path.write_text(json.dumps(data, indent=2) + "\n")
    if data.get("summary") and data.get("measured"):
        write()


def write() -> None:
    for path, text in expected_files().items():
        if path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report files that disagree")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale()
        for p in bad:
            print(f"{p.relative_to(ROOT)} disagrees with docs/results; run python -m scripts.results")
        return 1 if bad else 0
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
