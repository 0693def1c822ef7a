"""scripts/ is a package run as ``python -m scripts.<name>``: every tool and paper experiment
imports as one, none reaches for sys.path (the bench harness registers cases in one module, not
two), and the names from before the paper experiments moved to scripts/papers/ still work."""
import importlib
import pkgutil
import runpy
import sys
from pathlib import Path

import pytest

import scripts
import scripts.bench_cases

ROOT = Path(__file__).resolve().parent.parent
MODULES = [m.name for m in pkgutil.walk_packages(scripts.__path__, "scripts.") if not m.ispkg]


@pytest.mark.parametrize("name", MODULES)
def test_script_imports_as_a_module(name):
    module = importlib.import_module(name)
    source = Path(module.__file__).read_text()
    assert "sys.path" not in source and "sys.modules" not in source, name
    root = getattr(module, "ROOT", None)  # a moved script must still find the repository
    assert root is None or Path(root).resolve() == ROOT, (name, root)


def test_paper_experiments_live_under_papers():
    """The top level holds the tools; a module named after a paper goes under scripts/papers/."""
    top = {m.name for m in pkgutil.iter_modules(scripts.__path__)}
    assert top == {"bench", "bench_cases", "compare", "compare_monitors", "compare_optimizers",
                   "dp_audit", "dp_audit_bandmf", "gpu_check", "harness", "lm_run", "lr_sweep", "papers", "results",
                   "sweep_io"}, "new tool or paper script? see scripts/README.md"
    assert (ROOT / "scripts" / "install.sh").is_file()  # .ci/run and the README call it


@pytest.mark.parametrize("old,new", sorted(scripts.MOVED.items()))
def test_old_names_import_the_moved_module(old, new):
    assert importlib.util.find_spec(f"scripts.{new}") is not None, new
    assert importlib.import_module(f"scripts.{old}") is importlib.import_module(f"scripts.{new}")


def test_old_name_runs_with_python_m(monkeypatch, capsys):
    """``python -m scripts.<old>`` goes through runpy's module lookup, as run_module does here."""
    monkeypatch.setattr(sys, "argv", ["scripts.fit_massive", "--help"])
    monkeypatch.delitem(sys.modules, "scripts.fit_massive", raising=False)  # as in a fresh process
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("scripts.fit_massive", run_name="__main__", alter_sys=True)
    out = capsys.readouterr()
    assert stop.value.code == 0 and "--min-step" in out.out
    assert "now scripts.papers.massive_activations.fit" in out.err


def test_bench_cases_register_in_the_harness():
    from scripts.harness import CASES, load_cases
    load_cases()
    per_module = {c.fn.__module__ for c in CASES.values()}
    expected = {f"scripts.bench_cases.{m.name}" for m in pkgutil.iter_modules(scripts.bench_cases.__path__)}
    assert per_module == expected
