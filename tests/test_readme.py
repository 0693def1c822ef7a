"""The README's code example runs as written, and CI runs the README's test command."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_own_module_example_trains(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    block = README.split("<!-- example: own-module")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.global_step > 0
    assert trainer.callback_metrics["train/loss"] < 0.6  # well below chance, log(3) = 1.10


def test_ci_runs_the_readme_test_command():
    command = re.search(r"# the tests:.*\n(.*)\n", README).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()
