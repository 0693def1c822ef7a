"""scripts/ is a package run as ``python -m scripts.<name>``: every script imports as one, and
none reaches for sys.path (the bench harness registers cases in one module, not two)."""
import importlib
import pkgutil
from pathlib import Path

import pytest

import scripts
import scripts.bench_cases

ROOT = Path(__file__).resolve().parent.parent
MODULES = [f"scripts.{m.name}" for m in pkgutil.iter_modules(scripts.__path__) if not m.ispkg]


@pytest.mark.parametrize("name", MODULES)
def test_script_imports_as_a_module(name):
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text()
    assert "sys.path" not in source and "sys.modules" not in source, name


def test_bench_cases_register_in_the_harness():
    from scripts.harness import CASES, load_cases
    load_cases()
    per_module = {c.fn.__module__ for c in CASES.values()}
    expected = {f"scripts.bench_cases.{m.name}" for m in pkgutil.iter_modules(scripts.bench_cases.__path__)}
    assert per_module == expected
