"""The prepared GPU check's dry run (what CI can execute): without CUDA it says so, checks its
own plan and exits 0; a plan naming something that does not exist fails."""
import torch

from scripts import gpu_check


def test_dry_run_without_cuda_checks_the_plan_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "no CUDA device here" in out and "PROBLEMS" not in out
    assert f"{len(gpu_check.recipes())} recipes" in out and len(gpu_check.recipes()) >= 20


def test_the_plan_check_finds_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "BENCH_CASES", gpu_check.BENCH_CASES + ["no-such-case"])
    monkeypatch.setattr(gpu_check, "RESUME_TESTS", ["tests/test_contract.py::test_nope"])
    bad = tmp_path / "recipes"
    bad.mkdir()
    (bad / "broken.yaml").write_text("model:\n  class_path: toolkit.NoSuchModule\n")
    (bad / "unparsable.yaml").write_text("model: [\n")
    monkeypatch.setattr(gpu_check, "recipes", lambda: sorted(bad.glob("*.yaml")))
    problems = gpu_check.check_plan()
    assert any("no-such-case" in p for p in problems)
    assert "tests/test_contract.py::test_nope does not exist" in problems
    assert any("toolkit.NoSuchModule does not exist" in p for p in problems)
    assert any("unparsable.yaml: does not parse" in p for p in problems)
